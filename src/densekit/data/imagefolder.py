"""A folder of images per class: ROOT/train/<class>/**, and optionally ROOT/val/<class>/** (the
validation split) and ROOT/test/<class>/** (the test split, scored once at the end).

Files are listed up front (subfolders included, hidden files and other suffixes skipped, as
torchvision's ImageFolder does); ``files.load_files`` then decides whether the collection is
decoded into memory or streamed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .core import DataError, FileSplit
from .files import load_files
from .images import IMAGE_EXTENSIONS

SPLITS = ("train", "val", "test")


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and _visible(p))


def _image_files(class_dir: Path) -> list[Path]:
    # Subfolders are searched too, as torchvision's ImageFolder does; files with other
    # suffixes (README, Thumbs.db, .DS_Store) are skipped rather than treated as errors.
    return sorted(
        p
        for p in class_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
    )


def _list_split(split_dir: Path, classes: list[str], require_images: bool) -> tuple[list[str], list[int]]:
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = _image_files(split_dir / name)
        if require_images and not files:
            raise DataError(f"{split_dir / name}: no images; expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
        paths += [str(f) for f in files]
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"{split_dir}: no images in any class folder; expected files ending in "
                        f"{', '.join(IMAGE_EXTENSIONS)}")
    return paths, labels


def _layout(root: Path) -> tuple[list[str], dict[str, FileSplit]]:
    """The classes (train's folders) and each split present, as files."""
    if not root.is_dir():
        raise DataError(f"{root}: data directory not found; expected {root}/train/<class>/<image files>")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{root}: no train folder; expected {train_dir}/<class>/<image files>")
    classes = _class_dirs(train_dir)
    if not classes:
        raise DataError(f"{train_dir}: empty; expected one folder of images per class")
    splits = {}
    for name in SPLITS:
        folder = root / name
        if not folder.is_dir():
            continue
        if name != "train" and _class_dirs(folder) != classes:
            missing = sorted(set(classes) - set(_class_dirs(folder)))
            extra = sorted(set(_class_dirs(folder)) - set(classes))
            raise DataError(f"{folder}: class folders must match {train_dir}'s; missing {missing or 'none'}, "
                            f"not in train {extra or 'none'}")
        paths, labels = _list_split(folder, classes, require_images=name == "train")
        splits[name] = FileSplit(paths, torch.tensor(labels, dtype=torch.int64))
    return classes, splits


def load_imagefolder(data_dir: str | os.PathLike, image_size: int, val_fraction: float = 0.1, seed: int = 0,
                     train_limit: int | None = None, workers: int | None = None,
                     skip_bad_images: bool = False, stream: bool | None = None) -> dict:
    """The splits of an image folder and what describes them (``files.load_files``)."""
    root = Path(data_dir)
    classes, splits = _layout(root)
    return load_files(f"imagefolder {root}", splits, classes, image_size, val_fraction, seed, train_limit, workers,
                      skip_bad_images, val_named=f"the {root / 'val'} folder", stream=stream)
