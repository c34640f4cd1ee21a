"""Driver-side eval hook: hands committed checkpoints to the FID eval pool, logs what comes back."""
from __future__ import annotations

import logging
import os
import shutil
import time

from trainer.checkpoint.store import EMA_FILE, CheckpointStore
from trainer.config import SYNTHETIC_REF, SYNTHETIC_REF_START, TrainConfig

log = logging.getLogger("dip.eval")
EVAL_IMAGE_KEY = "eval/samples"  # the MLflow image key of eval grids (as trainer.eval.tracking logs them)


def sampling_spec(cfg: TrainConfig):
    """What every eval of this run samples (eval.*, at the training resolution, seeded by train.seed).
    Also used to score a kept checkpoint after the run exactly as the pool would have (benchmarks/ablation.py)."""
    from trainer.eval.spec import SamplingSpec

    return SamplingSpec(steps=cfg.eval.steps, method=cfg.eval.method, cfg_scale=cfg.eval.cfg_scale,
                        cfg_interval=tuple(cfg.eval.cfg_interval), num_samples=cfg.eval.num_samples,
                        image_size=cfg.data.resolution, seed=cfg.train.seed)


class EvalHook:
    """Every eval.every_steps, the newest committed checkpoint goes to trainer.eval.pool.EvalPool.

    Non-blocking: `poll()` is called from the driver's wait loop; evals run on their own Ray actors.
    Off (a no-op) unless eval.enabled.

    The pool may start an eval long after it was handed over, while the workers go on committing and
    pruning (checkpoint.keep): so at hand-over the checkpoint's ema.pt (all an eval reads) is
    hard-linked (copied across file systems) into <run_dir>/eval/inputs/step-N/, which the hook
    removes once the pool no longer needs it.
    """

    def __init__(self, cfg: TrainConfig, store: CheckpointStore, tracker=None, poll_every_s: float = 10.0):
        self.cfg, self.store, self.tracker = cfg, store, tracker
        self.poll_every_s = poll_every_s
        self.pool = None
        self.submitted: set[int] = set()
        self.results = []
        self._last_poll = 0.0
        self.inputs_dir = os.path.join(cfg.run_dir, "eval", "inputs")
        if not cfg.eval.enabled:
            return
        # checked here, not in TrainConfig: the workers' copy of the config points data.path at the shards
        if cfg.eval.ref_stats == SYNTHETIC_REF and not cfg.data.is_synthetic:
            raise ValueError(f"eval.ref_stats={SYNTHETIC_REF!r} is not valid: a {SYNTHETIC_REF!r} reference needs "
                             "data.path: synthetic; otherwise give a file from `dip eval ref-stats`")
        if not store.is_local:
            log.warning("eval: checkpoints in %s are not local; the eval pool reads local step dirs, eval is off",
                        store.display())
            return
        from trainer.eval.pool import EvalPool

        resources = {"num_gpus": 1, "num_cpus": 1} if cfg.cluster.use_gpu else {"num_cpus": 1}
        shutil.rmtree(self.inputs_dir, ignore_errors=True)  # a killed driver's leftovers
        if cfg.eval.ref_stats == SYNTHETIC_REF:
            from trainer.eval.datasets import DatasetRequest

            held_out = DatasetRequest(data="synthetic", num_samples=cfg.eval.ref_samples,
                                      image_size=cfg.data.resolution, num_classes=cfg.data.synthetic_classes,
                                      seed=cfg.data.seed, start=SYNTHETIC_REF_START)
            log.info("eval: reference = %d held-out synthetic images (from index %d), computed by the pool",
                     cfg.eval.ref_samples, SYNTHETIC_REF_START)
            self.pool = EvalPool(cfg.eval.actors, resources, reference_data=held_out,
                                 start_timeout_s=cfg.eval.start_timeout_s)
        else:
            self.pool = EvalPool(cfg.eval.actors, resources, ref_stats_path=cfg.eval.ref_stats,
                                 start_timeout_s=cfg.eval.start_timeout_s)
        self.spec = sampling_spec(cfg)

    def poll(self, force: bool = False, submit: bool = True) -> None:
        if self.pool is None or (not force and time.monotonic() - self._last_poll < self.poll_every_s):
            return
        self._last_poll = time.monotonic()
        due = [s for s in self.store.committed_steps(warn=False)
               if s % self.cfg.eval.every_steps == 0 and s not in self.submitted] if submit else []
        if due:
            step = due[-1]  # the pool keeps one pending job: the newest is the one worth scoring
            self.submitted.update(due)
            pinned = self._pin(step)
            if pinned is not None:
                self.pool.submit(pinned, step, self.spec)
        self._unpin_unused()
        for result in self.pool.poll():
            self.results.append(result)
            log.info("eval step %s: FID %.3f (%d samples, %.0f s)", result.step, result.fid, result.num_samples,
                     result.seconds)
            if self.tracker is not None:
                self.tracker.log_metrics(result.metrics(), result.step or 0)
                self._log_grid(result)

    def _pin(self, step: int) -> str | None:
        """A private link to step-N's ema.pt that pruning cannot take away; None if it is gone already.
        The link's directory gets a COMMITTED marker with ema.pt's size and checksum from step-N's, so the
        eval actors check the file against it before loading (trainer.model_io.verify_committed)."""
        target = os.path.join(self.inputs_dir, os.path.basename(self.store.step_path(step)))
        source = self.store.step_path(step, EMA_FILE)
        record = ((self.store.read_marker(step) or {}).get("files") or {}).get(EMA_FILE)
        os.makedirs(target, exist_ok=True)
        try:
            try:
                os.link(source, os.path.join(target, EMA_FILE))
            except FileExistsError:
                pass  # handed over before (a resumed run re-evaluates a step)
            except OSError:  # another file system, or no hard links there
                shutil.copyfile(source, os.path.join(target, EMA_FILE))
        except FileNotFoundError:
            log.info("eval: %s was pruned before it could be handed over; the next one will be",
                     self.store.display(step))
            shutil.rmtree(target, ignore_errors=True)
            return None
        if record is not None:
            CheckpointStore(self.inputs_dir).commit(step, {EMA_FILE: record}, {"pinned_from": self.store.display(step)})
        return target

    def _unpin_unused(self) -> None:
        in_use = self.pool.in_use()
        for name in os.listdir(self.inputs_dir) if os.path.isdir(self.inputs_dir) else []:
            path = os.path.join(self.inputs_dir, name)
            if path not in in_use:
                shutil.rmtree(path, ignore_errors=True)

    def _log_grid(self, result) -> None:
        from PIL import Image

        path = os.path.join(self.cfg.run_dir, "samples", f"eval-step-{result.step}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(result.sample_grid).save(path)
        self.tracker.log_artifact(path, "eval")
        self.tracker.log_image(path, EVAL_IMAGE_KEY, result.step or 0)

    def close(self, wait_s: float = 0.0) -> None:
        """wait_s > 0 (a run that ended well): the last committed checkpoint is still handed over if due
        (training may end between two polls), and its eval awaited; 0: collect what is done and stop."""
        if self.pool is None:
            return
        if wait_s > 0:
            self.poll(force=True)
            self.pool.wait_idle(timeout=wait_s)
        self.poll(force=True, submit=False)
        self.pool.close()
        shutil.rmtree(self.inputs_dir, ignore_errors=True)
