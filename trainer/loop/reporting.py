"""What a training run tells the log, MLflow and the terminal: the batch split and any resize at a (re)start,
the figures of every log interval (trainer.loop.step_metrics computes them), checkpoint and grid notes, the
progress bar, and the summary the workers hand the driver.

Rank 0 talks to MLflow (through trainer.tracking.run_logger's background queue); every rank takes part in
the collectives the figures need, so every rank calls the same methods.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist

from trainer.loop.step import grad_norm
from trainer.loop.step_metrics import IntervalMeter, compute_text, flops_per_image, peak_memory_mb
from trainer.tracking.goodput import GOODPUT_TAG, LEDGER_TAG, to_tag
from trainer.tracking.mfu import device_name
from trainer.tracking.run_logger import start_system_metrics

log = logging.getLogger("dip.train")


class RunReporter:
    """One rank's reporting: the MLflow run on rank 0 (`tracker`, None elsewhere or without a run id),
    MLflow's system-metrics monitor where this rank runs one."""

    def __init__(self, cfg, ctx, *, rank: int, world_size: int, split, progress, engine, loader, goodput):
        self.cfg, self.ctx, self.world_size, self.split, self.progress = cfg, ctx, world_size, split, progress
        self.goodput = goodput   # trainer.tracking.goodput.GoodputLedger: rank 0's is the one reported
        self.engine, self.loader, self.device = engine, loader, engine.device
        self.rank, self.is_main = rank, rank == 0
        self.tracker = None
        if self.is_main and ctx.mlflow_run_id:
            from trainer.tracking.run_logger import RunLogger

            self.tracker = RunLogger(ctx.tracking_uri, ctx.mlflow_run_id)
        self.system_metrics = None
        self.flops_per_image: float | None = None
        self.device_name: str | None = None

    # ------------------------------------------------------------------------------------------
    #                                      (re)start
    # ------------------------------------------------------------------------------------------
    def start(self, resumed) -> None:
        """After the resume: the split and any resize (rank 0), system metrics, the run's compute figures."""
        if self.is_main:
            self._report_start(resumed)
        self.system_metrics = start_system_metrics(self.cfg.tracking, self.ctx.tracking_uri,
                                                   self.ctx.mlflow_run_id, self.rank)
        self.flops_per_image = flops_per_image(self.cfg)
        self.device_name = device_name(self.device)
        if self.tracker is not None:
            self.tracker.set_tags({"training_flops_per_image": self.flops_per_image, "device_name": self.device_name})

    def _report_start(self, resumed) -> None:
        """The batch split chosen at this (re)start, and a resize, in the log and in MLflow."""
        log.info("batch: %s", self.split.describe())
        if resumed is None:
            self._log_world(0)
            return
        progress = self.progress
        log.info("resumed from %s (step %d, %d samples seen)", resumed.where, progress.step, progress.samples_seen)
        if resumed.saved_world_size != self.world_size:  # counted by the restore (CheckpointManager), once per
            # checkpoint: a restart that repeats this resume re-logs resize.N under the same N
            reason = resize_reason(resumed.saved_world_size, self.world_size, self.cfg.cluster.elastic)
            was = resumed.saved_split or {"world_size": resumed.saved_world_size}
            event = (f"step {progress.step}: {resumed.saved_world_size} -> {self.world_size} workers ({reason}); "
                     f"{self.split.describe()}" + ("" if not resumed.resharded else "; ZeRO state re-partitioned"))
            log.warning("resize %d: %s (was micro-batch %s x accumulation %s)", progress.resizes, event,
                        was.get("micro_batch", "?"), was.get("grad_accum", "?"))
            if self.tracker is not None:
                self.tracker.set_tags({f"resize.{progress.resizes}": event, "resizes": str(progress.resizes)})
        self._log_world(progress.step)

    def _log_world(self, step: int) -> None:
        if self.tracker is not None:
            self.tracker.set_tags({"world_size": str(self.world_size)})
            self.tracker.log_metrics({"world_size": self.world_size, "grad_accum": self.split.grad_accum,
                                      "micro_batch": self.split.micro_batch}, step)

    # ------------------------------------------------------------------------------------------
    #                                      during the run
    # ------------------------------------------------------------------------------------------
    def progress_bar(self, in_ray: bool):
        """Rank 0's bar on the driver's terminal (WorkerContext.progress_bar), or None."""
        if not (self.is_main and in_ray and self.ctx.progress_bar):
            return None
        from ray.experimental.tqdm_ray import tqdm

        bar = tqdm(total=self.cfg.train.max_steps, desc="training", unit="step")
        bar.n = self.progress.step  # a resumed run starts part-way
        return bar

    def log_interval(self, meter: IntervalMeter, loss_sum: torch.Tensor, loss_count: int, bar) -> None:
        """loss_sum / loss_count: over the applied steps of the interval (a skipped step's loss is not finite).
        Collective: every rank logs the same figures, rank 0 writes them."""
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
        norm = grad_norm(self.engine)
        metrics = {"loss": loss, "lr": self.engine.get_lr()[0],
                   "grad_norm": norm if norm is not None and math.isfinite(norm) else None,
                   "peak_memory_mb": peak_memory_mb(self.device), "corrupt_samples": totals[2].item(),
                   "samples_seen": self.progress.samples_seen, "epoch": self.loader.epoch,
                   "world_size": self.world_size, "grad_accum": self.split.grad_accum, **figures}
        ledger_state = self.goodput.state_dict(step)  # settled: the figures below add up to now
        metrics.update(self.goodput.metrics())
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step)
            self.tracker.set_tags({LEDGER_TAG: to_tag(ledger_state)})  # what a restart after a crash takes over
        remaining = (self.cfg.train.max_steps - step) * figures["step_time_s"]
        loss_text = "skipped" if loss is None else f"{loss:.4f}"
        log.info("step %d/%d | loss %s | lr %.2e | %.1f img/s | %s | data wait %.0f%% | eta %s | %s", step,
                 self.cfg.train.max_steps, loss_text, metrics["lr"], figures["images_per_s"], compute_text(figures),
                 100 * figures["data_wait_share"], format_duration(remaining), self.goodput.summary_text())
        if bar is not None:
            bar.set_description(f"loss {loss_text} | {figures['images_per_s']:.1f} img/s")

    def checkpoint_starts(self) -> None:
        """The metrics so far reach the tracking store before the checkpoint is committed: whatever a
        restart resumes from, MLflow already holds (the goodput ledger reads its last report there)."""
        if self.tracker is not None:
            self.tracker.flush(self.cfg.tracking.flush_timeout_s)

    def checkpoint_saved(self, blocked_s: float) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics({"checkpoint_blocking_s": blocked_s}, self.progress.step)

    def grid_saved(self, path: str) -> None:
        if self.tracker is not None:
            self.tracker.log_artifact(path, "samples")
            self.tracker.log_image(path, "samples", self.progress.step)

    # ------------------------------------------------------------------------------------------
    #                                         the end
    # ------------------------------------------------------------------------------------------
    def summary(self, *, stopped: bool, failure: str, num_params: int, last_checkpoint: str,
                sample_grid: str | None, blocking_seconds: list[float]) -> dict:
        """The run's summary (Ray Train hands rank 0's to the driver as Result.return_value)."""
        progress = self.progress
        summary = {"step": progress.step, "samples_seen": progress.samples_seen, "stopped": stopped,
                   "num_params": num_params, "last_loss": progress.last_loss, "world_size": self.world_size,
                   "resizes": progress.resizes, "nonfinite_steps": progress.nonfinite_steps,
                   "rollbacks": progress.rollbacks, "failed": failure, "last_checkpoint": last_checkpoint}
        if self.is_main:
            summary["sample_grid"] = sample_grid
            summary["checkpoint_blocking_s_mean"] = (sum(blocking_seconds) / len(blocking_seconds)
                                                     if blocking_seconds else 0.0)
            summary.update(self._final_goodput())
        return summary

    def _final_goodput(self) -> dict:
        """The attempt ended cleanly (a re-run starts afresh, no recovery): the closing ledger, the final
        figures in MLflow (tag `goodput`), the log line."""
        state = self.goodput.state_dict(self.progress.step, closed=True)
        text = self.goodput.summary_text()
        log.info("%s of %.0f worker-seconds over the run", text, self.goodput.total_s)
        if self.tracker is not None:
            self.tracker.log_metrics(self.goodput.metrics(), self.progress.step)
            fraction = self.goodput.fraction
            self.tracker.set_tags({LEDGER_TAG: to_tag(state),
                                   GOODPUT_TAG: "n/a" if fraction is None else f"{fraction:.4f}"})
        return {"goodput": self.goodput.fraction, "goodput_breakdown": text}

    def close(self) -> None:
        """MLflow's queue flushed and closed (rank 0), the system-metrics monitor stopped."""
        if self.tracker is not None:
            self.tracker.close(self.cfg.tracking.flush_timeout_s)
        if self.system_metrics is not None:
            self.system_metrics.stop()


def resize_reason(before: int, after: int, elastic: bool) -> str:
    if not elastic:
        return f"restarted by hand with cluster.num_workers={after}"
    return "a node was lost" if after < before else "capacity came back"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
