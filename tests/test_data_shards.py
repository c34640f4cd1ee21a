"""Real shards in a temp dir: ImageFolder (with corrupt files) -> `dip data shard` -> read back, both formats."""
from __future__ import annotations

import json
import os
import tarfile
import warnings

import numpy as np
import pytest
import torch

from cluster.cli.main import main as dip
from data import DataConfig, build_dataloader
from data.loader import CorruptSampleWarning
from data.shm import streaming_segments
from data.records import to_pm1
from data.transforms import adm_center_crop, decode_image, to_tensor_pm1
from data.writer import sha256_file
from tests.data_helpers import CLASSES, make_image_folder

pytestmark = pytest.mark.slow  # DataLoader worker processes and a 2-process shard writer
RES = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("imagefolder"))
    return root, make_image_folder(root, per_class=8)


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    """Originals (no --resolution), both formats, two writer processes, small shards (several per part)."""
    src, truth = folder
    out = str(tmp_path_factory.mktemp("shards"))
    assert dip(["data", "shard", "--src", src, "--out", out, "--format", "both", "--workers", "2",
                "--shard-size", "8KB", "--no-progress"]) == 0
    return out, truth


def read_epoch(path, fmt, num_workers=2, batch_size=4, **kw):
    config = DataConfig(path=path, format=fmt, resolution=RES, batch_size=batch_size, num_workers=num_workers, **kw)
    loader = build_dataloader(config, rank=0, world_size=1)
    try:
        keys, labels, batches = [], [], []
        while True:
            pixels, y, k = next(loader)
            if loader.epoch != 0:  # `epoch` is the epoch of the batch just returned
                break
            keys += k
            labels += y.tolist()
            batches.append(pixels)
        return loader, keys, labels, batches
    finally:
        loader.close()


def test_manifest_lists_counts_skips_and_checksums(shards):
    out, truth = shards
    with open(os.path.join(out, "manifest.json")) as handle:
        manifest = json.load(handle)
    assert manifest["num_samples"] == len(truth["good"]) == 24
    assert manifest["class_names"] == list(CLASSES)
    assert manifest["counts_per_class"] == {"cat": 8, "dog": 8, "eel": 8}
    assert sorted(s["key"] for s in manifest["skipped"]) == sorted(truth["bad"])
    assert manifest["resolution"] is None and manifest["encoding"] == "original"
    for fmt in ("mds", "wds"):
        shard_list = manifest["shards"][fmt]
        assert len(shard_list) > 2  # 8KB shards: several per writer process
        assert sum(s["samples"] for s in shard_list) == 24
        for shard in shard_list:
            assert sha256_file(os.path.join(out, fmt, shard["name"])) == shard["sha256"]
        assert manifest["total_bytes"][fmt] == sum(s["bytes"] for s in shard_list)
    with open(os.path.join(out, "mds", "index.json")) as handle:
        index = json.load(handle)
    assert sum(s["samples"] for s in index["shards"]) == 24


def test_rerun_into_non_empty_dir_refuses_unless_overwrite(shards, folder, capsys):
    out, _ = shards
    src, _ = folder
    assert dip(["data", "shard", "--src", src, "--out", out, "--format", "wds", "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert os.path.exists(os.path.join(out, "mds", "index.json"))  # untouched


def test_bad_flags_are_clear(tmp_path, capsys):
    assert dip(["data", "shard", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert dip(["data", "shard", "--src", "synthetic", "--out", str(tmp_path / "o")]) == 2
    assert "--num-images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dip(["data", "shard", "--src", "synthetic", "--out", "x", "--format", "parquet"])


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_read_back_every_good_image_once_per_epoch(shards, folder, fmt):
    out, truth = shards
    src, _ = folder
    loader, keys, labels, batches = read_epoch(out, fmt, hflip=False)
    assert sorted(keys) == sorted(truth["good"])  # every good image exactly once, the corrupt ones never
    assert all(labels[i] == truth["good"][k] for i, k in enumerate(keys))
    # uint8 pixels (the consumer scales them to [-1, 1] on its device), the ADM crop of the original file
    assert all(b.shape == (4, 3, RES, RES) and b.dtype == torch.uint8 for b in batches)
    first = keys[0]
    with open(os.path.join(src, first), "rb") as handle:
        expected = to_tensor_pm1(adm_center_crop(decode_image(handle.read()), RES))
    torch.testing.assert_close(to_pm1(batches[0][0]), expected)
    assert loader.corrupt_samples == 0  # skipped at write time, not at read time


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_order_is_seeded_and_epochs_differ(shards, fmt):
    out, _ = shards
    config = DataConfig(path=out, format=fmt, resolution=RES, batch_size=4, num_workers=0, seed=3)
    runs = []
    for _ in range(2):
        loader = build_dataloader(config, 0, 1)
        runs.append([k for _ in range(12) for k in next(loader)[2]])  # two epochs of 6 batches
        loader.close()
    assert runs[0] == runs[1]
    assert runs[0][:24] != runs[0][24:] and sorted(runs[0][:24]) == sorted(runs[0][24:])


def test_flip_is_on_by_default_and_seeded(shards, folder):
    out, truth = shards
    src, _ = folder
    _, keys, _, batches = read_epoch(out, "wds", num_workers=0)
    pixels = to_pm1(torch.cat(batches))
    flipped = 0
    for i, key in enumerate(keys):
        with open(os.path.join(src, key), "rb") as handle:
            plain = to_tensor_pm1(adm_center_crop(decode_image(handle.read()), RES))
        if torch.equal(pixels[i], plain.flip(-1)) and not torch.equal(pixels[i], plain):
            flipped += 1
        else:
            assert torch.equal(pixels[i], plain)
    assert 0 < flipped < len(keys)


@pytest.fixture
def precropped(tmp_path):
    out = str(tmp_path / "synthetic")
    assert dip(["data", "shard", "--src", "synthetic", "--num-images", "48", "--resolution", str(RES),
                "--out", out, "--format", "both", "--shard-size", "16KB", "--no-progress"]) == 0
    return out


def _corrupt_one_record(out: str) -> str:
    """Overwrite the middle of one image's bytes inside both the tar and the MDS shard; return its key."""
    with open(os.path.join(out, "manifest.json")) as handle:
        manifest = json.load(handle)
    tar_path = os.path.join(out, "wds", manifest["shards"]["wds"][0]["name"])
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
        image = next(m for m in members if m.name.endswith(".png"))
        key = tar.extractfile(next(m for m in members if m.name == image.name[:-4] + ".key.txt")).read().decode()
        payload = tar.extractfile(image).read()
    patch = payload[len(payload) // 2: len(payload) // 2 + 64]
    for path in [tar_path] + [os.path.join(out, "mds", s["name"]) for s in manifest["shards"]["mds"]]:
        with open(path, "r+b") as handle:
            data = handle.read()
            at = data.find(payload)
            if at >= 0:
                handle.seek(at + len(payload) // 2)
                handle.write(bytes(64 - b for b in range(64)) if patch != bytes(64) else b"\x01" * 64)
    return key


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_corrupt_record_is_skipped_counted_and_warned_once(precropped, fmt):
    key = _corrupt_one_record(precropped)
    config = DataConfig(path=precropped, format=fmt, resolution=RES, batch_size=8, num_workers=2)
    loader = build_dataloader(config, 0, 1)
    keys = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(12):  # two epochs of 6 batches: counted twice, warned once
            pixels, labels, batch_keys = next(loader)
            assert pixels.shape == (8, 3, RES, RES) and labels.shape == (8,)
            keys += batch_keys
    loader.close()
    ours = [w for w in caught if issubclass(w.category, CorruptSampleWarning)]
    assert len(ours) == 1 and key in str(ours[0].message)
    assert loader.corrupt_samples == 2
    assert key not in keys and len(keys) == 96 and loader.epoch == 1
    assert loader.state_dict()["corrupt_samples"] == 2


@pytest.mark.parametrize("fmt, keep_bytes", [("mds", lambda size: 64), ("wds", lambda size: size // 2)])
def test_a_shard_truncated_mid_run_is_skipped_counted_and_named_once(precropped, fmt, keep_bytes):
    """A shard truncated under a running loader: its unreadable samples are replaced by samples of the
    next shard (batches stay whole, positions exact), counted, and the shard is named in one warning."""
    with open(os.path.join(precropped, "manifest.json")) as handle:
        shard = json.load(handle)["shards"][fmt][0]
    path = os.path.join(precropped, fmt, shard["name"])
    loader = build_dataloader(DataConfig(path=precropped, format=fmt, resolution=RES, batch_size=8,
                                         num_workers=0, shuffle=False), 0, 1)
    keys = list(next(loader)[2])
    os.truncate(path, keep_bytes(shard["bytes"]))  # after the loader checked the shards
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(11):  # the rest of two epochs of 6 batches
            pixels, labels, batch_keys = next(loader)
            assert pixels.shape == (8, 3, RES, RES) and labels.shape == (8,)
            keys += batch_keys
    loader.close()
    assert len(keys) == 96 and loader.epoch == 1
    named = [str(w.message) for w in caught if issubclass(w.category, CorruptSampleWarning)
             and f"{shard['name']} (damaged shard)" in str(w.message)]
    assert len(named) == 1, [str(w.message) for w in caught]
    assert loader.corrupt_samples >= 1 and loader.state_dict()["corrupt_samples"] == loader.corrupt_samples


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_a_damaged_shard_is_refused_at_start_and_tolerated_by_a_restarted_worker(precropped, fmt, caplog):
    """Before a run: `prepare_dataset` (the driver) refuses, naming the shard. A worker group that Ray
    restarts in a run whose shard was damaged under it goes on, with a warning naming it."""
    from data import prepare_dataset
    from data.writer import DamagedShardsError

    with open(os.path.join(precropped, "manifest.json")) as handle:
        shard = json.load(handle)["shards"][fmt][-1]
    path = os.path.join(precropped, fmt, shard["name"])
    os.truncate(path, shard["bytes"] // 2)
    config = DataConfig(path=precropped, format=fmt, resolution=RES, batch_size=8, num_workers=0)
    with pytest.raises(DamagedShardsError, match=f"{path} is {shard['bytes'] // 2} bytes, the manifest says "
                                                 f"{shard['bytes']}"):
        prepare_dataset(config, precropped)
    with caplog.at_level("WARNING", logger="data.loader"):
        loader = build_dataloader(config, 0, 1)
    assert f"{path} is {shard['bytes'] // 2} bytes" in caplog.text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptSampleWarning)
        for _ in range(6):
            assert next(loader)[0].shape == (8, 3, RES, RES)
    loader.close()


def test_missing_path_and_format_are_clear(precropped, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_dataloader(DataConfig(path=str(tmp_path / "nope"), format="wds", resolution=RES), 0, 1)
    only_wds = str(tmp_path / "only_wds")
    assert dip(["data", "shard", "--src", "synthetic", "--num-images", "8", "--out", only_wds, "--format", "wds",
                "--no-progress"]) == 0
    with pytest.raises(ValueError, match=r"\['wds'\]"):
        build_dataloader(DataConfig(path=only_wds, format="mds", resolution=RES), 0, 1)
    with pytest.raises(ValueError, match="prepare_dataset"):
        build_dataloader(DataConfig(path="synthetic", resolution=RES), 0, 1)


def test_mds_close_releases_its_shared_memory(precropped):
    loader = build_dataloader(DataConfig(path=precropped, format="mds", resolution=RES, batch_size=8,
                                         num_workers=2), 0, 1)
    next(loader)
    prefix = f"{loader._backend.dataset._shm_prefix_int:06d}_"
    assert any(name.startswith(prefix) for name in streaming_segments())
    loader.close()
    assert not [name for name in streaming_segments() if name.startswith(prefix)]


def _start_together(path: str, start, registered, results) -> None:
    """One job of its own: builds an MDS loader the moment every job is ready, then holds it open."""
    try:
        start.wait(timeout=120)
        loader = build_dataloader(DataConfig(path=path, format="mds", resolution=RES, batch_size=8,
                                             num_workers=0), 0, 1)
        next(loader)
        results.put(("ok", loader._backend.dataset._shm_prefix_int))
        registered.wait(timeout=120)  # all alive at once: each holds its own prefix
        loader.close()
    except BaseException as error:  # reported to the test, which fails on it
        results.put(("error", f"{type(error).__name__}: {error}"))
        registered.abort()


def test_jobs_starting_together_on_one_machine_each_register_their_own_shared_memory(precropped, tmp_path):
    """streaming's ranks pick the first free shared-memory prefix and the leader then creates it: jobs
    that start together picked the same one ('/000000_locals' exists). data/shm.py registers one job at
    a time per machine; four jobs released by one barrier all start, on four different prefixes."""
    import multiprocessing
    import shutil

    jobs = 4
    context = multiprocessing.get_context("fork")
    start, registered, results = context.Barrier(jobs), context.Barrier(jobs), context.Queue()
    paths = [shutil.copytree(precropped, tmp_path / f"job{index}") for index in range(jobs)]
    processes = [context.Process(target=_start_together, args=(str(path), start, registered, results))
                 for path in paths]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=180) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert all(kind == "ok" for kind, _ in outcomes), outcomes
    assert len({prefix for _, prefix in outcomes}) == jobs, outcomes
