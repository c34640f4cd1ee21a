"""The Ray eval actor pool: FID / sFID / precision / recall of a checkpoint, off the training path.

- Its own actors with their own resources ({"num_cpus": 1} in tests, {"num_gpus": 1} on GPUs).
- `submit()` never blocks: evals run one at a time on a background thread of the caller; a newer
  submit replaces an eval still waiting to start (the older one is dropped, with a warning), so
  evals never pile up and training never waits. `poll()` hands back finished results.
- Work is split into fixed sample chunks (SamplingSpec.chunks()) handed to whichever actor is
  free; sample i's noise and label depend only on (seed, i), so the result is independent of the
  split. An actor that dies is replaced and its chunk redone: same samples, same result.
- A failed eval is logged and recorded in `failures`; it never raises into the training loop.
- Actors that cannot start within `start_timeout_s` (no node has the resources they ask for, e.g.
  no free GPU of that kind) fail that eval with a warning and switch the pool off: later submits
  are dropped, and nothing ever waits on actors that will not come.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray

from trainer import faults

from .local import GRID_IMAGES, score_feature_chunks
from .spec import EvalResult, SamplingSpec, sample_grid

log = logging.getLogger(__name__)

RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type")


class EvalError(RuntimeError):
    """An eval that could not finish (a chunk failed, or actors kept dying)."""


class EvalStartError(EvalError):
    """The eval actors did not start in time (not placed, or their reference did not load)."""


class _Cancelled(Exception):
    pass


@dataclasses.dataclass
class EvalFailure:
    step: int | None
    checkpoint: str
    error: str


@dataclasses.dataclass
class _Job:
    checkpoint: str
    step: int | None
    spec: SamplingSpec


@ray.remote
def _load_reference(path: str, fid_method: str, device: str):
    """Reads the reference once for the whole pool, its reusable parts (k-NN radii, roots) computed.
    An ADM batch without features gets them here, on the actors' kind of device."""
    from .reference import ReferenceStats

    return ReferenceStats.load(path, device=device).prepare(fid_method)


@ray.remote
def _build_reference(request, fid_method: str, device: str):
    """Computes the reference statistics of a dataset (e.g. held-out synthetic images) for the pool."""
    from .datasets import build_reference

    reference, counts = build_reference(request, None, device)
    log.info("eval reference: %d images of %s (%d unreadable, skipped)", counts.images, request.data, counts.skipped)
    return reference.prepare(fid_method)


@ray.remote
class EvalActor:
    """One eval worker: keeps the Inception network and the current checkpoint's EMA model loaded."""

    def __init__(self, reference, num_threads: int, device: str, fid_method: str):
        import torch

        from .generation import ChunkRunner

        torch.set_num_threads(num_threads)
        self.reference = reference
        self.fid_method = fid_method
        self.runner = ChunkRunner(device)

    def pid(self) -> int:
        return os.getpid()

    @ray.method(num_returns=2)
    def run_chunk(self, checkpoint: str, spec: SamplingSpec, start: int, stop: int, keep_images: bool):
        faults.in_eval_chunk()
        out = self.runner.run(checkpoint, spec, start, stop, keep_images)
        # Two objects: the small one the driver reads, the features it only passes on to score().
        return (out.start, out.stop, out.images), (out.pool, out.spatial)

    def num_classes(self, checkpoint: str, spec: SamplingSpec) -> int:
        return spec.num_classes or self.runner.model(checkpoint).config.num_classes

    def score(self, *chunk_features):
        return score_feature_chunks(list(chunk_features), self.reference, self.fid_method)


class EvalPool:
    def __init__(self, num_actors: int, resources_per_actor: dict | None = None,
                 ref_stats_path: str | Path | None = None, *, reference=None, reference_data=None,
                 max_actor_restarts: int = 3, fid_method: str = "eigh", start_timeout_s: float = 600.0):
        """The reference is one of: a statistics file, ReferenceStats in memory, or a DatasetRequest
        (reference_data) whose statistics a background task computes on the pool's resources.
        start_timeout_s: how long the first eval waits for the actors to be placed and started."""
        if not isinstance(num_actors, int) or num_actors < 1:
            raise ValueError(f"EvalPool num_actors={num_actors!r}: must be a positive integer")
        resources = dict(resources_per_actor or {"num_cpus": 1})
        unknown = sorted(set(resources) - set(RESOURCE_KEYS))
        if unknown:
            raise ValueError(f"EvalPool resources_per_actor: unknown key(s) {unknown}; valid keys: {RESOURCE_KEYS}")
        from .metrics import FID_METHODS

        if fid_method not in FID_METHODS:
            raise ValueError(f"EvalPool fid_method={fid_method!r}: choose one of {FID_METHODS}")
        if sum(x is not None for x in (ref_stats_path, reference, reference_data)) != 1:
            raise ValueError("EvalPool: give exactly one of ref_stats_path, reference or reference_data")
        if ref_stats_path is not None:
            if not Path(ref_stats_path).is_file():
                raise FileNotFoundError(f"EvalPool ref_stats_path={ref_stats_path}: no such file "
                                        "(make one with `dip eval ref-stats --data ... --out ref.npz`)")
            from .reference import check_reference_file

            check_reference_file(ref_stats_path)  # a wrong file fails here, not in every actor later
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(include_dashboard=False, log_to_driver=False)
        if not start_timeout_s > 0:
            raise ValueError(f"EvalPool start_timeout_s={start_timeout_s!r}: must be > 0")
        self.num_actors = num_actors
        self.max_actor_restarts = max_actor_restarts
        self.start_timeout_s = start_timeout_s
        self._started = False
        self._resources = resources
        self._device = "cuda" if resources.get("num_gpus", 0) > 0 else "cpu"
        self._threads = max(1, int(resources.get("num_cpus", 1)))
        self.fid_method = fid_method
        if reference is not None:
            self._reference = ray.put(reference.prepare(fid_method))
        elif reference_data is not None:  # computed in the background: the first eval waits for it, nothing else
            self._reference = _build_reference.options(**resources).remote(reference_data, fid_method, self._device)
        else:  # loads in the background (before the actors start): the constructor returns at once
            self._reference = _load_reference.options(**resources).remote(str(ref_stats_path), fid_method,
                                                                          self._device)
        self._actors = [self._new_actor() for _ in range(num_actors)]
        missing = unavailable_resources(resources)
        if missing:  # said at once; an autoscaler may still add such a node within start_timeout_s
            log.warning("eval actors ask for %s, which no node of this Ray cluster has now; they wait up to "
                        "%.0f s for one, then evals are switched off", missing, start_timeout_s)

        self._state = threading.Condition()      # guards everything below
        self._pending: _Job | None = None
        self._running: _Job | None = None
        self._busy = False
        self._closed = False
        self.off_reason: str | None = None      # set when the actors could not start: submits are dropped
        self._results: list[EvalResult] = []
        self.failures: list[EvalFailure] = []
        self.dropped_steps: list[int | None] = []
        self._run_lock = threading.Lock()        # one eval at a time on the actors
        self._thread = threading.Thread(target=self._background_loop, name="dip-eval-pool", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the trainer's side

    def submit(self, checkpoint_path: str | Path, step: int | None, sampling: SamplingSpec) -> None:
        """Queue an eval of a committed checkpoint; returns at once."""
        job = _Job(str(checkpoint_path), step, sampling)
        with self._state:
            if self._closed:
                raise RuntimeError("EvalPool.submit: the pool is closed")
            if self.off_reason is not None:
                log.debug("eval pool is off (%s): step %s not evaluated", self.off_reason, step)
                return
            if self._pending is not None:
                log.warning("eval pool busy: dropping the pending eval of step %s for step %s "
                            "(evals are slower than the eval interval; consider a longer interval)",
                            self._pending.step, step)
                self.dropped_steps.append(self._pending.step)
            self._pending = job
            self._state.notify_all()

    def poll(self) -> list[EvalResult]:
        """Results finished since the last poll (never blocks)."""
        with self._state:
            results, self._results = self._results, []
        return results

    def in_use(self) -> set[str]:
        """The checkpoints of the running and the pending eval: what must stay readable."""
        with self._state:
            return {job.checkpoint for job in (self._running, self._pending) if job is not None}

    @property
    def busy(self) -> bool:
        """An eval is running now."""
        with self._state:
            return self._busy

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no eval is running or pending (e.g. before the last poll of a run)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._state:
            while self._busy or self._pending is not None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._state.wait(remaining)
        return True

    def close(self) -> None:
        """Stop: a running eval is abandoned, pending ones dropped, the actors killed."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            self._pending = None
            self._state.notify_all()
        if ray.is_initialized():  # the caller may have shut Ray down first: the actors are gone then
            for actor in self._actors:
                ray.kill(actor, no_restart=True)
        self._thread.join(timeout=30)
        if self._owns_ray:
            ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ------------------------------------------------------------------ offline

    def evaluate(self, checkpoint_path: str | Path, sampling: SamplingSpec, step: int | None = None,
                 save_npz: str | Path | None = None, on_samples: Callable[[int], None] | None = None) -> EvalResult:
        """Blocking eval (offline `dip eval run`); `save_npz` also writes the ADM sample batch."""
        return self._run(_Job(str(checkpoint_path), step, sampling), save_npz, on_samples)

    def actor_pids(self) -> list[int]:
        return ray.get([actor.pid.remote() for actor in self._actors])

    # ------------------------------------------------------------------ internals

    def _new_actor(self):
        return EvalActor.options(**self._resources).remote(self._reference, self._threads, self._device,
                                                           self.fid_method)

    def _replace_actor(self, slot: int) -> None:
        self._started = False  # the replacement is waited for like the first ones
        ray.kill(self._actors[slot], no_restart=True)
        self._actors[slot] = self._new_actor()

    def _check_open(self) -> None:
        if self._closed:
            raise _Cancelled()

    def _background_loop(self) -> None:
        while True:
            with self._state:
                while self._pending is None and not self._closed:
                    self._state.wait()
                if self._closed:
                    return
                job, self._pending = self._pending, None
                self._running, self._busy = job, True
            try:
                result = self._run(job)
                with self._state:
                    self._results.append(result)
                log.info("eval of step %s: FID %.4f (%d samples, %.1f s)", job.step, result.fid,
                         result.num_samples, result.seconds)
            except _Cancelled:
                return
            except EvalStartError as err:  # a cluster without room for the actors: say so once, stop trying
                log.warning("%s; evals are off for the rest of this run", err)
                with self._state:
                    self.off_reason = str(err)
                    self.failures.append(EvalFailure(job.step, job.checkpoint, f"{type(err).__name__}: {err}"))
                    if self._pending is not None:
                        self.dropped_steps.append(self._pending.step)
                    self._pending = None
                for actor in self._actors:  # withdraw their resource requests
                    ray.kill(actor, no_restart=True)
            except Exception as err:  # an eval must never take training down: record it and go on
                log.error("eval of step %s (%s) failed: %s", job.step, job.checkpoint, err, exc_info=True)
                with self._state:
                    self.failures.append(EvalFailure(job.step, job.checkpoint, f"{type(err).__name__}: {err}"))
            finally:
                with self._state:
                    self._running, self._busy = None, False
                    self._state.notify_all()

    def _run(self, job: _Job, save_npz=None, on_samples=None) -> EvalResult:
        with self._run_lock:
            began = time.perf_counter()
            writer, num_classes = None, None
            try:
                self._wait_started()
                if save_npz is not None:
                    from .images import NpzBatchWriter

                    num_classes = ray.get(self._actors[0].num_classes.remote(job.checkpoint, job.spec))
                    writer = NpzBatchWriter(save_npz, job.spec.num_samples, job.spec.image_size, job.spec.image_size)
                features, grid_parts, restarts = self._run_chunks(job, writer, num_classes, on_samples)
                scores, restarts = self._score(features, restarts)
                if writer is not None:
                    writer.close()
                    writer = None
            except ray.exceptions.RayTaskError as err:
                # An error raised inside the actor (bad checkpoint, bad spec): surface the original.
                self._check_open()
                cause = getattr(err, "cause", None)
                raise (cause if isinstance(cause, Exception) else EvalError(str(err))) from None
            except ray.exceptions.RayActorError as err:
                self._check_open()
                raise EvalError(f"eval of {job.checkpoint}: {err}") from err
            finally:
                if writer is not None:
                    writer.abort()
            grid = sample_grid(np.concatenate([grid_parts[k] for k in sorted(grid_parts)]), GRID_IMAGES)
            return EvalResult(step=job.step, fid=scores.fid, sfid=scores.sfid, precision=scores.precision,
                              recall=scores.recall, num_samples=job.spec.num_samples,
                              seconds=time.perf_counter() - began, sample_grid=grid, checkpoint=job.checkpoint,
                              actor_restarts=restarts)

    def _wait_started(self) -> None:
        """Block until every actor runs (placed, reference loaded), at most start_timeout_s."""
        if self._started:
            return
        pending = [actor.pid.remote() for actor in self._actors]
        deadline = time.monotonic() + self.start_timeout_s
        while pending:
            self._check_open()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                started = len(self._actors) - len(pending)
                missing = unavailable_resources(self._resources)
                why = (f"no node of the Ray cluster has {missing}" if missing else
                       "the cluster's nodes that could hold them are busy (e.g. every GPU runs a training "
                       "worker), or their reference is still loading")
                raise EvalStartError(f"eval actors not started within start_timeout_s={self.start_timeout_s:g} s "
                                     f"({started} of {len(self._actors)} running; each asks for {self._resources}): "
                                     f"{why}")
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=min(1.0, remaining))
            ray.get(ready)  # an actor whose constructor failed raises here
        self._started = True

    def _run_chunks(self, job: _Job, writer, num_classes, on_samples):
        chunks = job.spec.chunks()
        todo = collections.deque(range(len(chunks)))
        idle = collections.deque(range(len(self._actors)))
        running = {}                       # meta ref -> (chunk index, actor slot, features ref)
        features = [None] * len(chunks)    # features refs, in sample order
        grid_parts, restarts = {}, 0
        while todo or running:
            self._check_open()
            while todo and idle:
                slot, index = idle.popleft(), todo.popleft()
                start, stop = chunks[index]
                keep = writer is not None or start < GRID_IMAGES
                meta, feats = self._actors[slot].run_chunk.remote(job.checkpoint, job.spec, start, stop, keep)
                running[meta] = (index, slot, feats)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                index, slot, feats = running.pop(ref)
                try:
                    start, stop, images = ray.get(ref)
                except ray.exceptions.RayActorError as err:
                    self._check_open()
                    restarts = self._count_restart(restarts, slot, err, f"samples {chunks[index]}")
                    todo.appendleft(index)
                    idle.append(slot)
                    continue
                features[index] = feats
                idle.append(slot)
                if start < GRID_IMAGES:
                    grid_parts[start] = images
                if writer is not None:
                    writer.write(start, images, np.arange(start, stop) % num_classes)
                if on_samples is not None:
                    on_samples(stop - start)
        return features, grid_parts, restarts

    def _score(self, features, restarts: int):
        while True:
            self._check_open()
            try:
                return ray.get(self._actors[0].score.remote(*features)), restarts
            except ray.exceptions.RayActorError as err:
                self._check_open()
                restarts = self._count_restart(restarts, 0, err, "scoring")

    def _count_restart(self, restarts: int, slot: int, err: Exception, what: str) -> int:
        restarts += 1
        if restarts > self.max_actor_restarts:
            raise EvalError(f"eval actors died {restarts} times (max_actor_restarts={self.max_actor_restarts}); "
                            f"last: {err}")
        log.warning("eval actor %d died during %s (%s); replacing it and redoing its share",
                    slot, what, type(err).__name__)
        self._replace_actor(slot)
        return restarts


def unavailable_resources(resources: dict) -> dict:
    """What of an actor's resource request no alive node of the Ray cluster has in total ({} = some node fits)."""
    want = {"CPU": resources.get("num_cpus", 0), "GPU": resources.get("num_gpus", 0),
            "memory": resources.get("memory", 0), **resources.get("resources", {})}
    if resources.get("accelerator_type"):
        want[f"accelerator_type:{resources['accelerator_type']}"] = 0.001
    want = {k: v for k, v in want.items() if v}
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    if any(all(node.get(k, 0) >= v for k, v in want.items()) for node in nodes):
        return {}
    return {k: v for k, v in want.items() if not any(node.get(k, 0) >= v for node in nodes)} or want
