"""The driver of a training run: Ray start/attach, resume planning, MLflow run, TorchTrainer.fit.

The driver owns nothing heavy: the config, the MLflow run, the checkpoint directory's listing and
(when enabled) the eval pool. Workers do all the training (trainer/loop/worker.py).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace

from trainer.checkpoint.store import CheckpointStore, step_name
from trainer.config.sections import TrainConfig, config_hash, flatten, resume_incompatibilities, to_dict, to_yaml

log = logging.getLogger("dip.launch")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Environment every worker gets from the driver (when set here). Never credentials: Ray shows a
# runtime_env in its dashboard and stores it; workers get theirs from their node (instance role,
# pod secret, ~/.aws, or the environment `ray start` ran in): docs/cluster.md, "Credentials".
FORWARDED_ENV = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT", "OMP_NUM_THREADS", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL",
                 "AWS_DEFAULT_REGION", "AWS_REGION")


@dataclass
class RunPaths:
    run_dir: str
    checkpoint_uri: str
    ray_storage: str
    tracking_uri: str
    artifact_dir: str | None


def run_paths(cfg: TrainConfig) -> RunPaths:
    from trainer.tracking.run_logger import resolve_uri

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
    when it cannot (a different model shape, ZeRO stage or global batch). Another world size is fine:
    the workers re-partition the ZeRO state and the data (trainer.checkpoint.manager)."""
    from trainer.checkpoint.manager import load_train_state

    # the marker (sizes) and the train state only: the workers checksum every file as they load it and
    # fall back together to the previous step if one fails (trainer.checkpoint.manager)
    latest = store.latest_committed(warn=True)
    if latest is None:
        return ResumePlan()
    where = store.display(latest)
    if cfg.checkpoint.resume == "never":
        raise FileExistsError(f"run {cfg.run_name!r} already has a committed checkpoint ({where}) and "
                              "checkpoint.resume=never: choose another run_name, or delete the checkpoints")
    state = load_train_state(store, latest, store.read_marker(latest))
    problems = resume_incompatibilities(state["config"], cfg)
    if problems:
        raise ValueError(f"cannot resume run {cfg.run_name!r} from {where}: " + "; ".join(problems)
                         + ". Use another run_name to start afresh.")
    notes = [f"resuming from {where} (step {state['step']}, written by {state['world_size']} workers)"]
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


EVAL_WAIT_S = 600.0           # a run that ended well waits this long for its last eval
STOP_GRACE_ENV = ("DIP_STOP_GRACE_S", "RAY_JOB_STOP_WAIT_TIME_S")  # the second: what `dip jobs stop` gives
DEFAULT_STOP_GRACE_S = 30.0   # SIGTERM to SIGKILL of Kubernetes (terminationGracePeriodSeconds) and Slurm (KillWait)


def stop_grace_s(signum: int) -> float | None:
    """Seconds between a stop signal and the SIGKILL that follows it: $DIP_STOP_GRACE_S, else a Ray job's
    $RAY_JOB_STOP_WAIT_TIME_S (`dip submit --stop-grace-s`), else 30 s after a SIGTERM; None after an
    interactive Ctrl-C (nothing kills the driver then)."""
    for name in STOP_GRACE_ENV:
        try:
            return max(0.0, float(os.environ.get(name, "")))
        except ValueError:
            continue
    return DEFAULT_STOP_GRACE_S if signum == signal.SIGTERM else None


class _StopOnSignal:
    """SIGTERM / first Ctrl-C: ask the workers (through the checkpoint store) to checkpoint and stop.
    A second Ctrl-C aborts: KeyboardInterrupt wherever the driver waits, `aborted` set.

    A stop signal is followed by SIGKILL once its grace period is over (stop_grace_s): from the signal
    on, every wait of the driver is cut to what is left (`budget`), keeping a reserve for what must
    land before the kill: the model card, the last MLflow flush and the run's end status. During the
    driver's last waits (`interruptible`: the eval, the flush) any signal cuts the wait short."""

    FINISH_RESERVE_S = 15.0  # covers the card, the flush, the status, Ray's shutdown and the exit

    def __init__(self, store: CheckpointStore):
        self.store = store
        self.requested = False
        self.aborted = False
        self.deadline: float | None = None  # time.monotonic() of the expected SIGKILL
        self.reserve = 0.0
        self._previous = {}
        self._in_wait = False

    def install(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self._in_wait:  # training is over: a signal only cuts the last waits short
            self._start_grace(signum)
            raise KeyboardInterrupt
        if self.requested and signum == signal.SIGINT:
            self.aborted = True
            raise KeyboardInterrupt  # a second Ctrl-C aborts without waiting
        if self.requested:
            return  # a repeated SIGTERM: already stopping
        self.requested = True
        grace = self._start_grace(signum)
        _echo(f"dip train: {signal.Signals(signum).name}: asking the workers to checkpoint and stop"
              + (f" within the {grace:g} s grace period" if grace is not None else "") + " (Ctrl-C again to abort)")
        self.store.request_stop()

    def _start_grace(self, signum: int) -> float | None:
        grace = stop_grace_s(signum)
        if grace is not None and self.deadline is None:
            self.deadline = time.monotonic() + grace
            self.reserve = min(self.FINISH_RESERVE_S, grace / 3)
        return grace

    def budget(self, wanted: float, keep: float | None = None) -> float:
        """`wanted` seconds of waiting, cut to what the grace period leaves after `keep` (the reserve)."""
        if self.deadline is None:
            return wanted
        keep = self.reserve if keep is None else keep
        return max(0.0, min(wanted, self.deadline - time.monotonic() - keep))

    def out_of_time(self) -> bool:
        """Only the reserve is left of the grace period."""
        return self.deadline is not None and self.budget(1.0) <= 0.0

    def interruptible(self, wait, instead) -> None:
        """A bounded wait that a signal cuts short: then `instead` runs, which must not wait."""
        self._in_wait = True
        try:
            wait()
            return
        except KeyboardInterrupt:
            _echo("dip train: signal: not waiting any longer")
        finally:
            self._in_wait = False
        instead()


@dataclass
class PreparedRun:
    """Everything decided before Ray starts: where things go, what resumes, the workers' config."""
    cfg: TrainConfig                 # the user's config
    worker_cfg: TrainConfig          # the same, with data.path pointing at prepared shards
    paths: RunPaths
    store: CheckpointStore
    plan: ResumePlan


def prepare_run(cfg: TrainConfig, echo=_echo) -> PreparedRun:
    """Paths, resume decision (refused clearly before anything starts), the config on disk, the shards."""
    import data

    paths = run_paths(cfg)
    os.makedirs(paths.run_dir, exist_ok=True)
    store = CheckpointStore(paths.checkpoint_uri)
    store.clear_stop_request()  # stale requests of an earlier, stopped attempt
    store.clear_resize_request()
    plan = plan_resume(cfg, store)
    echo(f"dip train: run {cfg.run_name!r} in {paths.run_dir}")
    echo(f"batch: {cfg.batch_arithmetic()}")
    if cfg.cluster.elastic:
        echo(f"elastic: {cfg.cluster.min_workers} to {cfg.cluster.max_workers} workers; the global batch of "
             f"{cfg.global_batch} is kept at every size (the accumulation is re-solved at each restart)")
    echo("resolved config:\n" + "\n".join("  " + line for line in to_yaml(cfg).splitlines()))
    for note in plan.notes:
        echo(f"dip train: {note}")
    with open(os.path.join(paths.run_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    data_cfg = data.prepare_dataset(cfg.data, os.path.join(paths.run_dir, "data"))
    return PreparedRun(cfg, replace(cfg, data=data_cfg), paths, store, plan)


def open_tracking(run: PreparedRun):
    """The run's MLflow run (reopened on resume) and the driver's background logger."""
    from trainer.tracking.run_logger import RunLogger, git_commit, open_run

    cfg = run.cfg
    tags = {"git_commit": git_commit(REPO_ROOT), "zero_stage": str(cfg.train.zero_stage),
            "device_kind": "cuda" if cfg.cluster.use_gpu else "cpu", "config_hash": config_hash(cfg),
            "precision": cfg.train.precision, "global_batch": str(cfg.global_batch),
            "workers": str(cfg.cluster.num_workers if not cfg.cluster.elastic else list(cfg.cluster.num_workers))}
    run_id = open_run(run.paths.tracking_uri, cfg.tracking.experiment, cfg.run_name, flatten(cfg), tags,
                      run.paths.artifact_dir, run.plan.mlflow_run_id)
    driver_log = RunLogger(run.paths.tracking_uri, run_id)
    driver_log.log_artifact(os.path.join(run.paths.run_dir, "config.yaml"),
                            "config" if run.plan.step is None else f"config/resume-{step_name(run.plan.step)}")
    return run_id, driver_log


def build_trainer(run: PreparedRun, run_id: str):
    """Ray Train's TorchTrainer: fixed or elastic scaling, restarts on failure, our worker loop."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainer.loop.worker import train_loop_per_worker

    cfg, paths = run.cfg, run.paths
    scaling = {"num_workers": cfg.cluster.num_workers, "use_gpu": cfg.cluster.use_gpu,
               "resources_per_worker": {"CPU": cfg.cluster.cpus_per_worker}}
    callbacks = []
    if cfg.cluster.elastic:
        from cluster.driver.elastic import checkpoint_before_grow

        scaling["elastic_resize_monitor_interval_s"] = cfg.cluster.resize_check_s
        hook = checkpoint_before_grow(paths.checkpoint_uri, timeout_s=cfg.checkpoint.commit_timeout_s)
        callbacks += [hook] if hook is not None else []
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(run.worker_cfg),
                           "context": {"checkpoint_uri": paths.checkpoint_uri, "run_dir": paths.run_dir,
                                       "tracking_uri": paths.tracking_uri, "mlflow_run_id": run_id,
                                       "config_hash": config_hash(cfg), "progress_bar": sys.stdout.isatty()}},
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
        scaling_config=ScalingConfig(**scaling),
        run_config=RunConfig(name=cfg.run_name, storage_path=paths.ray_storage,
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
                             worker_runtime_env={"env_vars": _worker_env()}, callbacks=callbacks),
    )


def fit_until_done(trainer, stopper: _StopOnSignal, eval_hook) -> tuple[object, bool]:
    """trainer.fit() in a thread while the driver polls the eval pool (the stopper, installed, turns
    signals into stop requests). Returns (Ray's Result, whether a stop was requested); re-raises the
    fit's error here. A stop's grace period nearly over with the workers not done: (None, True)."""
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised in the driver's thread below
            outcome["error"] = err

    runner = threading.Thread(target=fit, name="dip-fit", daemon=True)
    runner.start()
    while runner.is_alive():
        runner.join(timeout=1.0)
        eval_hook.poll()
        if stopper.out_of_time():
            _echo("dip train: the stop grace period is almost over and the workers are not done: ending the "
                  "run with its newest committed checkpoint")
            return None, True
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"], stopper.requested


def launch(cfg: TrainConfig, echo=_echo) -> RunSummary:
    """Run (or resume) a training run to its end. Blocks; returns where everything is.
    prepare -> track -> start Ray -> fit (with the eval pool) -> close everything in `finally`."""
    import ray

    from trainer.eval.hook import EvalHook
    from trainer.tracking.logged_model import log_final_model
    from trainer.tracking.run_logger import finish_run

    started = time.monotonic()
    run = prepare_run(cfg, echo)
    run_id, driver_log = open_tracking(run)
    started_ray = _start_ray(cfg, echo)
    eval_hook = None
    status, result, error = "FAILED", None, None
    stopper = _StopOnSignal(run.store).install()  # kept through the `finally`: its waits stay interruptible
    try:
        eval_hook = EvalHook(cfg, run.store, driver_log)
        result, stop_requested = fit_until_done(build_trainer(run, run_id), stopper, eval_hook)
        metrics = dict(result.return_value or {}) if result is not None else {}
        if metrics.get("failed"):  # the workers stopped it (e.g. diverged): FAILED, with their reason
            from cluster.cli.main import TrainingFailed

            raise TrainingFailed(metrics["failed"])
        status = "STOPPED" if (metrics.get("stopped") or stop_requested) else "FINISHED"
    except KeyboardInterrupt:  # a second Ctrl-C: abort; only what takes no waiting is still done
        status = "ABORTED"
        raise
    except BaseException as err:
        error = err
        raise
    finally:
        # Every wait below is bounded by what is left of a stop's grace period, and a signal ends it.
        if eval_hook is not None:
            eval_wait = 0.0 if error is not None or status == "ABORTED" else stopper.budget(EVAL_WAIT_S)
            if eval_wait > 0 and eval_hook.pool is not None:
                echo(f"dip train: waiting up to {eval_wait:.0f} s for the last eval (Ctrl-C to skip it)")
            stopper.interruptible(lambda: eval_hook.close(wait_s=eval_wait), lambda: eval_hook.close(wait_s=0.0))
        run.store.clear_stop_request()
        latest = run.store.latest_committed(warn=False)
        if status in ("FINISHED", "STOPPED"):
            _write_model_card(cfg, run.paths, run_id, latest, result, driver_log)
        if status == "FINISHED":  # a stopped run goes on later: its final model comes then
            log_final_model(cfg, run.paths.tracking_uri, run_id, run.paths.checkpoint_uri, latest, config_hash(cfg))
        flush_s = stopper.budget(min(cfg.tracking.flush_timeout_s, 2.0 if status == "ABORTED" else float("inf")),
                                 keep=stopper.reserve / 5)
        stopper.interruptible(lambda: driver_log.close(flush_s), lambda: driver_log.close(0.0))
        finish_run(run.paths.tracking_uri, run_id,
                   {"FINISHED": "FINISHED", "STOPPED": "KILLED", "ABORTED": "KILLED"}.get(status, "FAILED"))
        stopper.restore()
        if started_ray:
            ray.shutdown()
    metrics = dict(result.return_value or {}) if result is not None else {}
    summary = RunSummary(cfg.run_name, status, int(metrics.get("step", 0)), time.monotonic() - started,
                         run.store.display(), run.store.display(latest) if latest is not None else None,
                         run.paths.tracking_uri, run_id, metrics.get("sample_grid"), metrics)
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

