"""Shards read from an S3-compatible server on 127.0.0.1 (moto_server), both formats."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from cluster.cli.main import main as dip
from tests.data_helpers import free_port

pytestmark = pytest.mark.slow
RES = 32


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    port = free_port()
    moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                             "AWS_DEFAULT_REGION")}
    os.environ.update(S3_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    deadline = time.time() + 60
    while True:
        try:
            client.list_buckets()
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not come up")
            time.sleep(0.3)
    yield client
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def s3_shards(s3_server, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("s3src") / "shards")
    assert dip(["data", "shard", "--src", "synthetic", "--num-images", "40", "--resolution", str(RES), "--out", out,
                "--format", "both", "--shard-size", "12KB", "--no-progress"]) == 0
    s3_server.create_bucket(Bucket="dip-data")
    for dirpath, _, filenames in os.walk(out):
        for name in filenames:
            path = os.path.join(dirpath, name)
            s3_server.upload_file(path, "dip-data", "imagenet-mini/" + os.path.relpath(path, out))
    return "s3://dip-data/imagenet-mini", out


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_reads_an_epoch_from_s3_through_a_per_run_cache(s3_shards, fmt):
    from data import DataConfig, build_dataloader, prepare_dataset
    from data.remote import cache_root

    uri, local = s3_shards
    config = prepare_dataset(DataConfig(path=uri, format=fmt, resolution=RES, batch_size=8, num_workers=2), "/unused")
    assert config.cache_dir.startswith(cache_root())  # a per-run cache, the same for every rank of the run
    loader = build_dataloader(config, 0, 1)
    keys = []
    for _ in range(5):
        pixels, labels, batch_keys = next(loader)
        assert pixels.shape == (8, 3, RES, RES)
        keys += batch_keys
    assert len(set(keys)) == 40 and loader.epoch == 0
    cached = [f for _, _, files in os.walk(config.cache_dir) for f in files]
    assert any(f.endswith(".tar") or f.endswith(".mds") for f in cached)
    loader.close()
    assert not os.path.exists(config.cache_dir)  # a normal exit leaves no cache behind


def test_missing_remote_index_is_a_clear_error(s3_shards):
    from data import DataConfig, prepare_dataset

    with pytest.raises(FileNotFoundError, match="s3://dip-data/nothing-here/manifest.json"):
        prepare_dataset(DataConfig(path="s3://dip-data/nothing-here", format="wds", resolution=RES), "/unused")
