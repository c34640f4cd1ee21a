"""Real images for reference statistics, class-balanced when a sample count is given.

`--data` may be: "synthetic" (data.synthetic's procedural set), an ImageFolder tree (ROOT/CLASS/IMAGE,
ADM center-cropped to --image-size), a `dip data shard` output directory (`manifest.json`; read once
through data.build_dataloader), a flat folder of images, or an ADM `.npz` batch (`arr_0`, labels in
`arr_1` when present). Unreadable images are skipped and counted.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .images import IMAGE_EXTENSIONS, ImageSet, iter_npz_rows

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DatasetRequest:
    data: str
    num_samples: int | None = None    # None: every image; else exactly this many, class-balanced
    image_size: int | None = None     # ADM center crop for image folders; required for synthetic / shards
    num_classes: int | None = None    # synthetic only (other sources know their classes)
    seed: int = 0                     # synthetic only: which procedural set
    start: int = 0                    # synthetic only: first index (held-out images beyond the training ones)
    batch_size: int = 64

    def __post_init__(self):
        for name in ("num_samples", "image_size", "num_classes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r}: must be a positive integer")


@dataclasses.dataclass
class ReadCounts:
    images: int = 0
    skipped: int = 0


class ClassQuota:
    """Exactly `total` picks, as even across `num_classes` as possible (the first total % C classes get one more)."""

    def __init__(self, total: int, num_classes: int):
        base, extra = divmod(total, num_classes)
        self.left = np.array([base + (c < extra) for c in range(num_classes)], dtype=np.int64)

    def wants(self, label: int) -> bool:
        return 0 <= label < len(self.left) and self.left[label] > 0

    def take(self, label: int) -> None:
        self.left[label] -= 1

    @property
    def done(self) -> bool:
        return not self.left.any()


def dataset_batches(request: DatasetRequest, counts: ReadCounts) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches of the requested reference images."""
    path = Path(request.data)
    if request.data == "synthetic":
        source = _synthetic(request)
    elif path.is_file() and path.suffix == ".npz":
        source = _npz(path)
    elif path.is_dir() and (path / "manifest.json").is_file():
        source = _shards(path, request, counts)
    elif path.is_dir() and any(p.is_dir() for p in path.iterdir()):
        source = _image_folder(path, request, counts)
    elif path.is_dir():
        source = _flat_folder(path, request, counts)
    elif path.exists():
        raise ValueError(f"--data {path}: expected 'synthetic', an image folder, a shard directory or an .npz")
    else:
        raise FileNotFoundError(f"--data {path}: no such file or directory")
    yield from _balanced_batches(source, request, counts)


def _balanced_batches(source, request: DatasetRequest, counts: ReadCounts) -> Iterator[np.ndarray]:
    """Sources yield (image, label); an image may be a callable that decodes it (None when unreadable),
    so images beyond a class's quota are never decoded and an unreadable one never uses up a place."""
    quota = None
    pending = []
    for image, label in source:
        if request.num_samples is not None:
            if label is None:  # unlabelled: the first num_samples images
                if counts.images >= request.num_samples:
                    break
            else:
                if quota is None:
                    quota = ClassQuota(request.num_samples, _num_classes(request, source))
                if quota.done:
                    break
                if not quota.wants(int(label)):
                    continue
        if callable(image):
            image = image()
            if image is None:
                continue
        if quota is not None:
            quota.take(int(label))
        if pending and (image.shape != pending[0].shape or len(pending) == request.batch_size):
            yield np.stack(pending)
            pending = []
        pending.append(image)
        counts.images += 1
    if pending:
        yield np.stack(pending)
    if quota is not None and not quota.done:
        raise ValueError(f"--data {request.data}: not enough images for {request.num_samples} class-balanced "
                         f"samples (short by {int(quota.left.sum())}; classes short: "
                         f"{np.flatnonzero(quota.left).tolist()[:10]})")


def _num_classes(request: DatasetRequest, source) -> int:
    known = getattr(source, "num_classes", None) or request.num_classes
    if known is None:
        raise ValueError(f"--data {request.data}: class-balanced sampling needs --num-classes")
    return known


class _synthetic:
    def __init__(self, request: DatasetRequest):
        if request.image_size is None:
            raise ValueError("--data synthetic needs --image-size")
        self.request = request
        self.num_classes = request.num_classes or 10

    def __iter__(self):
        from data.synthetic import reference_images

        r = self.request
        total = r.num_samples if r.num_samples is not None else 10_000
        # The set is round-robin over classes, so any prefix is balanced: read exactly `total`.
        for offset in range(0, total, r.batch_size):
            images, labels = reference_images(min(r.batch_size, total - offset), r.image_size, self.num_classes,
                                              r.seed, r.start + offset)
            for image, label in zip(images.permute(0, 2, 3, 1).numpy(), labels.tolist()):
                yield image, label


def _npz(path: Path):
    with np.load(path) as archive:
        labels = archive["arr_1"] if "arr_1" in archive.files else None
    index = 0
    for block in iter_npz_rows(path, "arr_0", 256):
        for image in block:
            yield image, (None if labels is None else int(labels[index]))
            index += 1


def _flat_folder(path: Path, request: DatasetRequest, counts: ReadCounts):
    """Unlabelled images (ADM center-cropped when --image-size is given)."""
    images = ImageSet(path)
    try:
        for batch in images.batches(1):
            image = batch[0]  # (H, W, 3)
            if request.image_size is not None:
                from PIL import Image

                from data.transforms import adm_center_crop

                image = np.asarray(adm_center_crop(Image.fromarray(image), request.image_size))
            yield image, None
    finally:
        counts.skipped += images.skipped


class _image_folder:
    def __init__(self, root: Path, request: DatasetRequest, counts: ReadCounts):
        from data.sources import ImageFolderSource

        self.source = ImageFolderSource(str(root))
        self.num_classes = len(self.source.class_names)
        self.request, self.counts = request, counts

    def __iter__(self):
        for item in self.source.items():
            if Path(item.key).suffix.lower() in IMAGE_EXTENSIONS:
                yield (lambda item=item: self._decode(item)), item.label

    def _decode(self, item) -> np.ndarray | None:
        from data.transforms import CorruptImageError, adm_center_crop, decode_image

        try:
            image = decode_image(self.source.load(item))
        except CorruptImageError as err:
            self.counts.skipped += 1
            log.warning("skipping unreadable image %s (%s)", item.key, err)
            return None
        if self.request.image_size is not None:
            image = adm_center_crop(image, self.request.image_size)
        return np.asarray(image, dtype=np.uint8)  # (H, W, 3)


class _shards:
    """A `dip data shard` output directory, read once in order through the data layer's loader."""

    def __init__(self, path: Path, request: DatasetRequest, counts: ReadCounts):
        import json

        if request.image_size is None:
            raise ValueError(f"--data {path} (shards) needs --image-size (the resolution to read at)")
        self.path, self.request, self.counts = path, request, counts
        self.manifest = json.loads((path / "manifest.json").read_text())
        self.num_classes = int(self.manifest.get("num_classes") or 0) or request.num_classes

    def __iter__(self):
        from data import build_dataloader
        from data.config import DataConfig

        formats = self.manifest.get("formats", [])
        fmt = "mds" if "mds" in formats else "wds"
        config = DataConfig(path=str(self.path), format=fmt, resolution=self.request.image_size,
                            batch_size=self.request.batch_size, num_workers=0, hflip=False, shuffle=False)
        loader = build_dataloader(config, rank=0, world_size=1)
        try:
            first_epoch, seen = loader.epoch, 0
            while seen < loader.num_samples:  # the loader is endless: stop after one pass
                pixels, labels, _keys = next(loader)  # uint8 (B, 3, N, N)
                if loader.epoch != first_epoch:
                    break
                images = pixels.permute(0, 2, 3, 1)  # (B, N, N, 3)
                for image, label in zip(images.numpy(), labels.tolist()):
                    yield image, label
                seen += len(labels)
        finally:
            self.counts.skipped += loader.corrupt_samples
            loader.close()


def build_reference(request: DatasetRequest, out: str | Path | None = None, device: str = "cpu",
                    keep_features: int = 10_000, on_images=None):
    """Reference statistics of a dataset (what `dip eval ref-stats` runs); saved to `out` when given.
    Returns (ReferenceStats, ReadCounts)."""
    from .inception import InceptionFeatures, extract_features
    from .reference import ReferenceStats

    if out is not None and Path(out).suffix != ".npz":
        raise ValueError(f"--out {out}: must end in .npz")
    counts = ReadCounts()
    extractor = InceptionFeatures().to(device)
    pool, spatial = extract_features(extractor, dataset_batches(request, counts), device, on_images)
    reference = ReferenceStats.from_features(pool, spatial, keep_features=keep_features)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        reference.save(out)
    return reference, counts
