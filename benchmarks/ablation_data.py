"""Real labelled images as ImageFolder trees (ROOT/CLASS/IMAGE.png) for benchmarks/ablation.py.

Two sources, both real images and neither downloaded at run time:
- `fashion-mnist`: Debian's `dataset-fashion-mnist` package (`apt-get install dataset-fashion-mnist`;
  MIT licence): 60,000 training and 10,000 test images, 28 x 28 grayscale, 10 classes. Each image is
  padded with 2 black pixels a side to 32 x 32 (its background is black, so nothing is resampled) and
  written as RGB with the gray value in all three channels: the trainer's 3-channel 32 px, pixel for
  pixel. Other resolutions are made from these 32 px files by the readers' ADM center crop
  (`dip data shard --resolution`, `dip eval ref-stats --image-size`: bicubic upscaling at 64 px).
- `photos`: random 96 px crops of the three photographs that ship inside the venv's matplotlib and
  scikit-learn (china, flower, grace_hopper; the class is the photo). Always at hand: the smoke test's
  data on a machine without the Debian package. Train and test crops are drawn with different seeds.
"""
from __future__ import annotations

import gzip
import os
import shutil

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
# Label order of the dataset; the numeric prefix keeps it the sorted (ImageFolder) order.
FASHION_MNIST_CLASSES = ("tshirt-top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle-boot")
SOURCES = ("fashion-mnist", "photos")
DONE = ".complete"  # written last: a folder without it is a killed write, rebuilt on the next call


def read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format, gzipped): big-endian magic 0x0000 0x08 ndim, then ndim uint32 sizes."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not a uint8 IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(split: str, root: str = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, 28, 28), int labels (N,)) of split 'train' or 't10k'."""
    images = os.path.join(root, f"{split}-images-idx3-ubyte.gz")
    if not os.path.exists(images):
        raise FileNotFoundError(f"Fashion-MNIST not found at {root}: install it with `{FASHION_MNIST_INSTALL}` "
                                "(Debian/Ubuntu), or use --source photos")
    return read_idx(images), read_idx(os.path.join(root, f"{split}-labels-idx1-ubyte.gz")).astype(np.int64)


def to_rgb32(gray28: np.ndarray) -> np.ndarray:
    """(N, 28, 28) -> (N, 32, 32, 3): 2 black pixels of padding a side, gray copied to R, G and B."""
    padded = np.pad(gray28, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[..., None], 3, axis=-1)


def photo_crops(count: int, seed: int, size: int = 96) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """uint8 (count, size, size, 3) random crops of the shipped photos, their photo index, the photo names."""
    from matplotlib import cbook
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)  # china.jpg, flower.jpg (427 x 640)
    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        photos.append(np.asarray(Image.open(handle).convert("RGB")))
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(photos)  # class-balanced
    crops = []
    for label in labels:
        photo = photos[label]
        top, left = rng.integers(0, photo.shape[0] - size + 1), rng.integers(0, photo.shape[1] - size + 1)
        crops.append(photo[top:top + size, left:left + size])
    return np.stack(crops), labels, ("china", "flower", "grace-hopper")


def write_image_folder(images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...], root: str) -> None:
    """uint8 (N, H, W, 3) -> ROOT/<k>-<class>/<index>.png, the DONE marker last."""
    from PIL import Image

    if os.path.exists(root):
        shutil.rmtree(root)
    names = [f"{k}-{name}" for k, name in enumerate(class_names)]
    for name in names:
        os.makedirs(os.path.join(root, name))
    for index, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(os.path.join(root, names[label], f"{index:06d}.png"), compress_level=1)
    open(os.path.join(root, DONE), "w").close()


def image_folders(source: str, out_dir: str, train_images: int, test_images: int) -> tuple[str, str, int]:
    """(train root, test root, number of classes) for `source`, built under out_dir unless already complete.

    train_images / test_images: 0 = the whole split (fashion-mnist); the first K images otherwise.
    """
    if source not in SOURCES:
        raise ValueError(f"source={source!r}: choose one of {', '.join(SOURCES)}")
    tag = f"{source}-{train_images or 'all'}-{test_images or 'all'}"
    train_root, test_root = os.path.join(out_dir, tag, "train"), os.path.join(out_dir, tag, "test")
    if source == "fashion-mnist":
        splits = {train_root: ("train", train_images), test_root: ("t10k", test_images)}
        for root, (split, count) in splits.items():
            if not os.path.exists(os.path.join(root, DONE)):
                images, labels = fashion_mnist(split)
                count = count or len(images)
                write_image_folder(to_rgb32(images[:count]), labels[:count], FASHION_MNIST_CLASSES, root)
        return train_root, test_root, len(FASHION_MNIST_CLASSES)
    for root, (count, seed) in {train_root: (train_images, 0), test_root: (test_images, 1)}.items():
        if not count:
            raise ValueError("source 'photos' needs explicit --train-images and --test-images (> 0)")
        if not os.path.exists(os.path.join(root, DONE)):
            crops, labels, names = photo_crops(count, seed)
            write_image_folder(crops, labels, names, root)
    return train_root, test_root, 3
