"""The per-worker training run: one of these runs on every Ray Train rank.

Each rank builds the same DiP (same seed), wraps it in a DeepSpeed engine, streams its share of the
shards, and steps. Every rank keeps the EMA of what it holds (trainer.loop.training_ema: all of it on
rank 0 under ZeRO-0/1/2, every rank's partition under ZeRO-3); rank 0 logs to MLflow through a
background queue, draws sample grids and shows the progress bar.

`TrainingRun` composes the parts, each in its own module:
  set-up    split the global batch for this world size -> model, EMA, engine, loader -> resume
            (trainer.checkpoint.manager.CheckpointManager: the newest committed checkpoint, written at
            this world size or another)
  loop      step (trainer.loop.step) -> recovery from a non-finite step (trainer.loop.recovery: too many
            in a row roll back) -> interval report (trainer.loop.reporting) -> stop checks
            (trainer.loop.control) -> checkpoint -> sample grid
  close     the last checkpoint committed -> final grid -> summary -> tracker, monitor, loader closed
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer import faults
from trainer.checkpoint.init_from import initialise_module
from trainer.checkpoint.manager import CheckpointManager, RunIdentity, TrainProgress
from trainer.checkpoint.store import CheckpointStore, step_name
from trainer.config import TrainConfig, config_from_dict, config_hash, to_dict
from trainer.loop.control import StopControl, in_ray_train
from trainer.loop.recovery import NonFiniteRecovery
from trainer.loop.reporting import RunReporter
from trainer.loop.rng import seed_everything
from trainer.loop.step import OptimizerStep, StepOutcome
from trainer.loop.step_metrics import IntervalMeter
from trainer.tracking.goodput import GoodputLedger, newest, process_start_time, reported_state

log = logging.getLogger("dip.train")


@dataclass
class WorkerContext:
    """What the driver hands every rank besides the config."""
    checkpoint_uri: str
    run_dir: str
    tracking_uri: str
    mlflow_run_id: str
    config_hash: str = ""   # of the user's config (before the driver resolved data.path)
    # the driver's stdout is a terminal: rank 0 draws a progress bar there. Otherwise (a log file, a
    # pipe, a Ray job) the bar's redraws would be noise: the status line per log interval is the output
    progress_bar: bool = False
    # names one `dip train` invocation (the driver draws it): a Ray restart of the worker group keeps it, and
    # with it the rollback budget used so far (trainer.loop.recovery); a re-run of the command gets a new one
    launch_id: str = ""


def configure_logging() -> None:
    """The "dip" loggers at INFO to stdout, once per process (workers, and the `dip train` driver)."""
    root = logging.getLogger("dip")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


class TrainingRun:
    def __init__(self, cfg: TrainConfig, ctx: WorkerContext, rank: int, world_size: int):
        self.cfg, self.ctx, self.rank, self.world_size = cfg, ctx, rank, world_size
        self.is_main = rank == 0
        self.split = cfg.batch_split(world_size)  # this world size's share of the fixed global batch
        self.progress = TrainProgress()
        self.last_grid: str | None = None
        self.stop_reason = ""
        self.save_due = False      # a periodic checkpoint waits for a finite step (see _checkpoint_if_due)
        self.in_ray = in_ray_train()

    # ------------------------------------------------------------------------------------------
    #                                         set-up
    # ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from data import build_dataloader
        from trainer.loop.engine import build_engine, build_objective_module
        from trainer.loop.training_ema import build_training_ema

        cfg = self.cfg
        faults.record_pid(self.rank)
        seed_everything(cfg.train.seed)
        self.model_config = cfg.model.dip_config()
        module = build_objective_module(cfg)
        self.num_params = sum(p.numel() for p in module.denoiser.parameters())
        self.init_source = initialise_module(module, cfg, self.ctx.checkpoint_uri, self.rank)  # train.init_from
        # the EMA starts from the same initial weights as the model, before DeepSpeed shards or casts them
        self.ema = build_training_ema(module.denoiser, cfg.optim.ema_decay, cfg.train.zero_stage, self.rank,
                                      self.world_size)
        self.engine = build_engine(cfg, module, self.split)
        self.device = self.engine.device
        input_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.ema.to(self.device)
        self.loader = build_dataloader(cfg.data.replace(batch_size=self.split.micro_batch), self.rank,
                                       self.world_size)
        self.optimizer_step = OptimizerStep(self.engine, self.loader, self.ema, self.split, seed=cfg.train.seed,
                                            input_dtype=input_dtype, rank=self.rank, world_size=self.world_size)
        self.store = CheckpointStore(self.ctx.checkpoint_uri)
        identity = RunIdentity(to_dict(cfg), self.ctx.config_hash or config_hash(cfg), self.ctx.mlflow_run_id,
                               self.model_config)
        self.checkpoints = CheckpointManager(
            self.store, self.rank, self.world_size, self.split, engine=self.engine, loader=self.loader,
            progress=self.progress, ema=self.ema, identity=identity, zero_stage=cfg.train.zero_stage,
            keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
            commit_timeout_s=cfg.checkpoint.commit_timeout_s)
        resumed = self.checkpoints.resume(enabled=cfg.checkpoint.resume == "auto")
        self.resumed = resumed is not None
        # where the worker-seconds go (trainer.tracking.goodput); the resumed checkpoint's copy of it, if any
        self.goodput = GoodputLedger(self.world_size)
        self.goodput_restored = self.progress.goodput if resumed is not None else None
        self.reporter = RunReporter(cfg, self.ctx, rank=self.rank, world_size=self.world_size, split=self.split,
                                    progress=self.progress, engine=self.engine, loader=self.loader,
                                    goodput=self.goodput)
        self.reporter.start(resumed)
        self.recovery = NonFiniteRecovery(cfg, checkpoints=self.checkpoints, store=self.store, loader=self.loader,
                                          progress=self.progress, is_main=self.is_main, tracker=self.reporter.tracker,
                                          launch_id=self.ctx.launch_id)
        self.control = StopControl(self.store, self.checkpoints, self.progress, self.device, is_main=self.is_main,
                                   check_every=cfg.train.stop_check_every, max_steps=cfg.train.max_steps,
                                   in_ray=self.in_ray)
        dist.barrier()

    # ------------------------------------------------------------------------------------------
    #                           the parts the loop (and the tests) call
    # ------------------------------------------------------------------------------------------
    def train_step(self) -> StepOutcome:
        """One optimizer step over this rank's micro-batches: (mean loss, data-wait seconds, applied);
        applied is False, on every rank alike, when a loss or the gradient norm was not finite."""
        return self.optimizer_step(self.progress.step, self.checkpoints.attempt, self.progress.data_step)

    def save_checkpoint(self) -> float:
        self.save_due = False
        self.progress.goodput = self.goodput.state_dict(self.progress.step)  # saved with the checkpoint
        self.reporter.checkpoint_starts()
        blocked = self.checkpoints.save()
        self.goodput.add("checkpoint", blocked)
        self.reporter.checkpoint_saved(blocked)
        return blocked

    def log_interval(self, meter: IntervalMeter, loss_sum: torch.Tensor, loss_count: int, bar) -> None:
        """The figures of one log interval (collective; benchmarks/trainer.py wraps this to time intervals)."""
        self.reporter.log_interval(meter, loss_sum, loss_count, bar)

    def make_grid(self, name: str) -> str | None:
        """Collective (ZeRO-3 gathers the EMA for it): every rank calls it; rank 0 draws and saves."""
        from trainer.loop.sample_grid import sample_grid, save_grid

        started = time.perf_counter()
        model = self.ema.sampling_module()
        if not self.is_main:
            return None
        images = sample_grid(model, self.cfg.samples, self.cfg.data.resolution, self.device)
        del model  # under ZeRO-3 a whole fp32 copy built for this grid
        path = save_grid(images, self.cfg.samples.num_classes, os.path.join(self.ctx.run_dir, "samples", name))
        self.reporter.grid_saved(path)
        self.last_grid = path
        self.goodput.add("eval", time.perf_counter() - started)  # the loop waited on the grid
        return path

    def _skipped(self, loss: torch.Tensor) -> bool:
        """A skipped step; True when its streak ended the interval: rolled back (the goodput ledger then
        counts what the restore discarded, from the restored checkpoint's copy) or the run must stop."""
        started = time.perf_counter()
        ended = self.recovery.step_skipped(loss)
        if ended and not self.recovery.failure:
            self.goodput.rolled_back(self.progress.goodput, time.perf_counter() - started)
        return ended

    def begin_goodput(self) -> None:
        """The first step is next: rank 0 takes over what the former attempt left (its last report in MLflow
        or the checkpoint's copy, the newer) and charges the time since this process started."""
        previous = None
        if self.is_main and self.ctx.mlflow_run_id:
            previous = newest(reported_state(self.ctx.tracking_uri, self.ctx.mlflow_run_id), self.goodput_restored)
        elif self.is_main:
            previous = self.goodput_restored
        self.goodput.begin(process_start_time(), previous, self.goodput_restored)

    # ------------------------------------------------------------------------------------------
    #                                         the loop
    # ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, progress = self.cfg, self.progress
        bar = self.reporter.progress_bar(self.in_ray)
        meter = IntervalMeter()
        loss_sum, loss_count = torch.zeros((), device=self.device), 0
        self.begin_goodput()
        while progress.step < cfg.train.max_steps:
            started = time.perf_counter()
            loss, data_wait, applied = self.train_step()
            self.goodput.step(time.perf_counter() - started, data_wait, applied)
            progress.step += 1
            progress.samples_seen += cfg.global_batch
            if applied:
                self.recovery.step_applied()
                loss_sum += loss
                loss_count += 1
            elif self._skipped(loss):  # rolled back (progress.step is the checkpoint's again), or failed
                if self.recovery.failure:
                    break
                self.save_due = False  # a save put off during the streak was for a discarded step
                meter.reset()  # the interval's steps were discarded; the next one starts after the checkpoint
                loss_sum, loss_count = torch.zeros((), device=self.device), 0
                if bar is not None:
                    bar.n = progress.step
                continue
            meter.add(data_wait)
            if bar is not None:
                bar.update(1)
            if progress.step % cfg.train.log_every == 0 or progress.step == cfg.train.max_steps:
                self.log_interval(meter, loss_sum, loss_count, bar)
                meter.reset()
                loss_sum, loss_count = torch.zeros((), device=self.device), 0
            faults.after_step(progress.step, self.rank, self.world_size, self.resumed)
            stop = self.control.poll()
            self._checkpoint_if_due(stop)
            if cfg.samples.every_steps and progress.step % cfg.samples.every_steps == 0:
                self.make_grid(f"{step_name(progress.step)}.png")
            if self.control.ends_run(stop):
                self.stop_reason = "stop requested"
                break
            self.control.await_resize(stop)
        self._close(bar)
        return self.finish()

    def _checkpoint_if_due(self, stop: int) -> None:
        """At a preemption notice (once), a stop or resize request, or the periodic step."""
        step = self.progress.step
        if self.control.first_preemption(stop):
            log.warning("preemption notice: writing a checkpoint at step %d", step)
            self.save_checkpoint()
        elif self.control.checkpoint_requested(stop):
            self.save_checkpoint()
        elif step % self.cfg.checkpoint.every_steps == 0 or self.save_due:
            # never while non-finite steps are running: a rollback must find the state before them
            self.save_due = self.recovery.in_streak
            if not self.save_due:
                self.save_checkpoint()

    def _close(self, bar) -> None:
        """The last step checkpointed (unless the run failed) and committed before anyone reports done."""
        if self.checkpoints.last_saved_step != self.progress.step and not self.recovery.failure:
            self.save_checkpoint()
        self.checkpoints.close()
        dist.barrier()  # rank 0 has committed the last checkpoint before anyone reports done
        if bar is not None:
            bar.close()

    def finish(self) -> dict:
        failure = self.recovery.failure
        if not self.stop_reason and not failure:
            self.make_grid("final.png")
        summary = self.reporter.summary(
            stopped=bool(self.stop_reason), failure=failure, num_params=self.num_params,
            last_checkpoint=self.store.display(self.checkpoints.last_committed or self.checkpoints.last_saved_step),
            sample_grid=self.last_grid, blocking_seconds=self.checkpoints.blocking_seconds)
        self.reporter.close()
        self.loader.close()
        return summary


def train_loop_per_worker(loop_config: dict) -> dict:
    """Ray Train entry point (every rank). loop_config: {"config": dict, "context": dict}.
    Returns the run summary; Ray Train hands rank 0's to the driver as Result.return_value."""
    import ray.train

    configure_logging()
    cfg = config_from_dict(loop_config["config"])
    ctx = WorkerContext(**loop_config["context"])
    train_ctx = ray.train.get_context()
    run = TrainingRun(cfg, ctx, train_ctx.get_world_rank(), train_ctx.get_world_size())
    run.setup()
    return run.run()
