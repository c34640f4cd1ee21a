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

from cluster.cli.main import main as dip
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


@pytest.mark.slow
def test_bad_data_ends_in_a_one_line_error_before_anything_starts(tmp_path, capsys):
    """`dip data shard` and `dip train` on a path that does not exist, an empty folder, a folder whose
    images are all undecodable and (train) a shard set with a truncated shard: exit code 2 and one
    line naming the problem; nothing is written, no Ray is started."""
    import ray
    import yaml

    from tests.test_trainer_support import TINY

    missing, empty, corrupt = tmp_path / "missing", tmp_path / "empty", tmp_path / "corrupt"
    empty.mkdir()
    for name in ("cat", "dog"):
        (corrupt / name).mkdir(parents=True)
        for i in range(3):
            (corrupt / name / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg" * i)

    def one_line_error(argv, needle: str) -> None:
        assert dip(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and needle in err.splitlines()[-1], err

    for src, needle in ((missing, "not a directory"), (empty, "no class sub-folders"),
                        (corrupt, "none of its 6 file(s) is a decodable image")):
        out = tmp_path / f"shards-of-{src.name}"
        one_line_error(["data", "shard", "--src", str(src), "--out", str(out), "--no-progress"], needle)
        assert not (out / "manifest.json").exists() and not (out.exists() and os.listdir(out))

    shards = tmp_path / "shards"
    assert dip(["data", "shard", "--src", "synthetic", "--num-images", "16", "--resolution", "16", "--format", "mds",
                "--shard-size", "2KB", "--out", str(shards), "--no-progress"]) == 0
    with open(shards / "manifest.json") as handle:
        shard = json.load(handle)["shards"]["mds"][1]
    os.truncate(shards / "mds" / shard["name"], 100)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({**TINY, "run_name": "bad-data", "output_dir": str(tmp_path / "runs")}))
    for path, needle in ((missing, "does not exist"), (empty, "not a `dip data shard` output directory (it is empty)"),
                         (corrupt, "it looks like a folder of images: shard it first"),
                         (shards, f"{shard['name']} is 100 bytes, the manifest says {shard['bytes']}")):
        one_line_error(["train", str(config), f"data.path={path}"], needle)
    assert not ray.is_initialized()
