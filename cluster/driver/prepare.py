"""The first phase of a run, before Ray starts: where everything goes (run dir, checkpoints, Ray's
storage, MLflow), the resume decision, the resolved config on disk and the prepared shards."""
from __future__ import annotations

import os
from dataclasses import dataclass

from cluster.driver.report import echo as _echo
from cluster.driver.resume import ResumePlan, plan_resume
from trainer.checkpoint.store import CheckpointStore
from trainer.config import TrainConfig, to_yaml

# this checkout: cluster/driver/prepare.py -> the repository root
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
class PreparedRun:
    """Everything decided before Ray starts: where things go, what resumes, the workers' config."""
    cfg: TrainConfig                 # the user's config
    worker_cfg: TrainConfig          # the same, with data.path pointing at prepared shards
    paths: RunPaths
    store: CheckpointStore
    plan: ResumePlan
    init: object = None              # trainer.checkpoint.init_from.InitSource: train.init_from, when it is loaded


def prepare_run(cfg: TrainConfig, echo=_echo) -> PreparedRun:
    """Paths, resume decision (refused clearly before anything starts), the config on disk, the shards."""
    import data

    paths = run_paths(cfg)
    os.makedirs(paths.run_dir, exist_ok=True)
    store = CheckpointStore(paths.checkpoint_uri)
    store.clear_stop_request()  # stale requests of an earlier, stopped attempt
    store.clear_resize_request()
    plan = plan_resume(cfg, store)
    from trainer.checkpoint.init_from import plan_init  # a source that does not fit is refused before Ray starts

    init, init_notes = plan_init(cfg, store.display(plan.step) if plan.step is not None else None)
    echo(f"dip train: run {cfg.run_name!r} in {paths.run_dir}")
    echo(f"batch: {cfg.batch_arithmetic()}")
    if cfg.cluster.elastic:
        echo(f"elastic: {cfg.cluster.min_workers} to {cfg.cluster.max_workers} workers; the global batch of "
             f"{cfg.global_batch} is kept at every size (the accumulation is re-solved at each restart)")
    echo("resolved config:\n" + "\n".join("  " + line for line in to_yaml(cfg).splitlines()))
    for note in plan.notes + init_notes:
        echo(f"dip train: {note}")
    with open(os.path.join(paths.run_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    data_cfg = data.prepare_dataset(cfg.data, os.path.join(paths.run_dir, "data"))
    return PreparedRun(cfg, cfg.replace(data=data_cfg), paths, store, plan, init)
