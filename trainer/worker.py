"""The per-worker training loop: one of these runs on every Ray Train rank.

Each rank builds the same DiP (same seed), wraps it in a DeepSpeed engine, streams its share of
the shards, and steps. Rank 0 also keeps the EMA, logs to MLflow through a background queue, draws
sample grids and shows the progress bar. Every rank resumes from the newest committed checkpoint
if there is one: model, optimizer, scheduler, EMA, data position and every RNG stream.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from data.records import to_pm1
from trainer import faults
from trainer.checkpoint import (Checkpointer, RankState, ema_file_payload, load_ema_file, load_engine,
                                load_train_state)
from trainer.checkpoint_store import CheckpointStore, step_name
from trainer.config import TrainConfig, config_from_dict, config_hash, to_dict
from trainer.mfu import device_name
from trainer.rng import capture_rng, restore_rng, seed_everything
from trainer.step_metrics import IntervalMeter, compute_text, flops_per_image, peak_memory_mb
from trainer.tracking import start_system_metrics

log = logging.getLogger("dip.train")

STOP_NONE, STOP_REQUESTED, STOP_PREEMPTION = 0, 1, 2


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
        self.step = 0
        self.samples_seen = 0
        self.last_saved_step: int | None = None
        self.last_loss: float | None = None
        self.last_grid: str | None = None
        self.stop_reason = ""
        self.in_ray = _in_ray_train()

    # ------------------------------------------------------------------------------------------
    #                                         set-up
    # ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from data import build_dataloader
        from models.ema import EMA
        from trainer.engine import build_engine, build_objective_module

        cfg = self.cfg
        faults.record_pid(self.rank)
        seed_everything(cfg.train.seed)
        self.model_config = cfg.model.dip_config()
        module = build_objective_module(cfg)
        self.num_params = sum(p.numel() for p in module.denoiser.parameters())
        # the EMA starts from the same initial weights as the model, before DeepSpeed shards or casts them
        self.ema = EMA(module.denoiser, cfg.optim.ema_decay) if self.is_main else None
        self.engine = build_engine(cfg, module, self.world_size)
        self.device = self.engine.device
        self.input_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        if self.ema is not None:
            self.ema.module.to(self.device)
        # the noise / t / label-dropout stream of this rank (restored exactly on resume)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.train.seed * 1_000_003 + self.rank)
        self.loader = build_dataloader(cfg.data, self.rank, self.world_size)
        self.store = CheckpointStore(self.ctx.checkpoint_uri)
        resume_step, attempt = self._agree_on_resume_point()
        self.checkpointer = Checkpointer(self.store, self.rank, self.world_size, attempt, cfg.checkpoint.keep,
                                         cfg.checkpoint.async_save, cfg.checkpoint.commit_timeout_s)
        if resume_step is not None:
            self._restore(resume_step)
        self.tracker = None
        if self.is_main and self.ctx.mlflow_run_id:
            from trainer.tracking import RunLogger

            self.tracker = RunLogger(self.ctx.tracking_uri, self.ctx.mlflow_run_id)
        self.system_metrics = start_system_metrics(cfg.tracking, self.ctx.tracking_uri, self.ctx.mlflow_run_id,
                                                   self.rank)
        self.flops_per_image = flops_per_image(cfg)
        self.device_name = device_name(self.device)
        if self.tracker is not None:
            self.tracker.set_tags({"training_flops_per_image": self.flops_per_image, "device_name": self.device_name})
        dist.barrier()

    def _agree_on_resume_point(self) -> tuple[int | None, str]:
        """Rank 0 finds the newest committed checkpoint and clears leftovers newer than it."""
        payload: list = [None, None]
        if self.is_main:
            latest = self.store.latest_committed(warn=True) if self.cfg.checkpoint.resume == "auto" else None
            self.store.discard_after(latest)
            payload = [latest, uuid.uuid4().hex]
        dist.broadcast_object_list(payload, src=0)
        return payload[0], payload[1]

    def _restore(self, step: int) -> None:
        state = load_train_state(self.store, step)
        cache = "" if self.store.is_local else tempfile.mkdtemp(prefix=f"dip-resume-r{self.rank}-")
        local_step_dir = self.store.local_dir(step, cache)
        saved_world = int(state["world_size"])
        if saved_world != self.world_size and self.cfg.train.zero_stage != 0:
            raise ValueError(f"checkpoint {self.store.display(step)} was written by {saved_world} workers with "
                             f"ZeRO-{self.cfg.train.zero_stage}; its optimizer shards need {saved_world} workers "
                             f"(set cluster.num_workers={saved_world}). Only ZeRO-0 resumes on another world size.")
        load_engine(self.engine, local_step_dir)
        if not self.store.is_local:  # a downloaded copy: the engine holds what it needs now
            shutil.rmtree(cache, ignore_errors=True)
        # the data state is the same on every rank; another world size re-partitions the epoch's rest
        ranks = state["ranks"]
        mine = ranks[self.rank] if saved_world == self.world_size else ranks[0]
        self.loader.load_state_dict(mine["data"])
        if saved_world == self.world_size:
            restore_rng(mine["rng"], self.generator)
        else:
            log.warning("resuming %d-worker checkpoint on %d workers: RNG streams restart from the seed "
                        "(the run continues, but is no longer bit-identical to an uninterrupted one)",
                        saved_world, self.world_size)
            self.generator.manual_seed(self.cfg.train.seed * 1_000_003 + self.rank + 7919 * step)
        if self.ema is not None:
            payload = load_ema_file(self.store, step)
            self.ema.load_state_dict({"decay": self.cfg.optim.ema_decay, "num_updates": state["ema_num_updates"],
                                      "weights": payload["state_dict"]})
            self.ema.module.to(self.device)
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.last_saved_step = self.step
        if self.is_main:
            log.info("resumed from %s (step %d, %d samples seen)", self.store.display(step), self.step,
                     self.samples_seen)

    # ------------------------------------------------------------------------------------------
    #                                         the loop
    # ------------------------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, float]:
        """One optimizer step over grad_accum micro-batches. Returns (mean loss, data-wait seconds)."""
        data_wait = 0.0
        losses = []
        for _ in range(self.cfg.train.grad_accum):
            t0 = time.perf_counter()
            pixels, labels, _keys = next(self.loader)
            data_wait += time.perf_counter() - t0
            pixels = pixels.to(self.device, non_blocking=True)  # uint8 (B, 3, N, N): a quarter of the bytes
            pixels = to_pm1(pixels).to(self.input_dtype)  # [-1, 1], scaled on the device
            labels = labels.to(self.device, non_blocking=True)                           # (B,)
            loss, _parts = self.engine(pixels, labels, self.generator)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
        self._update_ema()
        return torch.stack(losses).mean(), data_wait

    def _update_ema(self) -> None:
        denoiser = self.engine.module.denoiser
        if self.cfg.train.zero_stage == 3:  # the weights are partitioned: gather them (a collective)
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(denoiser.parameters()), modifier_rank=None):
                if self.ema is not None:
                    self.ema.update(denoiser)
        elif self.ema is not None:
            self.ema.update(denoiser)

    def _grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def _check_stop(self) -> int:
        """Agreed across ranks: a stop request from the driver, or a Ray preemption notice."""
        flag = STOP_NONE
        if self.is_main and self.store.stop_requested():
            flag = STOP_REQUESTED
        if self.in_ray:
            import ray.train

            if ray.train.get_preemption_info() is not None:  # collective, same answer on every rank
                flag = max(flag, STOP_PREEMPTION)
        agreed = torch.tensor([flag], device=self.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return int(agreed.item())

    def save_checkpoint(self) -> float:
        cfg = self.cfg
        rank_state = RankState(data=self.loader.state_dict(), rng=capture_rng(self.generator))
        train_state = ema_payload = None
        if self.is_main:
            train_state = {"samples_seen": self.samples_seen, "config": to_dict(cfg),
                           "config_hash": self.ctx.config_hash or config_hash(cfg),
                           "mlflow_run_id": self.ctx.mlflow_run_id, "ema_num_updates": self.ema.num_updates,
                           "ema_decay": self.ema.decay, "last_loss": self.last_loss}
            ema_payload = ema_file_payload(self.model_config, self.ema.module.state_dict())
        blocked = self.checkpointer.save(self.engine, self.step, rank_state, train_state, ema_payload)
        self.last_saved_step = self.step
        if self.tracker is not None:
            self.tracker.log_metrics({"checkpoint_blocking_s": blocked}, self.step)
            self.tracker.flush(cfg.tracking.flush_timeout_s)
        return blocked

    def log_interval(self, meter: IntervalMeter, loss_sum: torch.Tensor, loss_count: int, bar) -> None:
        totals = torch.tensor([loss_sum.item(), float(loss_count), float(self.loader.corrupt_samples)],
                              dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)  # every rank logs the same figures: the mean loss over all ranks
        if not self.is_main:
            return
        loss = totals[0].item() / max(totals[1].item(), 1)
        self.last_loss = loss
        figures = meter.figures(self.cfg.global_batch, self.flops_per_image, self.device_name, self.world_size)
        metrics = {"loss": loss, "lr": self.engine.get_lr()[0], "grad_norm": self._grad_norm(),
                   "peak_memory_mb": peak_memory_mb(self.device), "corrupt_samples": totals[2].item(),
                   "samples_seen": self.samples_seen, "epoch": self.loader.epoch, **figures}
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, self.step)
        remaining = (self.cfg.train.max_steps - self.step) * figures["step_time_s"]
        log.info("step %d/%d | loss %.4f | lr %.2e | %.1f img/s | %s | data wait %.0f%% | eta %s", self.step,
                 self.cfg.train.max_steps, loss, metrics["lr"], figures["images_per_s"], compute_text(figures),
                 100 * figures["data_wait_share"], _fmt_duration(remaining))
        if bar is not None:
            bar.set_description(f"loss {loss:.4f} | {figures['images_per_s']:.1f} img/s")

    def make_grid(self, name: str) -> str:
        from trainer.sample_grid import sample_grid, save_grid

        images = sample_grid(self.ema.module, self.cfg.samples, self.cfg.data.resolution, self.device)
        path = save_grid(images, self.cfg.samples.num_classes, os.path.join(self.ctx.run_dir, "samples", name))
        if self.tracker is not None:
            self.tracker.log_artifact(path, "samples")
            self.tracker.log_image(path, "samples", self.step)
        self.last_grid = path
        return path

    def run(self) -> dict:
        cfg = self.cfg
        bar = self._progress_bar()
        meter = IntervalMeter()
        loss_sum, loss_count = torch.zeros((), device=self.device), 0
        preempt_saved = False
        while self.step < cfg.train.max_steps:
            loss, data_wait = self.train_step()
            self.step += 1
            self.samples_seen += cfg.global_batch
            loss_sum += loss
            loss_count += 1
            meter.add(data_wait)
            if bar is not None:
                bar.update(1)
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                self.log_interval(meter, loss_sum, loss_count, bar)
                meter.reset()
                loss_sum, loss_count = torch.zeros((), device=self.device), 0
            faults.after_step(self.step, self.rank)
            stop = self._check_stop() if self.step % cfg.train.stop_check_every == 0 else STOP_NONE
            if stop == STOP_PREEMPTION and not preempt_saved:
                log.warning("preemption notice: writing a checkpoint at step %d", self.step)
                self.save_checkpoint()
                preempt_saved = True
            elif self.step % cfg.checkpoint.every_steps == 0 or stop == STOP_REQUESTED:
                self.save_checkpoint()
            if self.is_main and cfg.samples.every_steps and self.step % cfg.samples.every_steps == 0:
                self.make_grid(f"{step_name(self.step)}.png")
            if stop == STOP_REQUESTED:
                self.stop_reason = "stop requested"
                break
        if self.last_saved_step != self.step:
            self.save_checkpoint()
        self.checkpointer.close()
        dist.barrier()  # rank 0 has committed the last checkpoint before anyone reports done
        if bar is not None:
            bar.close()
        return self.finish()

    def finish(self) -> dict:
        summary = {"step": self.step, "samples_seen": self.samples_seen, "stopped": bool(self.stop_reason),
                   "num_params": self.num_params, "last_loss": self.last_loss,
                   "last_checkpoint": self.store.display(self.checkpointer.last_committed or self.last_saved_step)}
        if self.is_main:
            if not self.stop_reason:
                self.make_grid("final.png")
            summary["sample_grid"] = self.last_grid
            blocking = self.checkpointer.blocking_seconds
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
        bar.n = self.step  # a resumed run starts part-way
        return bar


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

