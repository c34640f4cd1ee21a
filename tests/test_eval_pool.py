"""The Ray eval pool on a real local Ray cluster: equals the single-process computation, survives a
SIGKILLed actor with the same result, never blocks submit, drops stale evals, survives failed evals."""
from __future__ import annotations

import logging
import os
import signal
import time

import numpy as np
import pytest
import ray
import torch

from tests.test_eval_support import save_tiny_checkpoint
from tests.test_trainer_support import start_local_ray
from trainer.eval.generation import ChunkRunner
from trainer.eval.local import evaluate_locally
from trainer.eval.pool import EvalPool
from trainer.eval.reference import ReferenceStats
from trainer.eval.spec import SamplingSpec

pytestmark = pytest.mark.slow

IMAGE_SIZE = 32
# 4 chunks of 25 for 2 actors: each actor runs several, and one killed after the first chunk always has
# work left to redo (1 restart). Every sample costs an Inception pass on one CPU thread, three times over
# (local, pool, pool with a kill): 100 samples, not 200, for the same properties.
SPEC = SamplingSpec(steps=2, method="heun", cfg_scale=2.0, cfg_interval=(0.2, 0.9), num_samples=100,
                    seed=7, batch_size=25, image_size=IMAGE_SIZE)
SMALL = SamplingSpec(steps=1, num_samples=8, seed=1, batch_size=4, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def ray_cluster():
    start_local_ray(log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("eval_pool")


@pytest.fixture(scope="module")
def runner():
    return ChunkRunner("cpu")


@pytest.fixture(scope="module")
def checkpoint(workdir):
    return save_tiny_checkpoint(workdir / "run" / "step-10", num_classes=10)


@pytest.fixture(scope="module")
def reference_path(workdir, runner):
    from data.synthetic import reference_images

    from trainer.eval.inception import extract_features

    images, _ = reference_images(60, IMAGE_SIZE, 10)
    pool, spatial = extract_features(runner.extractor, [images.permute(0, 2, 3, 1).numpy()])
    path = workdir / "ref.npz"
    ReferenceStats.from_features(pool, spatial).save(path)
    return path


@pytest.fixture(scope="module")
def local_result(checkpoint, reference_path, runner, workdir):
    # One thread, as in each single-CPU actor: the same kernels, the same bits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return evaluate_locally(checkpoint, SPEC, ReferenceStats.load(reference_path), runner=runner, step=10,
                                save_npz=workdir / "local.npz", fid_method="eigh")
    finally:
        torch.set_num_threads(threads)


def assert_same_scores(result, expected):
    for name in ("fid", "sfid", "precision", "recall"):
        got, want = getattr(result, name), getattr(expected, name)
        assert got is not None and want is not None, name
        assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), (name, got, want)
    np.testing.assert_array_equal(result.sample_grid, expected.sample_grid)


def test_pool_equals_the_single_process_computation(ray_cluster, checkpoint, reference_path, local_result, workdir):
    done = []
    with EvalPool(2, {"num_cpus": 1}, reference_path) as pool:
        result = pool.evaluate(checkpoint, SPEC, step=10, save_npz=workdir / "pool.npz", on_samples=done.append)
    assert sum(done) == SPEC.num_samples and len(done) == len(SPEC.chunks())
    assert result.num_samples == SPEC.num_samples and result.actor_restarts == 0 and result.step == 10
    assert np.isfinite(result.fid) and result.fid > 0
    assert 0.0 <= result.precision <= 1.0 and 0.0 <= result.recall <= 1.0
    assert_same_scores(result, local_result)
    with np.load(workdir / "pool.npz") as pooled, np.load(workdir / "local.npz") as local:
        assert pooled["arr_0"].shape == (SPEC.num_samples, IMAGE_SIZE, IMAGE_SIZE, 3) and pooled["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(pooled["arr_0"], local["arr_0"])  # the very same samples
        np.testing.assert_array_equal(pooled["arr_1"], np.arange(SPEC.num_samples) % 10)  # class-balanced labels


def test_an_actor_killed_mid_eval_gives_the_same_result(ray_cluster, checkpoint, reference_path, local_result, caplog):
    with EvalPool(2, {"num_cpus": 1}, reference_path) as pool:
        victim = pool.actor_pids()[1]
        killed = []

        def kill_after_first_chunk(_count):
            if not killed:  # work is still in flight on both actors: kill one of them hard
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)

        with caplog.at_level(logging.WARNING, logger="trainer.eval.pool"):
            result = pool.evaluate(checkpoint, SPEC, step=10, on_samples=kill_after_first_chunk)
        assert killed and victim not in pool.actor_pids()  # replaced by a fresh process
    assert result.actor_restarts == 1
    assert "died" in caplog.text
    assert_same_scores(result, local_result)


def wait_until(condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_submit_never_blocks_and_drops_the_stale_pending_eval(ray_cluster, checkpoint, reference_path, caplog):
    with EvalPool(1, {"num_cpus": 1}, reference_path) as pool:
        pool.submit(checkpoint, 1, SMALL)
        wait_until(lambda: pool.busy)  # step 1 is running
        with caplog.at_level(logging.WARNING, logger="trainer.eval.pool"):
            pool.submit(checkpoint, 2, SMALL)  # pending
            pool.submit(checkpoint, 3, SMALL)  # replaces step 2, with a warning
        assert pool.poll() == [] and pool.busy  # submit returned while the eval still runs
        assert pool.dropped_steps == [2]
        assert "dropping the pending eval of step 2" in caplog.text
        assert pool.wait_idle(timeout=300)
        results = pool.poll()
    assert [r.step for r in results] == [1, 3]
    assert results[0].fid == pytest.approx(results[1].fid, rel=1e-9)  # same checkpoint, same seeds
    assert results[0].sample_grid.shape == (3 * IMAGE_SIZE, 3 * IMAGE_SIZE, 3)  # 8 samples on a 3 x 3 grid
    assert set(results[0].metrics()) == {"eval/fid", "eval/sfid", "eval/precision", "eval/recall", "eval/seconds"}


def test_a_failed_eval_is_recorded_and_the_pool_goes_on(ray_cluster, checkpoint, reference_path, workdir, caplog):
    with EvalPool(1, {"num_cpus": 1}, reference_path) as pool:
        with caplog.at_level(logging.ERROR, logger="trainer.eval.pool"):
            pool.submit(workdir / "run" / "step-99", 99, SMALL)  # never written
            assert pool.wait_idle(timeout=300)
        assert pool.poll() == []
        assert [f.step for f in pool.failures] == [99] and "step-99" in pool.failures[0].error
        assert "eval of step 99" in caplog.text
        pool.submit(checkpoint, 10, SMALL)
        assert pool.wait_idle(timeout=300)
        assert [r.step for r in pool.poll()] == [10]


def test_bad_pool_arguments_are_clear_errors(ray_cluster, reference_path, tmp_path):
    with pytest.raises(ValueError, match="num_actors"):
        EvalPool(0, {"num_cpus": 1}, reference_path)
    with pytest.raises(ValueError, match="num_cpu.*valid keys"):
        EvalPool(1, {"num_cpu": 1}, reference_path)
    with pytest.raises(FileNotFoundError, match="ref-stats"):
        EvalPool(1, {"num_cpus": 1}, tmp_path / "none.npz")
    np.savez(tmp_path / "wrong.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match=r"wrong\.npz.*'mu' and 'sigma'"):
        EvalPool(1, {"num_cpus": 1}, tmp_path / "wrong.npz")
    with pytest.raises(ValueError, match="fid_method"):
        EvalPool(1, {"num_cpus": 1}, reference_path, fid_method="svd")
    with pytest.raises(ValueError, match="exactly one of ref_stats_path, reference or reference_data"):
        EvalPool(1, {"num_cpus": 1}, reference_path, reference_data=object())


def test_a_reference_built_by_the_pool_equals_the_reference_file(ray_cluster, reference_path):
    """eval.ref_stats: synthetic -> the pool computes the reference in a background Ray task
    (trainer.eval.pool._build_reference): the same statistics as the file of the same images."""
    from trainer.eval.datasets import DatasetRequest
    from trainer.eval.pool import _build_reference

    request = DatasetRequest(data="synthetic", num_samples=60, image_size=IMAGE_SIZE, num_classes=10)
    built = ray.get(_build_reference.options(num_cpus=1).remote(request, "eigh", "cpu"), timeout=300)
    saved = ReferenceStats.load(reference_path)
    assert built.num_images == saved.num_images == 60
    for name in ("pool", "spatial"):
        a, b = getattr(built, name), getattr(saved, name)
        np.testing.assert_allclose(a.mu, b.mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.sigma, b.sigma, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(built.reference_radii(), saved.prepare("eigh").reference_radii(), rtol=1e-5)


def _hook_config(tmp_path, reference_path, overrides=()):
    from trainer.config import config_from_dict

    raw = {"run_name": "hooked", "output_dir": str(tmp_path / "runs"), "model": {"num_classes": 10},
           "data": {"resolution": IMAGE_SIZE}, "checkpoint": {"every_steps": 4, "keep": 1},
           "eval": {"enabled": True, "every_steps": 4, "ref_stats": str(reference_path), "num_samples": 8,
                    "steps": 1, "actors": 1}}
    return config_from_dict(raw, list(overrides))


def _commit_ema(store, step: int, checkpoint) -> None:
    data = (checkpoint / "ema.pt").read_bytes()
    store.write_stream(f"step-{step}/ema.pt", lambda f: f.write(data))
    store.commit(step, {"ema.pt": len(data)}, {"world_size": 1})


def test_an_eval_keeps_its_checkpoint_when_keep_1_prunes_it_before_the_eval_starts(ray_cluster, checkpoint,
                                                                                    reference_path, tmp_path):
    """checkpoint.keep=1: the workers prune step-4 as soon as step-8 commits, while the pool is still
    starting its actor (seconds): the eval of step 4 must still run, on the hook's own link to ema.pt."""
    from trainer.checkpoint.store import CheckpointStore
    from trainer.eval.hook import EvalHook

    store = CheckpointStore(str(tmp_path / "ckpt"))
    _commit_ema(store, 4, checkpoint)
    hook = EvalHook(_hook_config(tmp_path, reference_path), store)
    hook.poll(force=True)
    _commit_ema(store, 8, checkpoint)
    assert store.prune(keep=1) == [4] and not os.path.exists(store.step_path(4))
    assert hook.pool.wait_idle(timeout=300)
    hook.close(wait_s=0.0)  # collects what is done; step 8 is not handed over on this path
    assert hook.pool.failures == [], hook.pool.failures
    assert [r.step for r in hook.results] == [4] and np.isfinite(hook.results[0].fid)
    assert not os.path.exists(hook.inputs_dir)  # the links go with the hook


def test_eval_actors_that_cannot_be_placed_time_out_with_a_warning(ray_cluster, checkpoint, reference_path,
                                                                    tmp_path, caplog):
    """A GPU eval actor on a CPU-only cluster: the driver's end-of-run wait returns after
    eval.start_timeout_s, not after its own 600 s, and later hand-overs are dropped."""
    from trainer.checkpoint.store import CheckpointStore
    from trainer.eval.hook import EvalHook

    store = CheckpointStore(str(tmp_path / "ckpt"))
    _commit_ema(store, 4, checkpoint)
    cfg = _hook_config(tmp_path, reference_path, ["cluster.use_gpu=true", "eval.start_timeout_s=3"])
    with caplog.at_level(logging.WARNING, logger="trainer.eval.pool"):
        hook = EvalHook(cfg, store)
        assert "ask for {'GPU': 1}, which no node of this Ray cluster has now" in caplog.text  # said at once
        hook.poll(force=True)
        _commit_ema(store, 8, checkpoint)
        start = time.monotonic()
        hook.close(wait_s=600.0)  # the end of a run that finished well
        assert time.monotonic() - start < 60
    assert "not started within start_timeout_s=3 s" in caplog.text and "evals are off" in caplog.text
    assert [f.step for f in hook.pool.failures] == [4] and hook.results == []
