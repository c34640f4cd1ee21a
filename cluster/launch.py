"""The driver of a training run: Ray start/attach, resume planning, MLflow run, TorchTrainer.fit.

The driver owns nothing heavy: the config, the MLflow run, the checkpoint directory's listing and
(when enabled) the eval pool. Workers do all the training (trainer/worker.py).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace

from trainer.checkpoint_store import CheckpointStore, step_name
from trainer.config import TrainConfig, config_hash, flatten, resume_incompatibilities, to_dict, to_yaml

log = logging.getLogger("dip.launch")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Environment every worker gets from the driver (when set here).
FORWARDED_ENV = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT", "OMP_NUM_THREADS", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION")


@dataclass
class RunPaths:
    run_dir: str
    checkpoint_uri: str
    ray_storage: str
    tracking_uri: str
    artifact_dir: str | None


def run_paths(cfg: TrainConfig) -> RunPaths:
    from trainer.tracking import resolve_uri

    run_dir = cfg.run_dir
    if cfg.checkpoint.path:
        base = cfg.checkpoint.path.rstrip("/")
        checkpoint_uri = f"{base}/{cfg.run_name}" if "://" in base else os.path.join(os.path.abspath(base), cfg.run_name)
        ray_storage = f"{base}/ray" if "://" in base else os.path.join(os.path.abspath(base), "ray")
    else:
        checkpoint_uri = os.path.join(run_dir, "checkpoints")
        ray_storage = os.path.join(run_dir, "ray")
    tracking_uri = resolve_uri(cfg.tracking.uri, run_dir)
    artifact_dir = None if cfg.tracking.uri else os.path.join(run_dir, "mlartifacts")
    return RunPaths(run_dir, checkpoint_uri, ray_storage, tracking_uri, artifact_dir)


@dataclass
class ResumePlan:
    step: int | None = None
    mlflow_run_id: str | None = None
    notes: list[str] = field(default_factory=list)


def plan_resume(cfg: TrainConfig, store: CheckpointStore) -> ResumePlan:
    """Decide, before any worker starts, whether this run continues a checkpoint, and refuse clearly
    when it cannot (a different model shape, ZeRO stage or world size)."""
    from trainer.checkpoint import load_train_state

    latest = store.latest_committed(warn=True)
    if latest is None:
        return ResumePlan()
    where = store.display(latest)
    if cfg.checkpoint.resume == "never":
        raise FileExistsError(f"run {cfg.run_name!r} already has a committed checkpoint ({where}) and "
                              "checkpoint.resume=never: choose another run_name, or delete the checkpoints")
    state = load_train_state(store, latest)
    problems = resume_incompatibilities(state["config"], cfg)
    saved_world = int(state["world_size"])
    if saved_world != cfg.cluster.num_workers and cfg.train.zero_stage != 0:
        problems.append(f"cluster.num_workers was {saved_world}, now {cfg.cluster.num_workers}: ZeRO-"
                        f"{cfg.train.zero_stage} optimizer shards resume only on the same world size (ZeRO-0 resumes on any)")
    if problems:
        raise ValueError(f"cannot resume run {cfg.run_name!r} from {where}: " + "; ".join(problems)
                         + ". Use another run_name to start afresh.")
    notes = [f"resuming from {where} (step {state['step']})"]
    if state.get("config_hash") != config_hash(cfg):
        notes.append("the config changed since that checkpoint (compatible changes only)")
    return ResumePlan(latest, state.get("mlflow_run_id"), notes)


def _echo(text: str) -> None:
    print(text, flush=True)


def _start_ray(cfg: TrainConfig, echo=_echo) -> bool:
    """Start a local Ray cluster or attach to one. True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, include_dashboard=False)
        return True
    context = ray.init(num_cpus=cfg.cluster.num_cpus or os.cpu_count(), include_dashboard=cfg.cluster.dashboard,
                       dashboard_host="127.0.0.1", object_store_memory=cfg.cluster.object_store_mb << 20,
                       _node_ip_address="127.0.0.1")
    if cfg.cluster.dashboard and context.dashboard_url:
        echo(f"ray dashboard: http://{context.dashboard_url}")
    return True


def _worker_env() -> dict[str, str]:
    from trainer import faults

    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.update(faults.forwarded_env())
    # the workers import our packages from this checkout when it is not pip-installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return env


@dataclass
class RunSummary:
    run_name: str
    status: str                      # FINISHED | STOPPED | FAILED
    steps: int
    seconds: float
    checkpoint_dir: str
    last_checkpoint: str | None
    tracking_uri: str
    mlflow_run_id: str
    sample_grid: str | None
    metrics: dict = field(default_factory=dict)


class _StopOnSignal:
    """SIGTERM / first Ctrl-C: ask the workers (through the checkpoint store) to checkpoint and stop."""

    def __init__(self, store: CheckpointStore):
        self.store = store
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C aborts without waiting
        self.requested = True
        _echo(f"dip train: {signal.Signals(signum).name}: asking the workers to checkpoint and stop "
              "(Ctrl-C again to abort)")
        self.store.request_stop()

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def launch(cfg: TrainConfig, echo=_echo) -> RunSummary:
    """Run (or resume) a training run to its end. Blocks; returns where everything is."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    import data
    from trainer.eval_hook import EvalHook
    from trainer.logged_model import log_final_model
    from trainer.tracking import RunLogger, finish_run, git_commit, open_run
    from trainer.worker import train_loop_per_worker

    started = time.monotonic()
    paths = run_paths(cfg)
    os.makedirs(paths.run_dir, exist_ok=True)
    store = CheckpointStore(paths.checkpoint_uri)
    store.clear_stop_request()  # a stale request of an earlier, stopped attempt
    plan = plan_resume(cfg, store)

    echo(f"dip train: run {cfg.run_name!r} in {paths.run_dir}")
    echo(f"batch: {cfg.batch_arithmetic()}")
    echo("resolved config:\n" + "\n".join("  " + line for line in to_yaml(cfg).splitlines()))
    for note in plan.notes:
        echo(f"dip train: {note}")
    with open(os.path.join(paths.run_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))

    data_cfg = data.prepare_dataset(cfg.data, os.path.join(paths.run_dir, "data"))
    run_cfg = replace(cfg, data=data_cfg)  # the workers read the prepared shards

    device_kind = "cuda" if cfg.cluster.use_gpu else "cpu"
    tags = {"git_commit": git_commit(REPO_ROOT), "world_size": str(cfg.cluster.num_workers),
            "zero_stage": str(cfg.train.zero_stage), "device_kind": device_kind, "config_hash": config_hash(cfg),
            "precision": cfg.train.precision}
    run_id = open_run(paths.tracking_uri, cfg.tracking.experiment, cfg.run_name, flatten(cfg), tags,
                      paths.artifact_dir, plan.mlflow_run_id)
    driver_log = RunLogger(paths.tracking_uri, run_id)
    driver_log.log_artifact(os.path.join(paths.run_dir, "config.yaml"),
                            "config" if plan.step is None else f"config/resume-{step_name(plan.step)}")

    started_ray = _start_ray(cfg, echo)
    eval_hook = None
    status, result, error = "FAILED", None, None
    try:
        eval_hook = EvalHook(cfg, store, driver_log)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": to_dict(run_cfg),
                               "context": {"checkpoint_uri": paths.checkpoint_uri, "run_dir": paths.run_dir,
                                           "tracking_uri": paths.tracking_uri, "mlflow_run_id": run_id,
                                           "config_hash": config_hash(cfg), "progress_bar": sys.stdout.isatty()}},
            torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
                                         resources_per_worker={"CPU": cfg.cluster.cpus_per_worker}),
            run_config=RunConfig(name=cfg.run_name, storage_path=paths.ray_storage,
                                 failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
                                 worker_runtime_env={"env_vars": _worker_env()}),
        )
        outcome: dict = {}

        def fit() -> None:
            try:
                outcome["result"] = trainer.fit()
            except BaseException as err:  # re-raised in the driver's thread below
                outcome["error"] = err

        with _StopOnSignal(store) as stopper:
            runner = threading.Thread(target=fit, name="dip-fit", daemon=True)
            runner.start()
            while runner.is_alive():
                runner.join(timeout=1.0)
                eval_hook.poll()
        if "error" in outcome:
            error = outcome["error"]
            raise error
        result = outcome["result"]
        metrics = dict(result.return_value or {})
        status = "STOPPED" if (metrics.get("stopped") or stopper.requested) else "FINISHED"
    finally:
        if eval_hook is not None:
            eval_hook.close(wait_s=0.0 if error else 600.0)
        store.clear_stop_request()
        latest = store.latest_committed(warn=False)
        if status != "FAILED":
            _write_model_card(cfg, paths, run_id, latest, result, driver_log)
        if status == "FINISHED":  # a stopped run goes on later: its final model comes then
            log_final_model(cfg, paths.tracking_uri, run_id, paths.checkpoint_uri, latest, config_hash(cfg))
        driver_log.close(cfg.tracking.flush_timeout_s)
        finish_run(paths.tracking_uri, run_id, {"FINISHED": "FINISHED", "STOPPED": "KILLED"}.get(status, "FAILED"))
        if started_ray:
            ray.shutdown()
    metrics = dict(result.return_value or {}) if result is not None else {}
    summary = RunSummary(cfg.run_name, status, int(metrics.get("step", 0)), time.monotonic() - started,
                         store.display(), store.display(latest) if latest is not None else None,
                         paths.tracking_uri, run_id, metrics.get("sample_grid"), metrics)
    echo(format_summary(summary))
    return summary


def _write_model_card(cfg: TrainConfig, paths: RunPaths, run_id: str, latest: int | None, result, tracker) -> None:
    metrics = dict(result.return_value or {}) if result is not None else {}
    card = os.path.join(paths.run_dir, "MODEL_CARD.md")
    params = metrics.get("num_params")
    lines = [f"# {cfg.model.name}: run {cfg.run_name}", "",
             "Pixel-space diffusion (DiP: DiT backbone on big patches + Patch Detailer Head), flow matching.", "",
             f"- parameters: {params:,}" if isinstance(params, int) else "- parameters: unknown",
             f"- classes: {cfg.model.num_classes}, resolution: {cfg.data.resolution} px",
             f"- steps: {metrics.get('step', 'unknown')}, {cfg.batch_arithmetic()}",
             f"- optimizer: AdamW lr {cfg.optim.lr}, EMA decay {cfg.optim.ema_decay}, "
             f"ZeRO-{cfg.train.zero_stage}, {cfg.train.precision}",
             f"- final loss (last logging interval): {metrics.get('last_loss', 'unknown')}",
             f"- checkpoint: {paths.checkpoint_uri}/{step_name(latest) if latest is not None else '(none)'} "
             "(ema.pt is the sampling model)",
             f"- data: {cfg.data.path}", f"- config hash: {config_hash(cfg)}", f"- MLflow run: {run_id}", ""]
    with open(card, "w") as f:
        f.write("\n".join(lines))
    tracker.log_artifact(card)


def format_summary(s: RunSummary) -> str:
    ui = (f"mlflow ui --backend-store-uri {s.tracking_uri} --host 127.0.0.1 --port 5000"
          if s.tracking_uri.startswith("sqlite") else s.tracking_uri)
    lines = [f"=== dip train: run {s.run_name!r} {s.status.lower()} after {s.steps} steps in {s.seconds:.0f} s ===",
             f"checkpoints : {s.checkpoint_dir}",
             f"newest      : {s.last_checkpoint or '(none committed)'}",
             f"mlflow run  : {s.mlflow_run_id} in {s.tracking_uri}",
             f"mlflow ui   : {ui}",
             f"sample grid : {s.sample_grid or '(none)'}"]
    if s.metrics.get("last_loss") is not None:
        lines.append(f"final loss  : {s.metrics['last_loss']:.4f}")
    if s.status == "STOPPED":
        lines.append("stopped on request: run the same command again to resume")
    return "\n".join(lines)

