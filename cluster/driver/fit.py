"""The run phase: the run's MLflow run, Ray Train's TorchTrainer (fixed or elastic scaling) and its
fit(), polled by the driver for the eval pool and the stop grace period."""
from __future__ import annotations

import os
import sys
import threading
import uuid

from cluster.driver.prepare import REPO_ROOT, PreparedRun
from cluster.driver.ray_start import worker_env
from cluster.driver.report import echo as _echo
from cluster.driver.signals import StopOnSignal
from trainer.checkpoint.store import step_name
from trainer.config import config_hash, flatten, to_dict


def open_tracking(run: PreparedRun):
    """The run's MLflow run (reopened on resume) and the driver's background logger."""
    from trainer.checkpoint.init_from import tracking_items
    from trainer.tracking.run_logger import RunLogger, git_commit, open_run

    cfg = run.cfg
    tags = {"git_commit": git_commit(REPO_ROOT), "zero_stage": str(cfg.train.zero_stage),
            "device_kind": "cuda" if cfg.cluster.use_gpu else "cpu", "config_hash": config_hash(cfg),
            "precision": cfg.train.precision, "global_batch": str(cfg.global_batch),
            "workers": str(cfg.cluster.num_workers if not cfg.cluster.elastic else list(cfg.cluster.num_workers))}
    init_params, init_tags = tracking_items(run.init)  # where the starting weights came from
    run_id = open_run(run.paths.tracking_uri, cfg.tracking.experiment, cfg.run_name, {**flatten(cfg), **init_params},
                      {**tags, **init_tags}, run.paths.artifact_dir, run.plan.mlflow_run_id)
    driver_log = RunLogger(run.paths.tracking_uri, run_id)
    driver_log.log_artifact(os.path.join(run.paths.run_dir, "config.yaml"),
                            "config" if run.plan.step is None else f"config/resume-{step_name(run.plan.step)}")
    return run_id, driver_log


def build_trainer(run: PreparedRun, run_id: str):
    """Ray Train's TorchTrainer: fixed or elastic scaling, restarts on failure, our worker loop."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainer.loop.run import train_loop_per_worker

    cfg, paths = run.cfg, run.paths
    scaling = {"num_workers": cfg.cluster.num_workers, "use_gpu": cfg.cluster.use_gpu,
               "resources_per_worker": {"CPU": cfg.cluster.cpus_per_worker}}
    callbacks, trainer_cls = [], TorchTrainer
    if cfg.cluster.elastic:
        from cluster.driver.elastic import checkpoint_before_grow_policy, trainer_with_policy

        scaling["elastic_resize_monitor_interval_s"] = cfg.cluster.resize_check_s
        trainer_cls = trainer_with_policy(TorchTrainer, lambda scaling_config: checkpoint_before_grow_policy(
            scaling_config, paths.checkpoint_uri, timeout_s=cfg.checkpoint.commit_timeout_s))
    return trainer_cls(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(run.worker_cfg),
                           "context": {"checkpoint_uri": paths.checkpoint_uri, "run_dir": paths.run_dir,
                                       "tracking_uri": paths.tracking_uri, "mlflow_run_id": run_id,
                                       "config_hash": config_hash(cfg), "progress_bar": sys.stdout.isatty(),
                                       "launch_id": uuid.uuid4().hex}},  # one per `dip train` (the rollback budget)
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
        scaling_config=ScalingConfig(**scaling),
        run_config=RunConfig(name=cfg.run_name, storage_path=paths.ray_storage,
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
                             worker_runtime_env={"env_vars": worker_env()}, callbacks=callbacks),
    )


def fit_until_done(trainer, stopper: StopOnSignal, eval_hook) -> tuple[object, bool]:
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
