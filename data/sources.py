"""Image sources for the shard writer: an ImageFolder tree or the built-in `synthetic` set.

A source lists light `SourceItem`s (cheap to pickle to writer processes) and loads one item's
encoded bytes on demand, so listing 1.28M files costs a directory walk, not a read.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

from data import synthetic


@dataclass(frozen=True)
class SourceItem:
    key: str    # stable record key: the relative path (ImageFolder) or "<class>/<index>.png" (synthetic)
    label: int  # class index: position of the class name in the sorted class list
    ref: str    # where to load it from: absolute path (ImageFolder) or the image index (synthetic)


class ImageFolderSource:
    """One sub-folder per class; class index = position in the sorted class-name list (ImageNet)."""

    def __init__(self, root: str) -> None:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--src {root!r}: not a directory (expected an ImageFolder tree or 'synthetic')")
        self.root = os.path.abspath(root)
        self.class_names = sorted(
            entry.name for entry in os.scandir(self.root) if entry.is_dir() and not entry.name.startswith("."))
        if not self.class_names:
            raise ValueError(f"--src {root!r}: no class sub-folders found (ImageFolder layout: ROOT/CLASS/IMAGE)")

    def items(self) -> list[SourceItem]:
        items = []
        for label, name in enumerate(self.class_names):
            class_dir = os.path.join(self.root, name)
            for dirpath, dirnames, filenames in os.walk(class_dir):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for filename in sorted(filenames):
                    if filename.startswith("."):
                        continue
                    path = os.path.join(dirpath, filename)
                    items.append(SourceItem(os.path.relpath(path, self.root).replace(os.sep, "/"), label, path))
        return items

    def load(self, item: SourceItem) -> bytes:
        with open(item.ref, "rb") as handle:
            return handle.read()

    def describe(self) -> str:
        return self.root


class SyntheticSource:
    """The procedural set of `data.synthetic`, encoded as PNG at `resolution` so it takes the same path as photos."""

    def __init__(self, num_images: int, num_classes: int = 10, resolution: int = 64, seed: int = 0) -> None:
        if num_images < 1 or num_classes < 1 or resolution < 8 or seed < 0:
            raise ValueError(
                f"synthetic source: num_images={num_images} (>= 1), classes={num_classes} (>= 1), "
                f"resolution={resolution} (>= 8), seed={seed} (>= 0)")
        self.num_images, self.resolution, self.seed = num_images, resolution, seed
        self.class_names = synthetic.class_names(num_classes)

    def items(self) -> list[SourceItem]:
        num_classes = len(self.class_names)
        return [SourceItem(f"{self.class_names[label]}/{index:08d}.png", label, str(index))
                for index in range(self.num_images)
                for label in [synthetic.label_for(index, num_classes)]]

    def load(self, item: SourceItem) -> bytes:
        image = synthetic.make_image(int(item.ref), item.label, self.resolution, self.seed)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    def describe(self) -> str:
        return (f"synthetic(num_images={self.num_images}, classes={len(self.class_names)}, "
                f"resolution={self.resolution}, seed={self.seed})")


def open_source(src: str, num_images: int | None = None, classes: int = 10, resolution: int | None = None,
                seed: int = 0):
    """The source `dip data shard --src` names: 'synthetic' (`num_images` images of `classes` classes,
    generated at `resolution`, default 64, from `seed`) or the root of an ImageFolder tree."""
    if src == "synthetic":
        if num_images is None:
            raise ValueError("--src synthetic needs --num-images K (and optionally --classes C --seed S)")
        return SyntheticSource(num_images, classes, resolution or 64, seed)
    if num_images is not None:
        raise ValueError("--num-images applies to --src synthetic only")
    return ImageFolderSource(src)
