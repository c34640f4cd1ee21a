"""The per-worker training loop: one of these runs on every Ray Train rank.

Each rank builds the same DiP (same seed), wraps it in a DeepSpeed engine, streams its share of
the shards, and steps. Every rank keeps the EMA of what it holds (trainer.loop.training_ema: all of it on
rank 0 under ZeRO-0/1/2, every rank's partition under ZeRO-3); rank 0 logs to MLflow through a background
queue, draws sample grids and shows the progress bar. Set-up: split the global batch for this world size
-> build model (train.init_from: trainer.checkpoint.init_from), engine, loader -> resume (CheckpointManager:
the newest committed checkpoint, of any world size) -> loop (step, log, save, grid) -> close. A NaN/Inf
step is skipped on every rank; too many in a row roll back to the last committed one (`roll_back`).
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from data.records import to_pm1
from trainer import faults
from trainer.checkpoint.init_from import initialise_module
from trainer.checkpoint.manager import CheckpointManager, Resumed, RunIdentity, TrainProgress
from trainer.checkpoint.store import CheckpointStore, step_name
from trainer.config.sections import TrainConfig, config_from_dict, config_hash, to_dict
from trainer.tracking.mfu import device_name
from trainer.loop.nonfinite import NonFiniteStreak, StepGuard, nonfinite_loss_scale
from trainer.loop.rng import keyed_draws, seed_everything
from trainer.loop.step_metrics import IntervalMeter, compute_text, flops_per_image, peak_memory_mb
from trainer.tracking.run_logger import start_system_metrics

log = logging.getLogger("dip.train")

STOP_NONE, STOP_RESIZE, STOP_REQUESTED, STOP_PREEMPTION = 0, 1, 2, 3  # agreed by MAX over ranks
# An elastic grow: after the checkpoint for it, the workers wait (instead of training steps the restart
# would throw away) while the controller waits for the commit, then for the restart it starts right after.
RESIZE_WAIT_S = 300.0
RESIZE_GRACE_S = 120.0


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


def configure_logging() -> None:
    """The "dip" loggers at INFO to stdout, once per process (workers, and the `dip train` driver)."""
    root = logging.getLogger("dip")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def _in_ray_train() -> bool:
    try:
        import ray.train

        ray.train.get_context()
        return True
    except Exception:  # not inside a Ray Train worker (a plain torch.distributed launch)
        return False


class TrainingRun:
    def __init__(self, cfg: TrainConfig, ctx: WorkerContext, rank: int, world_size: int):
        self.cfg, self.ctx, self.rank, self.world_size = cfg, ctx, rank, world_size
        self.is_main = rank == 0
        self.split = cfg.batch_split(world_size)  # this world size's share of the fixed global batch
        self.progress = TrainProgress()
        self.last_grid: str | None = None
        self.stop_reason = ""
        self.failure = ""          # why the workers stopped the run (it ends FAILED); "" while all is well
        self.save_due = False      # a periodic checkpoint waits for a finite step (see run)
        self.rollbacks = 0         # since this process started: train.max_rollbacks bounds these (a re-run
                                   # after a divergence gets its own); progress.rollbacks is the run's total
        self.in_ray = _in_ray_train()

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
        self.input_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.ema.to(self.device)
        self.loader = build_dataloader(cfg.data.replace(batch_size=self.split.micro_batch), self.rank,
                                       self.world_size)
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
        self.tracker = None
        if self.is_main and self.ctx.mlflow_run_id:
            from trainer.tracking.run_logger import RunLogger

            self.tracker = RunLogger(self.ctx.tracking_uri, self.ctx.mlflow_run_id)
        if self.is_main:
            self._report_start(resumed)
        self.system_metrics = start_system_metrics(cfg.tracking, self.ctx.tracking_uri, self.ctx.mlflow_run_id,
                                                   self.rank)
        self.flops_per_image = flops_per_image(cfg)
        self.device_name = device_name(self.device)
        if self.tracker is not None:
            self.tracker.set_tags({"training_flops_per_image": self.flops_per_image, "device_name": self.device_name})
        dist.barrier()

    def _report_start(self, resumed: Resumed | None) -> None:
        """The batch split chosen at this (re)start, and a resize, in the log and in MLflow."""
        log.info("batch: %s", self.split.describe())
        if resumed is None:
            self._log_world(0)
            return
        log.info("resumed from %s (step %d, %d samples seen)", resumed.where, self.progress.step,
                 self.progress.samples_seen)
        if resumed.saved_world_size != self.world_size:
            self.progress.resizes += 1
            reason = _resize_reason(resumed.saved_world_size, self.world_size, self.cfg.cluster.elastic)
            was = resumed.saved_split or {"world_size": resumed.saved_world_size}
            event = (f"step {self.progress.step}: {resumed.saved_world_size} -> {self.world_size} workers ({reason}); "
                     f"{self.split.describe()}" + ("" if not resumed.resharded else "; ZeRO state re-partitioned"))
            log.warning("resize %d: %s (was micro-batch %s x accumulation %s)", self.progress.resizes, event,
                        was.get("micro_batch", "?"), was.get("grad_accum", "?"))
            if self.tracker is not None:
                self.tracker.set_tags({f"resize.{self.progress.resizes}": event,
                                       "resizes": str(self.progress.resizes)})
        self._log_world(self.progress.step)

    def _log_world(self, step: int) -> None:
        if self.tracker is not None:
            self.tracker.set_tags({"world_size": str(self.world_size)})
            self.tracker.log_metrics({"world_size": self.world_size, "grad_accum": self.split.grad_accum,
                                      "micro_batch": self.split.micro_batch}, step)

    # ------------------------------------------------------------------------------------------
    #                                         the loop
    # ------------------------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, float, bool]:
        """One optimizer step over this rank's micro-batches. Returns (mean loss, data-wait seconds,
        applied); applied is False, on every rank alike, when a loss or the gradient norm was not finite:
        then nothing was updated, EMA included (trainer.loop.nonfinite)."""
        data_wait = 0.0
        losses = []
        guard = StepGuard(self.engine)
        for micro in range(self.split.grad_accum):
            t0 = time.perf_counter()
            pixels, labels, keys = next(self.loader)
            data_wait += time.perf_counter() - t0
            pixels = pixels.to(self.device, non_blocking=True)  # uint8 (B, 3, N, N): a quarter of the bytes
            pixels = to_pm1(pixels).to(self.input_dtype)  # [-1, 1], scaled on the device
            pixels = faults.poison_pixels(self.progress.step + 1, self.rank, pixels)
            labels = labels.to(self.device, non_blocking=True)                           # (B,)
            faults.record_samples(self.progress.step, self.rank, self.world_size, self.checkpoints.attempt, keys)
            # t, noise and label dropout keyed to (seed, step, sample): the same for any split of the batch
            draws = keyed_draws(self.cfg.train.seed, self.progress.step, keys, tuple(pixels.shape[1:]), self.device)
            loss, _parts = self.engine(pixels, labels, draws)
            losses.append(loss.detach().float())
            if micro == self.split.grad_accum - 1:  # NaN gradients everywhere if any rank's loss was not finite
                loss = loss * nonfinite_loss_scale(losses).to(loss.dtype)
            self.engine.backward(loss)
            self.engine.step()
        if guard.applied:
            self._update_ema()
        return torch.stack(losses).mean(), data_wait, guard.applied

    def _update_ema(self) -> None:
        self.ema.update(self.engine.module.denoiser)  # local on every rank, at every ZeRO stage

    def _grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def _check_stop(self) -> int:
        """Agreed across ranks: a stop request from the driver, a Ray preemption notice, or an elastic
        run about to grow (Ray restarts the group once this checkpoint is committed)."""
        flag = STOP_NONE
        if self.is_main and self.store.stop_requested():
            flag = STOP_REQUESTED
        elif self.is_main and self.store.resize_requested():
            flag = STOP_RESIZE
        if self.in_ray:
            import ray.train

            if ray.train.get_preemption_info() is not None:  # collective, same answer on every rank
                flag = max(flag, STOP_PREEMPTION)
        agreed = torch.tensor([flag], device=self.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return int(agreed.item())

    def save_checkpoint(self) -> float:
        self.save_due = False
        blocked = self.checkpoints.save()
        if self.tracker is not None:
            self.tracker.log_metrics({"checkpoint_blocking_s": blocked}, self.progress.step)
            self.tracker.flush(self.cfg.tracking.flush_timeout_s)
        return blocked

    def note_nonfinite(self, streak: NonFiniteStreak, loss: torch.Tensor) -> None:
        """A skipped step: counted (MLflow `nonfinite_steps`) and named in a warning."""
        self.progress.nonfinite_steps += 1
        if not self.is_main:
            return
        step = self.progress.step
        log.warning("step %d: non-finite loss or gradient norm (rank 0's loss %s): optimizer step skipped on every "
                    "rank, no weight, optimizer or EMA update (%d in a row of train.nonfinite_patience=%d; %d in this "
                    "run)", step, f"{loss.item():.4g}", streak.streak, streak.patience, self.progress.nonfinite_steps)
        if self.tracker is not None:
            self.tracker.log_metrics({"nonfinite_steps": self.progress.nonfinite_steps}, step)

    def roll_back(self, first_bad: int) -> None:
        """train.nonfinite_patience skipped steps in a row (first_bad..now): restore the last committed
        checkpoint (engine, EMA, RNG; collective) and skip the data of every step since it, keeping the
        loader where it is now and the step count with it. After train.max_rollbacks rollbacks (since this
        start) the run stops instead: self.failure says why; the last committed checkpoint stays the last
        good one."""
        cfg, progress = self.cfg, self.progress
        step = progress.step
        streak = f"{cfg.train.nonfinite_patience} non-finite steps in a row (steps {first_bad}..{step})"
        self.checkpoints.wait()  # a write in flight (begun before the streak) commits first
        target = self.checkpoints.newest_loadable()
        if target is None or self.rollbacks >= cfg.train.max_rollbacks:
            where = (f"the last good checkpoint is {self.store.display(target)}; re-running the same command "
                     "resumes from it" if target is not None else "no checkpoint was committed before it")
            self.failure = (f"training diverged: {streak} after {self.rollbacks} rollback(s) (train.max_rollbacks="
                            f"{cfg.train.max_rollbacks}); {where}. Lower optim.lr, set optim.grad_clip, or look at the "
                            f"data of those steps")
            return
        kept = {"step": step, "samples_seen": progress.samples_seen, "nonfinite_steps": progress.nonfinite_steps,
                "rollbacks": progress.rollbacks + 1, "resizes": progress.resizes, "last_loss": progress.last_loss}
        # the loader stays where it is: the data window target+1..step is not trained again
        self.checkpoints.restore(target, data_state=self.loader.state_dict())
        progress.load_state_dict(kept)
        self.rollbacks += 1
        event = (f"step {step}: {streak}: rolled back to {self.store.display(target)} and skipped the data of steps "
                 f"{target + 1}..{step} ({(step - target) * cfg.global_batch} samples)")
        if self.is_main:
            log.warning("rollback %d of at most %d: %s", self.rollbacks, cfg.train.max_rollbacks, event)
            if self.tracker is not None:
                self.tracker.set_tags({f"rollback.{progress.rollbacks}": event})
                self.tracker.log_metrics({"rollbacks": progress.rollbacks}, step)

    def _await_resize(self) -> None:
        """An elastic grow: the checkpoint is committed; Ray restarts the group with more workers as soon
        as the driver side has seen it. Wait for that (bounded), then carry on if it never came."""
        self.checkpoints.wait()  # on rank 0 that includes the commit
        if self.is_main:
            self.store.answer_resize(self.progress.step)
        log.info("checkpoint for the resize written at step %d: waiting for Ray to restart the group",
                 self.progress.step)
        deadline = time.monotonic() + RESIZE_WAIT_S
        while time.monotonic() < deadline and self.store.resize_requested():
            time.sleep(0.5)
        time.sleep(RESIZE_GRACE_S)  # the request is gone: Ray's restart of the group is on its way
        dist.barrier()
        log.warning("no restart came after the resize checkpoint at step %d: training on", self.progress.step)

    def log_interval(self, meter: IntervalMeter, loss_sum: torch.Tensor, loss_count: int, bar) -> None:
        """loss_sum / loss_count: over the applied steps of the interval (a skipped step's loss is not finite)."""
        totals = torch.tensor([loss_sum.item(), float(loss_count), float(self.loader.corrupt_samples)],
                              dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)  # every rank logs the same figures: the mean loss over all ranks
        if not self.is_main:
            return
        loss = totals[0].item() / totals[1].item() if totals[1].item() else None  # None: every step skipped
        if loss is not None:
            self.progress.last_loss = loss
        step = self.progress.step
        figures = meter.figures(self.cfg.global_batch, self.flops_per_image, self.device_name, self.world_size)
        grad_norm = self._grad_norm()
        metrics = {"loss": loss, "lr": self.engine.get_lr()[0],
                   "grad_norm": grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None,
                   "peak_memory_mb": peak_memory_mb(self.device), "corrupt_samples": totals[2].item(),
                   "samples_seen": self.progress.samples_seen, "epoch": self.loader.epoch,
                   "world_size": self.world_size, "grad_accum": self.split.grad_accum, **figures}
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step)
        remaining = (self.cfg.train.max_steps - step) * figures["step_time_s"]
        loss_text = "skipped" if loss is None else f"{loss:.4f}"
        log.info("step %d/%d | loss %s | lr %.2e | %.1f img/s | %s | data wait %.0f%% | eta %s", step,
                 self.cfg.train.max_steps, loss_text, metrics["lr"], figures["images_per_s"], compute_text(figures),
                 100 * figures["data_wait_share"], _fmt_duration(remaining))
        if bar is not None:
            bar.set_description(f"loss {loss_text} | {figures['images_per_s']:.1f} img/s")

    def make_grid(self, name: str) -> str | None:
        """Collective (ZeRO-3 gathers the EMA for it): every rank calls it; rank 0 draws and saves."""
        from trainer.loop.sample_grid import sample_grid, save_grid

        model = self.ema.sampling_module()
        if not self.is_main:
            return None
        images = sample_grid(model, self.cfg.samples, self.cfg.data.resolution, self.device)
        del model  # under ZeRO-3 a whole fp32 copy built for this grid
        path = save_grid(images, self.cfg.samples.num_classes, os.path.join(self.ctx.run_dir, "samples", name))
        if self.tracker is not None:
            self.tracker.log_artifact(path, "samples")
            self.tracker.log_image(path, "samples", self.progress.step)
        self.last_grid = path
        return path

    def run(self) -> dict:
        cfg, progress = self.cfg, self.progress
        bar = self._progress_bar()
        meter = IntervalMeter()
        loss_sum, loss_count = torch.zeros((), device=self.device), 0
        preempt_saved = False
        streak = NonFiniteStreak(cfg.train.nonfinite_patience)
        while progress.step < cfg.train.max_steps:
            loss, data_wait, applied = self.train_step()
            progress.step += 1
            progress.samples_seen += cfg.global_batch
            if applied:
                streak.reset()
                loss_sum += loss
                loss_count += 1
            else:
                roll_back = streak.skipped(progress.step)
                self.note_nonfinite(streak, loss)
                if roll_back:
                    self.roll_back(streak.first_step)
                    streak.reset()
                    if self.failure:
                        break
            meter.add(data_wait)
            if bar is not None:
                bar.update(1)
            if progress.step % cfg.train.log_every == 0 or progress.step == cfg.train.max_steps:
                self.log_interval(meter, loss_sum, loss_count, bar)
                meter.reset()
                loss_sum, loss_count = torch.zeros((), device=self.device), 0
            faults.after_step(progress.step, self.rank, self.world_size, self.resumed)
            stop = self._check_stop() if progress.step % cfg.train.stop_check_every == 0 else STOP_NONE
            if stop == STOP_PREEMPTION and not preempt_saved:
                log.warning("preemption notice: writing a checkpoint at step %d", progress.step)
                self.save_checkpoint()
                preempt_saved = True
            elif stop in (STOP_REQUESTED, STOP_RESIZE):
                self.save_checkpoint()
            elif progress.step % cfg.checkpoint.every_steps == 0 or self.save_due:
                # never while non-finite steps are running: a rollback must find the state before them
                self.save_due = bool(streak.streak)
                if not self.save_due:
                    self.save_checkpoint()
            if cfg.samples.every_steps and progress.step % cfg.samples.every_steps == 0:
                self.make_grid(f"{step_name(progress.step)}.png")
            if stop == STOP_REQUESTED:
                self.stop_reason = "stop requested"
                break
            if stop == STOP_RESIZE and progress.step < cfg.train.max_steps:
                self._await_resize()
        if self.checkpoints.last_saved_step != progress.step and not self.failure:
            self.save_checkpoint()
        self.checkpoints.close()
        dist.barrier()  # rank 0 has committed the last checkpoint before anyone reports done
        if bar is not None:
            bar.close()
        return self.finish()

    def finish(self) -> dict:
        progress = self.progress
        if not self.stop_reason and not self.failure:
            self.make_grid("final.png")
        summary = {"step": progress.step, "samples_seen": progress.samples_seen, "stopped": bool(self.stop_reason),
                   "num_params": self.num_params, "last_loss": progress.last_loss, "world_size": self.world_size,
                   "resizes": progress.resizes, "nonfinite_steps": progress.nonfinite_steps,
                   "rollbacks": progress.rollbacks, "failed": self.failure,
                   "last_checkpoint": self.store.display(self.checkpoints.last_committed
                                                         or self.checkpoints.last_saved_step)}
        if self.is_main:
            summary["sample_grid"] = self.last_grid
            blocking = self.checkpoints.blocking_seconds
            summary["checkpoint_blocking_s_mean"] = sum(blocking) / len(blocking) if blocking else 0.0
            if self.tracker is not None:
                self.tracker.close(self.cfg.tracking.flush_timeout_s)
        if self.system_metrics is not None:
            self.system_metrics.stop()
        self.loader.close()
        return summary

    def _progress_bar(self):
        if not (self.is_main and self.in_ray and self.ctx.progress_bar):
            return None
        from ray.experimental.tqdm_ray import tqdm

        bar = tqdm(total=self.cfg.train.max_steps, desc="training", unit="step")
        bar.n = self.progress.step  # a resumed run starts part-way
        return bar


def _resize_reason(before: int, after: int, elastic: bool) -> str:
    if not elastic:
        return f"restarted by hand with cluster.num_workers={after}"
    return "a node was lost" if after < before else "capacity came back"


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


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

