"""Local or remote shard roots, the per-run download cache, and its clean-up.

Remote files (s3://, gs://, oci://, hf://, https://, ...) are fetched with mosaicml-streaming's own
downloaders (`CloudDownloader`), which honour `S3_ENDPOINT_URL` and the usual cloud credentials.
Webdataset shards use them too, so both formats share one remote path and one cache policy.

Default caches live under `<tmp>/dip-data-cache/<run>/`; each process using one drops a
`users/<pid>-<start time>` marker. `close()` removes its marker and the cache when no user is left;
at start, caches whose users are all dead (a killed run) are removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid

import psutil

from data.config import is_remote

CACHE_ROOT_NAME = "dip-data-cache"


def join(root: str, *parts: str) -> str:
    """Join path pieces under a local directory or a URI (always with '/')."""
    if is_remote(root):
        return "/".join([root.rstrip("/"), *parts])
    return os.path.join(root, *parts)


def fetch(remote: str, local: str, timeout_s: float) -> str:
    """Download `remote` to `local` atomically (temp name + rename); returns `local`. Reuses a cached copy."""
    if os.path.exists(local):
        return local
    from streaming.base.storage.download import CloudDownloader

    os.makedirs(os.path.dirname(local), exist_ok=True)
    temp = f"{local}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        CloudDownloader.direct_download(remote, temp, timeout_s)
        os.replace(temp, local)
    except Exception as err:
        raise FileNotFoundError(f"cannot download {remote} into the cache at {local}: {type(err).__name__}: {err}") from err
    finally:
        if os.path.exists(temp):
            os.remove(temp)
    return local


def read_json(root: str, name: str, cache_dir: str, timeout_s: float) -> dict:
    """Read `root/name` (local) or fetch it into `cache_dir` first (remote)."""
    if is_remote(root):
        path = fetch(join(root, name), os.path.join(cache_dir, name), timeout_s)
    else:
        path = os.path.join(root, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist: is {root!r} a shard directory written by `dip data shard`?")
    with open(path) as handle:
        return json.load(handle)


def cache_root() -> str:
    return os.path.join(tempfile.gettempdir(), CACHE_ROOT_NAME)


def default_cache_dir(path: str, run_token: str | None = None) -> str:
    """A per-run cache directory for `path`. Ranks that share a node and a run must agree on it:
    `prepare_dataset` fixes it once in the driver; without it we key on the launcher's run id."""
    token = run_token or os.environ.get("DIP_RUN_ID") or os.environ.get("TORCHELASTIC_RUN_ID") \
        or f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}:{os.getppid()}"
    digest = hashlib.sha1(f"{path}|{token}".encode()).hexdigest()[:16]
    return os.path.join(cache_root(), digest)


def process_token(pid: int) -> str:
    """A process's name, "<pid>-<start time>": unique even after the pid is reused."""
    try:
        return f"{pid}-{int(psutil.Process(pid).create_time())}"
    except psutil.Error:
        return f"{pid}-0"


def token_alive(token: str) -> bool:
    """The process a `process_token` names still runs (on this host)."""
    pid_text, _, started = token.partition("-")
    try:
        return process_token(int(pid_text)) == token
    except ValueError:
        return False


def register_cache_user(cache_dir: str) -> str:
    users = os.path.join(cache_dir, ".users")
    os.makedirs(users, exist_ok=True)
    marker = os.path.join(users, process_token(os.getpid()))
    open(marker, "w").close()
    return marker


def release_cache_user(cache_dir: str, marker: str) -> None:
    """Drop our marker; remove the cache if no live process still uses it."""
    if os.path.exists(marker):
        os.remove(marker)
    users = os.path.join(cache_dir, ".users")
    alive = [u for u in (os.listdir(users) if os.path.isdir(users) else []) if token_alive(u)]
    if not alive:
        shutil.rmtree(cache_dir, ignore_errors=True)


def clean_stale_caches() -> list[str]:
    """Remove default caches whose users are all dead (left by a killed run). Returns what was removed."""
    root = cache_root()
    removed = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        cache_dir = os.path.join(root, name)
        users_dir = os.path.join(cache_dir, ".users")
        users = os.listdir(users_dir) if os.path.isdir(users_dir) else []
        if users and not any(token_alive(u) for u in users):
            shutil.rmtree(cache_dir, ignore_errors=True)
            removed.append(cache_dir)
    return removed
