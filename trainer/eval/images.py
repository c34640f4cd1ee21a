"""Image sets for evaluation: a folder of image files or an ADM-style `.npz` batch (uint8 `arr_0`).

Both stream: a folder is read one file at a time, an `.npz` member is read in row blocks straight
from the zip (a 50K x 256 x 256 batch is 9.8 GB and never has to fit in memory). A file that is
not a readable image is skipped and counted, never fatal.
"""
from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def read_npz_header(path: str | Path, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    with zipfile.ZipFile(path) as archive, archive.open(_npz_member(archive, path, key)) as member:
        shape, _, dtype = _read_npy_header(member)
    return shape, dtype


def iter_npz_rows(path: str | Path, key: str = "arr_0", rows: int = 256) -> Iterator[np.ndarray]:
    """Blocks of up to `rows` rows of one array inside an `.npz`, read without loading all of it."""
    with zipfile.ZipFile(path) as archive, archive.open(_npz_member(archive, path, key)) as member:
        shape, fortran, dtype = _read_npy_header(member)
        if fortran or dtype.hasobject:
            raise ValueError(f"{path}:{key}: Fortran-ordered or object arrays are not supported")
        row_shape = shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], rows):
            count = min(rows, shape[0] - start)
            buffer = member.read(count * row_bytes)
            if len(buffer) != count * row_bytes:
                raise ValueError(f"{path}:{key}: truncated (expected {shape[0]} rows)")
            yield np.frombuffer(buffer, dtype=dtype).reshape((count, *row_shape))


def _npz_member(archive: zipfile.ZipFile, path, key: str) -> str:
    name = f"{key}.npy"
    if name not in archive.namelist():
        found = sorted(n.removesuffix(".npy") for n in archive.namelist())
        raise ValueError(f"{path}: no array {key!r} in this .npz (it holds {found})")
    return name


def _read_npy_header(member) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    return np.lib.format.read_array_header_2_0(member)


class ImageSet:
    """uint8 RGB images (H, W, 3) from a folder (recursive, sorted) or an `.npz` (`arr_0`, NHWC)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.skipped = 0  # unreadable files met so far
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not self.files:
                raise ValueError(f"{self.path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        elif self.path.is_file() and self.path.suffix == ".npz":
            self.files = None
            shape, dtype = read_npz_header(self.path)
            if len(shape) != 4 or shape[3] != 3 or dtype != np.uint8:
                raise ValueError(f"{self.path}: arr_0 must be uint8 (N, H, W, 3) images, got {dtype} {shape}")
        elif self.path.exists():
            raise ValueError(f"{self.path}: expected an image folder or an .npz batch with arr_0")
        else:
            raise FileNotFoundError(f"{self.path}: no such image folder or .npz file")

    def __len__(self) -> int:
        """Images listed (a folder's unreadable files still count here, `skipped` says how many)."""
        return len(self.files) if self.files is not None else read_npz_header(self.path)[0][0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 (B, H, W, 3) batches; images of different sizes never share a batch."""
        if self.files is None:
            yield from iter_npz_rows(self.path, "arr_0", batch_size)
            return
        pending: list[np.ndarray] = []
        for image in self._folder_images():
            if pending and (image.shape != pending[0].shape or len(pending) == batch_size):
                yield np.stack(pending)
                pending = []
            pending.append(image)
        if pending:
            yield np.stack(pending)

    def _folder_images(self) -> Iterator[np.ndarray]:
        from PIL import Image, UnidentifiedImageError

        for file in self.files:
            try:
                with Image.open(file) as image:
                    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
            except (UnidentifiedImageError, OSError, ValueError) as err:
                self.skipped += 1
                log.warning("skipping unreadable image %s (%s)", file, err)
                continue
            yield pixels


class NpzBatchWriter:
    """Writes an ADM-format sample batch (`arr_0` uint8 (N, H, W, 3), `arr_1` labels) block by block.

    Rows go to a memory-mapped `.npy` beside the output, which is then stored (uncompressed, ZIP64)
    as the `.npz` member: a 50K batch never has to sit in RAM. The `.npz` appears only when complete.
    """

    def __init__(self, path: str | Path, num_images: int, height: int, width: int):
        self.path = Path(path)
        if self.path.suffix != ".npz":
            raise ValueError(f"{self.path}: the sample batch must be an .npz file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._images_file = self.path.with_name(self.path.name + ".arr_0.tmp.npy")
        self._images = np.lib.format.open_memmap(self._images_file, mode="w+", dtype=np.uint8,
                                                 shape=(num_images, height, width, 3))
        self._labels = np.full(num_images, -1, dtype=np.int64)
        self._written = np.zeros(num_images, dtype=bool)

    def write(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        self._images[start:start + len(images)] = images
        self._labels[start:start + len(images)] = labels
        self._written[start:start + len(images)] = True

    def close(self) -> Path:
        if not self._written.all():
            missing = int((~self._written).sum())
            self.abort()
            raise ValueError(f"{self.path}: {missing} sample rows were never written; no file made")
        self._images.flush()
        del self._images
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                archive.write(self._images_file, arcname="arr_0.npy")
                with archive.open("arr_1.npy", "w") as member:
                    np.lib.format.write_array(member, self._labels)
            tmp.replace(self.path)
        finally:
            self._images_file.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        """Remove the partial rows; the .npz is never made."""
        self._images = None
        self._images_file.unlink(missing_ok=True)
