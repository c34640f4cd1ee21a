"""prepare_dataset (synthetic cache), and clean-up of what a SIGKILLed run leaves behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cluster.cli import main as dip
from data import DataConfig, build_dataloader, prepare_dataset
from data.remote import cache_root, clean_stale_caches
from data.shm import clean_stale_streaming_state, streaming_segments

RES = 32


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_prepare_synthetic_writes_once_and_reuses(tmp_path, fmt):
    config = DataConfig(path="synthetic", format=fmt, resolution=RES, batch_size=8, num_workers=0,
                        synthetic_images=40, synthetic_classes=4)
    ready = prepare_dataset(config, str(tmp_path))
    assert ready.path != "synthetic" and ready.path.startswith(str(tmp_path))
    manifest_path = os.path.join(ready.path, "manifest.json")
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    assert manifest["num_samples"] == 40 and manifest["num_classes"] == 4 and manifest["formats"] == [fmt]
    stamp = os.stat(manifest_path).st_mtime_ns
    assert prepare_dataset(config, str(tmp_path)).path == ready.path  # same params: reused, not rewritten
    assert os.stat(manifest_path).st_mtime_ns == stamp
    assert prepare_dataset(config.replace(seed=1), str(tmp_path)).path != ready.path  # new params: new cache
    loader = build_dataloader(ready, 0, 1)
    pixels, labels, keys = next(loader)
    loader.close()
    assert pixels.shape == (8, 3, RES, RES) and set(labels.tolist()) <= {0, 1, 2, 3}
    assert all(k.split("/")[0].startswith(f"{label:03d}_") for k, label in zip(keys, labels.tolist()))


def test_prepare_real_path_checks_existence(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_dataset(DataConfig(path=str(tmp_path / "missing"), format="mds"), str(tmp_path))


KILLED_RUN = textwrap.dedent("""
    import os, sys, time
    from data import DataConfig, build_dataloader
    from data.remote import register_cache_user
    loader = build_dataloader(DataConfig(path=sys.argv[1], format="mds", resolution=32, batch_size=8,
                                         num_workers=2), 0, 1)
    next(loader)
    register_cache_user(sys.argv[2])
    print(loader._backend.dataset._shm_prefix_int, flush=True)
    time.sleep(600)
""")


@pytest.mark.slow
def test_stale_state_of_a_killed_run_is_cleaned_and_live_state_kept(tmp_path):
    shards = str(tmp_path / "shards")
    assert dip(["data", "shard", "--src", "synthetic", "--num-images", "32", "--resolution", str(RES), "--out", shards,
                "--format", "mds", "--no-progress"]) == 0
    live = build_dataloader(DataConfig(path=shards, format="mds", resolution=RES, batch_size=8, num_workers=0), 0, 1)
    next(live)
    live_prefix = f"{live._backend.dataset._shm_prefix_int:06d}_"
    stale_cache = os.path.join(cache_root(), f"test-killed-{os.getpid()}")
    child = subprocess.Popen([sys.executable, "-c", KILLED_RUN, shards, stale_cache], stdout=subprocess.PIPE,
                             text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             start_new_session=True)
    try:
        killed_prefix = f"{int(child.stdout.readline()):06d}_"
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the rank and its DataLoader workers, no chance to clean up
        child.wait()
    time.sleep(0.5)
    assert any(n.startswith(killed_prefix) for n in streaming_segments())  # left behind by the kill
    assert os.path.isdir(stale_cache)

    clean_stale_streaming_state(grace_s=0)
    removed = clean_stale_caches()
    assert not [n for n in streaming_segments() if n.startswith(killed_prefix)]
    assert stale_cache in removed and not os.path.exists(stale_cache)
    assert any(n.startswith(live_prefix) for n in streaming_segments())  # a live run's state is untouched
    next(live)
    live.close()
