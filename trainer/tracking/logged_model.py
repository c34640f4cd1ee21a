"""The final EMA model of a run as an MLflow LoggedModel, loadable with `mlflow.pytorch.load_model`.

`mlflow.pytorch.load_model("models:/<model_id>")` returns the DiP (eval mode, on the CPU) that
`dip sample --checkpoint <its step dir>` samples with: the same weights, so the same images for the
same seed and labels. Two ways to hold the weights (`tracking.model_weights`):

- copy: the DiP is pickled into MLflow's artifact store, with the `models/` package as the model's
  code (`code_paths`), so loading needs torch and mlflow only, not this repository;
- reference: MLflow holds a small pickled pointer to the checkpoint's ema.pt; loading reads it from
  the checkpoint store (local, shared or s3://), so it needs dip-train importable and the
  checkpoint still there (`checkpoint.keep` prunes old ones as a resumed run goes on).
`auto` copies up to `tracking.model_copy_max_mb` and references above.

Both are pickle-format MLflow models (the `pt2` default traces `forward` with torch.export and cannot
point at a checkpoint); MLflow 3.17 loads pickles only with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true.
The LoggedModel carries the checkpoint it came from and the config hash as tags, the DiP config as
params, and the run's metrics at its step; `tracking.register_model` also registers it under a name.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

import models

from trainer.checkpoint.pins import supported
from trainer.checkpoint.store import EMA_FILE, CheckpointStore

log = logging.getLogger("dip.tracking")

MODELS_PACKAGE = os.path.dirname(os.path.abspath(models.__file__))  # copied whole beside a logged model
COPIED, REFERENCED = "copy", "reference"


def load_referenced_ema(checkpoint_uri: str, step: int) -> nn.Module:
    """The EMA DiP of step `step` under `checkpoint_uri`, read from its ema.pt with weights_only."""
    from trainer.model_io import model_from_checkpoint

    store = CheckpointStore(checkpoint_uri)
    where = store.display(step)
    if store.read_marker(step) is not None:  # gone (pruned): the read below says so
        verdict = store.verify(step, deep=True, only=[EMA_FILE])
        if not verdict.ok:
            raise ValueError(f"this MLflow model references {where}/{EMA_FILE}, which cannot be used: {verdict.reason}")
    try:
        payload = torch.load(store.open_file(step, EMA_FILE), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"this MLflow model references {where}/{EMA_FILE}, which is gone (pruned by "
                                "checkpoint.keep, or deleted)") from None
    return model_from_checkpoint(payload)


class ReferencedEMA(nn.Module):
    """Pickles as a reference: unpickling calls load_referenced_ema, which returns the DiP itself."""

    def __init__(self, checkpoint_uri: str, step: int):
        super().__init__()
        self.checkpoint_uri, self.step = checkpoint_uri, step

    def __reduce__(self):
        return load_referenced_ema, (self.checkpoint_uri, self.step)


def weights_mode(setting: str, size_mb: float, copy_max_mb: float) -> str:
    """'copy' or 'reference' for tracking.model_weights `setting` and ema.pt of `size_mb`."""
    if setting == "auto":
        return COPIED if size_mb <= copy_max_mb else REFERENCED
    return setting


@dataclass
class LoggedEMA:
    model_id: str
    model_uri: str                   # models:/<model_id>
    weights: str                     # copy | reference
    registered_version: str | None   # the version under tracking.register_model, if registered


@contextmanager
def _set_tracking_uri(uri: str):
    """MLflow's internal per-call URI switch with the tested MLflow; otherwise the public API (set, then
    set back what was there: the documented safe path, the same effect in this single-threaded call)."""
    if supported("MLflow tracking URI per call"):
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        with _use_tracking_uri(uri):
            yield
        return
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


@contextmanager
def _tracking_uri(uri: str):
    """MLflow's model logging reads the process-wide tracking URI: set it for the call, then restore it
    (and the MLFLOW_TRACKING_URI variable MLflow sets beside it)."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _set_tracking_uri(uri):
            yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def _model_name(run_name: str) -> str:
    return re.sub(r"[/:.%\"']", "-", run_name) + "-ema"  # MLflow's LoggedModel name rules


def log_ema_model(tracking_uri: str, run_id: str, run_name: str, checkpoint_uri: str, step: int, config_hash: str,
                  resolution: int, weights: str = "auto", copy_max_mb: float = 1024.0,
                  register_as: str = "", extra_tags: dict | None = None) -> LoggedEMA:
    """Log step-N's ema.pt as the run's LoggedModel (linked to the run at `step`); extra_tags: e.g. the
    weights the run started from (dip.init_from)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    store = CheckpointStore(checkpoint_uri)
    size_mb = store.fs.get_file_info(store.step_path(step, EMA_FILE)).size / 2 ** 20
    mode = weights_mode(weights, size_mb, copy_max_mb)
    model = load_referenced_ema(checkpoint_uri, step)  # the config (and, to copy, the weights)
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    tags = {"dip.checkpoint": store.display(step), "dip.config_hash": config_hash, "dip.step": str(step),
            "dip.weights": mode, "dip.ema_mb": f"{size_mb:.1f}", **(extra_tags or {})}
    params = {**{k: str(v) for k, v in asdict(model.config).items()}, "resolution": str(resolution)}
    logged = client.create_logged_model(experiment_id, name=_model_name(run_name), source_run_id=run_id,
                                        tags=tags, params=params, model_type="dip")
    to_pickle = model if mode == COPIED else ReferencedEMA(checkpoint_uri, step)
    code = tempfile.mkdtemp(prefix="dip-model-code-")
    try:
        code_paths = None
        if mode == COPIED:  # the package without its bytecode caches
            shutil.copytree(MODELS_PACKAGE, os.path.join(code, "models"),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            code_paths = [os.path.join(code, "models")]
        with _tracking_uri(tracking_uri):
            info = mlflow.pytorch.log_model(
                to_pickle, name=logged.name, model_id=logged.model_id, run_id=run_id, step=step,
                serialization_format="pickle", code_paths=code_paths,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],  # no inference subprocess
                registered_model_name=register_as or None)
    finally:
        shutil.rmtree(code, ignore_errors=True)
    version = getattr(info, "registered_model_version", None)
    return LoggedEMA(logged.model_id, f"models:/{logged.model_id}", mode, str(version) if version else None)


def log_final_model(cfg, tracking_uri: str, run_id: str, checkpoint_uri: str, step: int | None,
                    config_hash: str) -> LoggedEMA | None:
    """The driver's call at the end of a finished run: per cfg.tracking; a failure only warns."""
    if not (cfg.tracking.log_model and run_id) or step is None:
        return None
    try:
        logged = log_ema_model(tracking_uri, run_id, cfg.run_name, checkpoint_uri, step, config_hash,
                               cfg.data.resolution, cfg.tracking.model_weights, cfg.tracking.model_copy_max_mb,
                               cfg.tracking.register_model, extra_tags=_lineage(cfg))
    except Exception as err:  # tracking must never fail a finished run
        log.warning("the final EMA model was not logged to MLflow: %s: %s", type(err).__name__, err)
        return None
    registered = f", registered as {cfg.tracking.register_model} v{logged.registered_version}" \
        if logged.registered_version else ""
    log.info("MLflow model %s (EMA of step %d, weights: %s%s)", logged.model_uri, step, logged.weights, registered)
    return logged


def _lineage(cfg) -> dict:
    """The LoggedModel's record of a warm start (train.init_from); {} for a run trained from scratch."""
    if not cfg.train.init_from:
        return {}
    return {"dip.init_from": cfg.train.init_from, "dip.init_weights": cfg.train.init_weights}
