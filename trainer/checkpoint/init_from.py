"""Start a new run from trained weights: `train.init_from` / `train.init_weights`.

The source is anything trainer.model_io loads for sampling (and is resolved and checksum-verified the
same way): a committed step-N/, a checkpoints directory (its newest step whose ema.pt verifies), a
`dip export` file (ours or `--official`) or the authors' released checkpoint. `train.init_weights`
picks the EMA (default) or the raw weights; raw from a step-N/ are the ZeRO shards consolidated as
`dip export --weights model` does it.

Only model weights are taken: the run starts at step 0 with a fresh optimizer, LR schedule and data
position, and its EMA starts from the loaded weights. Allowed differences from the new run's model:
- the resolution (at the same patch size): DiP has no absolute position embedding, its rotary positions
  span the grid whatever its size, so no tensor depends on it;
- the class count: the label table (LABEL_TABLE) is re-initialised for the new classes; the trained
  null row (the unconditional embedding classifier-free guidance uses) moves to the new null index;
- a REPA projector present on one side only: initialised fresh, or dropped (a warning each).
Any other shape difference is refused, naming every tensor with both shapes: by the driver before Ray
starts (`plan_init`), and again by the worker that loads (`initialise_module`).

A run that already has committed checkpoints of its own resumes from them and ignores init_from (and
says so): a re-run after a crash, or Ray's restart of a killed worker group, never starts over.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

log = logging.getLogger("dip.init_from")

LABEL_TABLE = "y_embedder.embedding_table.weight"
DENOISER, PROJECTOR = "denoiser.", "repa_projector."


class InitMismatch(ValueError):
    """The source's tensors do not fit the new run's model beyond the allowed differences."""


@dataclass(frozen=True)
class InitSource:
    """Where a run's starting weights come from, resolved and verified."""
    path: str                         # train.init_from as configured
    file: str                         # the weights file read (a step's ema.pt, an export, the authors' file)
    kind: str                         # "step" (a committed step-N/), "export" (ours) or "official"
    weights: str                      # "ema" or "raw"
    step_dir: str | None = None       # the committed step-N/ (kind "step")
    parent_run_id: str | None = None  # the MLflow run that wrote the step (its train_state.pt records it)

    def describe(self) -> str:
        where = self.step_dir if self.step_dir else self.file
        return f"{self.weights} weights of {where} ({self.kind})"


def resolve_init_source(path: str, weights: str) -> InitSource:
    """The verified source of `path` (FileNotFoundError / ValueError naming train.init_from otherwise)."""
    from trainer.checkpoint.store import TRAIN_STATE
    from trainer.model_io import EMA_FILE, read_checkpoint, committed_step, resolve_checkpoint_path, verify_committed

    try:
        file = resolve_checkpoint_path(path)  # a checkpoints dir: the newest step whose ema.pt verifies
    except FileNotFoundError as err:
        raise FileNotFoundError(f"train.init_from={path!r}: {err}") from None
    step_dir = os.path.dirname(os.path.abspath(file))
    found = committed_step(step_dir) if os.path.basename(file) == EMA_FILE else None
    if found is not None:
        store, step = found
        verify_committed(step_dir, store.marker_files(step) if weights == "raw" else [TRAIN_STATE])
        state = read_checkpoint(os.path.join(step_dir, TRAIN_STATE), mmap=True)
        return InitSource(path, file, "step", weights, step_dir, state.get("mlflow_run_id") or None)
    checkpoint = read_checkpoint(file, mmap=True)
    kind = "export" if "model_config" in checkpoint else "official"
    if kind == "export" and weights == "raw":
        raise ValueError(f"train.init_weights=raw: {file!r} is a `dip export` file and holds one set of weights; "
                         "use train.init_weights=ema, a step-N/ directory, or a `dip export --official` file")
    return InitSource(path, file, kind, weights)


def read_source_weights(source: InitSource, shapes_only: bool = False) -> tuple[dict, dict]:
    """(DiP state dict, REPA projector state dict, {} when it has none) of the source. shapes_only: the
    tensors stay on disk (mmap), and raw step weights are described by the step's EMA (same shapes)."""
    from models.official import network_state
    from trainer.model_io import read_checkpoint, consolidated_weights

    if source.kind == "step" and source.weights == "raw" and not shapes_only:
        full = consolidated_weights(source.step_dir)
        return _strip(full, DENOISER), _strip(full, PROJECTOR)
    checkpoint = read_checkpoint(source.file, mmap=shapes_only)
    if "model_config" in checkpoint:  # ema.pt of a step, or our export
        return dict(checkpoint["state_dict"]), {}
    try:
        return network_state(checkpoint, ema=source.weights == "ema"), {}
    except ValueError as err:
        raise ValueError(f"train.init_from={source.path!r} with train.init_weights={source.weights}: {err}") from None


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@dataclass
class Adaptation:
    """How the source's DiP tensors map onto the new model: what was re-initialised, and why."""
    relabel: tuple[int, int] | None = None   # (source classes, new classes): the label table is re-initialised
    warnings: list[str] = field(default_factory=list)


def compare_shapes(source: dict, target: dict, path: str) -> Adaptation:
    """The allowed differences between two DiP state dicts (values: tensors or shapes); InitMismatch
    listing every other one (tensor names, both shapes)."""
    shape = {k: tuple(v.shape if hasattr(v, "shape") else v) for k, v in source.items()}
    want = {k: tuple(v.shape if hasattr(v, "shape") else v) for k, v in target.items()}
    missing = sorted(set(want) - set(shape))
    unexpected = sorted(set(shape) - set(want))
    adaptation = Adaptation()
    misshaped = []
    for key in sorted(set(want) & set(shape)):
        if shape[key] == want[key]:
            continue
        if key == LABEL_TABLE and shape[key][1:] == want[key][1:]:
            adaptation.relabel = (shape[key][0] - 1, want[key][0] - 1)
            adaptation.warnings.append(
                f"{LABEL_TABLE}: the source has {shape[key][0] - 1} classes, this run {want[key][0] - 1}: the class "
                f"rows are re-initialised and the trained null-label row kept (as row {want[key][0] - 1})")
            continue
        misshaped.append(f"{key}: source {shape[key]} vs model {want[key]}")
    if missing or unexpected or misshaped:
        lines = [f"{title} ({len(keys)}): " + ", ".join(keys)
                 for title, keys in (("mis-shaped", misshaped), ("missing from the source", missing),
                                     ("not in the model", unexpected)) if keys]
        hint = ""
        if "s_embedder.proj.weight" in " ".join(misshaped):
            hint = " (a different patch size or width: only the resolution at the same patch size may change)"
        raise InitMismatch(f"train.init_from={path!r} does not fit this run's model{hint}; only the resolution and "
                           "the class count may differ:\n  " + "\n  ".join(lines))
    return adaptation


def _target_shapes(cfg) -> dict:
    """The new run's DiP tensor shapes, without allocating its weights."""
    from models import DiP

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in DiP(cfg.model.dip_config()).state_dict().items()}


def plan_init(cfg, resuming_from: str | None) -> tuple[InitSource | None, list[str]]:
    """The driver's check, before any worker starts: (the source, or None when nothing is loaded; notes
    for the log). A source that does not fit the model is refused here (InitMismatch)."""
    if not cfg.train.init_from:
        return None, []
    if resuming_from is not None:
        return None, [ignored_note(cfg.train.init_from, resuming_from)]
    source = resolve_init_source(cfg.train.init_from, cfg.train.init_weights)
    adaptation = compare_shapes(read_source_weights(source, shapes_only=True)[0], _target_shapes(cfg),
                                cfg.train.init_from)
    notes = [f"initialising from {source.describe()}: a new run at step 0 (fresh optimizer, LR schedule and "
             "data position; the EMA starts from these weights)"] + [f"warning: {w}" for w in adaptation.warnings]
    return source, notes


def ignored_note(init_from: str, resuming_from: str) -> str:
    return (f"train.init_from={init_from!r} ignored: the run resumes from its own checkpoint {resuming_from} "
            "(init_from only starts a new run)")


def load_into(module, source: InitSource) -> list[str]:
    """Load the source into a freshly built objective module (trainer.loop.engine.DiffusionObjective),
    adapting the allowed differences. Returns the warnings (InitMismatch for anything else)."""
    state, projector = read_source_weights(source)
    denoiser = module.denoiser
    target = denoiser.state_dict()
    adaptation = compare_shapes(state, target, source.path)
    if adaptation.relabel is not None:  # fresh class rows (the model's own init), the trained null row last
        table = target[LABEL_TABLE].clone()
        table[-1] = state[LABEL_TABLE][-1].to(table.dtype)
        state = {**state, LABEL_TABLE: table}
    denoiser.load_state_dict(state, strict=True)
    warnings = list(adaptation.warnings)
    own = getattr(module, "repa_projector", None)
    if own is not None and not projector:
        warnings.append("repa_projector: the source has no REPA projector (EMA weights never hold one): "
                        "initialised fresh")
    elif own is None and projector:
        warnings.append(f"repa_projector: this run has no REPA (objective.repa_encoder is off): the source's "
                        f"{len(projector)} projector tensors are dropped")
    elif own is not None:
        mine = {k: tuple(v.shape) for k, v in own.state_dict().items()}
        if mine == {k: tuple(v.shape) for k, v in projector.items()}:
            own.load_state_dict(projector, strict=True)
        else:
            warnings.append("repa_projector: the source's projector has other shapes (another REPA encoder): "
                            "initialised fresh")
    return warnings


def initialise_module(module, cfg, checkpoint_uri: str, rank: int) -> InitSource | None:
    """The worker's call, on the freshly built module before the EMA and the engine copy it. Nothing
    happens without train.init_from, or when the run has committed checkpoints of its own (it resumes
    from them: said in the log)."""
    if not cfg.train.init_from:
        return None
    from trainer.checkpoint.store import CheckpointStore

    store = CheckpointStore(checkpoint_uri)
    own = store.latest_committed(warn=False) if cfg.checkpoint.resume == "auto" else None
    if own is not None:
        if rank == 0:
            log.info(ignored_note(cfg.train.init_from, store.display(own)))
        return None
    source = resolve_init_source(cfg.train.init_from, cfg.train.init_weights)
    warnings = load_into(module, source)
    if rank == 0:
        log.info("initialised from %s: step 0, fresh optimizer and data position", source.describe())
        for warning in warnings:
            log.warning("train.init_from: %s", warning)
    return source


def tracking_items(source: InitSource | None) -> tuple[dict[str, str], dict[str, str]]:
    """(MLflow params, MLflow tags) recording where a run's weights came from."""
    if source is None:
        return {}, {}
    params = {"init_from.source": source.step_dir or os.path.abspath(source.file), "init_from.kind": source.kind}
    tags = {"init_from": source.describe()}
    if source.parent_run_id:
        tags["init_from.parent_run_id"] = source.parent_run_id
    return params, tags
