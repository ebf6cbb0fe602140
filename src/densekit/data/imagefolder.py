"""A folder of images per class: ROOT/train/<class>/*, and ROOT/val/<class>/* or
ROOT/test/<class>/*, decoded through ``images.load_images`` like ``predict`` does."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .. import checks
from .core import DataError, Split
from .images import IMAGE_EXTENSIONS, load_images

log = logging.getLogger(__name__)

TEST_FOLDERS = ("val", "test")


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


def _list_split(split_dir: Path, classes: list[str], require_images: bool) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = _image_files(split_dir / name)
        if require_images and not files:
            raise DataError(f"{split_dir / name}: no images; expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
        paths += files
        labels += [label] * len(files)
    return paths, labels


def load_imagefolder(data_dir: str | os.PathLike, image_size: int = 64) -> tuple[Split, Split, list[str], int]:
    """Load ``data_dir`` as an image folder; returns (train, test, classes, in_chans).

    Images are resized to ``image_size`` x ``image_size`` and kept grayscale unless any
    image (train or test) has colour, in which case all are RGB.
    """
    checks.positive_int("image_size", image_size)
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: data directory not found; expected {root}/train/<class>/<image files>")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{root}: no train folder; expected {train_dir}/<class>/<image files>")
    test_dirs = [root / t for t in TEST_FOLDERS if (root / t).is_dir()]
    if not test_dirs:
        raise DataError(f"{root}: no val or test folder; expected {root / 'val'}/<class>/ or {root / 'test'}/<class>/")
    test_dir = test_dirs[0]
    if len(test_dirs) > 1:
        log.warning("%s: both val and test folders exist; evaluating on %s", root, test_dir)

    classes = _class_dirs(train_dir)
    if not classes:
        raise DataError(f"{train_dir}: empty; expected one folder of images per class")
    test_classes = _class_dirs(test_dir)
    if test_classes != classes:
        missing = sorted(set(classes) - set(test_classes))
        extra = sorted(set(test_classes) - set(classes))
        raise DataError(
            f"{test_dir}: class folders must match {train_dir}'s; "
            f"missing {missing or 'none'}, not in train {extra or 'none'}"
        )

    train_paths, train_labels = _list_split(train_dir, classes, require_images=True)
    test_paths, test_labels = _list_split(test_dir, classes, require_images=False)
    if not test_paths:
        raise DataError(
            f"{test_dir}: no images in any class folder; expected files ending in {', '.join(IMAGE_EXTENSIONS)}"
        )
    size = (image_size, image_size)
    # Decode as RGB once; if no image has colour the three planes are equal and one of
    # them is exactly what a grayscale decode would give.
    train_images = load_images(train_paths, 3, size)
    test_images = load_images(test_paths, 3, size)
    colour = any(
        bool((x[:, 0] != x[:, 1]).any() or (x[:, 1] != x[:, 2]).any()) for x in (train_images, test_images)
    )
    in_chans = 3 if colour else 1
    if not colour:
        train_images, test_images = train_images[:, :1].clone(), test_images[:, :1].clone()
    train = Split(images=train_images, labels=torch.tensor(train_labels, dtype=torch.int64))
    test = Split(images=test_images, labels=torch.tensor(test_labels, dtype=torch.int64))
    log.info(
        "loaded imagefolder from %s: %d classes, %d train, %d test images, %s %dx%d",
        root, len(classes), len(train), len(test), "RGB" if colour else "grayscale", image_size, image_size,
    )
    return train, test, classes, in_chans
