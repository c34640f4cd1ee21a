"""Data-loading throughput per core: decoded, ADM-cropped images/s through `build_dataloader`.

Compares, on the same images in the same run:
  (a) shards of the original JPEGs, cropped at read time to 256 and 512, MDS and webdataset;
  (b) shards pre-cropped to 256 (`dip data shard --resolution 256`, PNG, JPEG q95 and raw npy), MDS and webdataset;
  against a plain PIL ImageFolder loop (open, decode, ADM crop, to [-1, 1] tensor).
Everything runs in one process with one torch thread and DataLoader workers = 0, so each figure is
the work of one core; a rank with K worker processes scales it by about K.

Images: random crops (ImageNet-like sizes, ~500x375) of the real photos that ship with
scikit-learn (`load_sample_images`), saved as JPEG q90; falls back to smooth noise without it.

    .venv/bin/python benchmarks/data.py [--images 400] [--batch 32]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

TARGET_PER_CORE = 1500  # pre-cropped 256 px; one 8-GPU node at ~600 img/s per H100 needs 4800 img/s


def photos() -> list[np.ndarray]:
    try:
        from sklearn.datasets import load_sample_images

        return list(load_sample_images().images)  # (427, 640, 3) uint8 each
    except ImportError:
        rng = np.random.default_rng(0)
        small = rng.integers(0, 256, (54, 80, 3), dtype=np.uint8)
        return [np.asarray(Image.fromarray(small).resize((640, 427), Image.BICUBIC))]


def make_folder(root: str, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    sources = photos()
    for i in range(count):
        photo = sources[i % len(sources)]
        scale = rng.uniform(1.0, 1.3)
        image = Image.fromarray(photo).resize((int(640 * scale), int(427 * scale)), Image.BICUBIC)
        w, h = int(rng.integers(420, 520)), int(rng.integers(330, 420))
        x, y = int(rng.integers(0, image.width - w)), int(rng.integers(0, image.height - h))
        crop = image.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        os.makedirs(os.path.join(root, f"class{i % 10}"), exist_ok=True)
        crop.save(os.path.join(root, f"class{i % 10}", f"{i:05d}.jpg"), quality=90)


class Clock:
    """Wall time and this process's CPU time (all threads). On a shared machine, images per CPU-second is
    the per-core figure; wall time also counts the time other jobs held the cores."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rates(self, images: int) -> tuple[float, float]:
        return images / (time.process_time() - self.cpu), images / (time.perf_counter() - self.wall)


def plain_pil_loop(root: str, resolution: int) -> float:
    from data.transforms import adm_center_crop, to_tensor_pm1

    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
    clock = Clock()
    for path in files:
        with Image.open(path) as image:
            to_tensor_pm1(adm_center_crop(image.convert("RGB"), resolution))
    return clock.rates(len(files))


def loader_rate(path: str, fmt: str, resolution: int, batch: int, count: int) -> float:
    from data import DataConfig, build_dataloader

    loader = build_dataloader(DataConfig(path=path, format=fmt, resolution=resolution, batch_size=batch,
                                         num_workers=0, pin_memory=False), 0, 1)
    next(loader)  # first batch: shard open / thread start, not steady state
    batches = (count - batch) // batch
    clock = Clock()
    for _ in range(batches):
        next(loader)
    rates = clock.rates(batches * batch)
    loader.close()
    return rates


def shard(src: str, out: str, resolution: int | None, encoding: str = "png") -> None:
    from data.sources import ImageFolderSource
    from data.writer import ShardOptions, write_shards

    write_shards(ImageFolderSource(src), ShardOptions(out=out, format="both", resolution=resolution,
                                                      encoding=encoding, shard_size=32 << 20, workers=1,
                                                      progress=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dip-bench-data-") as tmp:
        src = os.path.join(tmp, "folder")
        make_folder(src, args.images)
        sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(src) for f in fs]
        print(f"{args.images} JPEG q90 photos, mean {np.mean(sizes) / 1024:.0f} KiB, ~500x375 px; "
              f"batch {args.batch}; 1 thread, workers=0 (per core)")
        originals, png256, jpg256, npy256 = (os.path.join(tmp, n) for n in ("orig", "png256", "jpg256", "npy256"))
        shard(src, originals, None)
        shard(src, png256, 256, "png")
        shard(src, jpg256, 256, "jpeg")
        shard(src, npy256, 256, "npy")
        for resolution in (256, 512):
            base = plain_pil_loop(src, resolution)
            rows.append((f"plain PIL ImageFolder loop -> {resolution}", base, base))
            for fmt in ("mds", "wds"):
                rows.append((f"{fmt} original JPEGs -> {resolution}",
                             loader_rate(originals, fmt, resolution, args.batch, args.images), base))
        base = plain_pil_loop(src, 256)
        for name, path in (("PNG", png256), ("JPEG q95", jpg256), ("npy (raw)", npy256)):
            for fmt in ("mds", "wds"):
                rows.append((f"{fmt} pre-cropped 256 {name}", loader_rate(path, fmt, 256, args.batch, args.images),
                             base))
    print(f"\n{'path':40s} {'img/CPU-s':>10s} {'vs PIL loop':>12s} {'wall img/s':>11s}")
    for name, (cpu_rate, wall_rate), (base_cpu, _) in rows:
        print(f"{name:40s} {cpu_rate:10.0f} {cpu_rate / base_cpu:11.2f}x {wall_rate:11.0f}")
    best = max(rates[0] for name, rates, _ in rows if "pre-cropped" in name)
    print(f"\nbest pre-cropped 256 px: {best:.0f} img/s/core (target {TARGET_PER_CORE}); "
          f"cores to feed one 8xH100 node at 600 img/s/GPU: {8 * 600 / best:.1f}")
    print(f"load average during the run: {os.getloadavg()[0]:.1f}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
