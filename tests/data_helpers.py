"""Shared fixtures for the data-layer tests: real image folders, corrupt files, rank processes."""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import socket
import traceback

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog", "eel")


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random image (blurred noise + gradient) that compresses like a photo, not like static."""
    small = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    image = Image.fromarray(small, "RGB").resize((width, height), Image.BICUBIC)
    return image


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_image_folder(root: str, per_class: int = 8, seed: int = 0) -> dict:
    """ImageFolder tree with CLASSES, JPEGs of assorted (non-square) sizes and modes, plus one corrupt
    JPEG (truncated) and one non-image file. Returns {"good": {key: label}, "bad": [keys]}."""
    rng = np.random.default_rng(seed)
    good: dict[str, int] = {}
    for label, name in enumerate(CLASSES):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            width, height = int(rng.integers(40, 96)), int(rng.integers(40, 96))
            image = photo_like(rng, width, height)
            if i == 1:
                image = image.convert("L")  # grayscale JPEGs exist in ImageNet: read back as RGB
            key = f"{name}/img_{i:03d}.jpg"
            with open(os.path.join(root, key), "wb") as handle:
                handle.write(jpeg_bytes(image))
            good[key] = label
    data = jpeg_bytes(photo_like(rng, 80, 64))
    with open(os.path.join(root, "dog", "broken.jpg"), "wb") as handle:
        handle.write(data[: len(data) // 2])  # truncated mid-scan
    with open(os.path.join(root, "eel", "notes.jpg"), "wb") as handle:
        handle.write(b"this is not an image")
    return {"good": good, "bad": ["dog/broken.jpg", "eel/notes.jpg"]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_PRELOAD = ["torch", "torch.distributed", "deepspeed", "tests.data_helpers"]


def _rank_context():
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)  # only read when the server starts (once per session)
    return context


def _rank_main(fn, rank: int, world_size: int, port: int, args: tuple, results, environ: dict) -> None:
    try:
        import torch.distributed as dist

        os.environ.clear()
        os.environ.update(environ)  # the test's environment now (a fault it set), not the server's at its start
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            results.put((rank, fn(rank, world_size, *args), None))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, None, traceback.format_exc()))


def run_ranks(fn, world_size: int, *args, timeout_s: float = 240.0) -> list:
    """Run fn(rank, world_size, *args) in `world_size` real processes joined by a gloo group.

    forkserver, not fork: by the time a test runs here, the pytest process has done torch work, and a
    child forked from a process whose OpenMP pool is running hangs in its first parallel op (libgomp
    is not fork-safe). The server is forked from a clean process that has only *imported* torch and
    DeepSpeed, so each rank still starts in a second, not in the tens of seconds of a spawn re-import.
    `fn` must be importable (a module-level function of a test module).
    """
    context = _rank_context()
    results = context.Queue()
    port = free_port()
    procs = [context.Process(target=_rank_main, args=(fn, r, world_size, port, args, results, dict(os.environ)))
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    out: dict[int, object] = {}
    errors = []
    try:
        for _ in procs:
            rank, value, error = results.get(timeout=timeout_s)
            if error:
                errors.append(f"rank {rank}:\n{error}")
            out[rank] = value
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [out[r] for r in range(world_size)]
