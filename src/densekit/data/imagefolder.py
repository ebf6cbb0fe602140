"""A folder of images per class: ROOT/train/<class>/**, and optionally ROOT/val/<class>/** (the
validation split) and ROOT/test/<class>/** (the test split, scored once at the end).

Files are listed up front (subfolders included, hidden files and other suffixes skipped, as
torchvision's ImageFolder does) and their headers read for their size and colour mode, which
finds files that are not images before any training. What happens next depends on the size:

- a small collection (``SMALL_IMAGES`` images at most, ``SMALL_BYTES`` at most once decoded at
  the image size) is decoded once, in DataLoader workers, each image's short side resized to
  the image size and its center cropped (aspect ratio kept, nothing squashed), and held in
  memory: the device-resident loader then serves it, as it serves Fashion-MNIST;
- a larger one stays on disk as a :class:`FileSplit`, decoded and augmented batch by batch
  in worker processes (``streaming``), so that memory does not grow with the dataset.

The choice is said in the log. A collection is grayscale when every file is (by its header
when streaming; by its pixels when decoded), else RGB.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.utils.data

from .. import checks
from .core import DataArgumentError, DataError, FileSplit, Split, channel_stats, stratified_split
from .images import IMAGE_EXTENSIONS, header
from .streaming import CROP_PCT, ImageFiles, default_workers

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SMALL_IMAGES = 20_000
SMALL_BYTES = 256 << 20
STATS_SAMPLE = 500  # training images whose pixels give a streamed collection's mean and std
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


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


def _read_headers(split: FileSplit, skip_bad_images: bool) -> tuple[FileSplit, bool]:
    """The split without the files that are not images (skipped with a warning, or refused),
    and whether every file is grayscale by its header."""
    keep, gray = [], True
    for i, path in enumerate(split.paths):
        try:
            mode = header(path)[1]
        except DataError as e:
            if not skip_bad_images:
                raise DataArgumentError(f"{checks.text(e)} (give {{skip_bad_images}} to skip such files "
                                        "with a warning)") from None
            log.warning("skipping %s", e)
            continue
        keep.append(i)
        gray = gray and mode in _GRAY_MODES
    if len(keep) < len(split):
        split = split.subset(torch.tensor(keep, dtype=torch.int64))
    return split, gray


def _as_list(samples: list) -> list:
    return samples


def _decode_all(split: FileSplit, size: int, workers: int, skip_bad_images: bool) -> Split:
    """Every image of ``split`` as uint8 RGB (N, 3, size, size), in ``workers`` processes: short
    side to ``size``, center crop. A file that does not decode is refused, or skipped."""
    files = ImageFiles(split, 3, size, train=False, crop_pct=1.0)
    out = torch.empty((len(split), 3, size, size), dtype=torch.uint8)
    keep = []
    loader = torch.utils.data.DataLoader(files, batch_size=64, num_workers=workers, collate_fn=_as_list,
                                         sampler=[(i, 0) for i in range(len(split))])
    for batch in loader:
        for img, _, error in batch:
            if error and not skip_bad_images:
                raise DataArgumentError(f"{checks.text(error)} (give {{skip_bad_images}} to skip such files "
                                        "with a warning)")
            if error:
                log.warning("skipping %s", error)
            else:
                out[len(keep)] = img
            keep.append(not error)
    kept = torch.tensor(keep, dtype=torch.bool)
    return Split(out[:int(kept.sum())], split.labels[kept].clone())


def load_imagefolder(data_dir: str | os.PathLike, image_size: int, val_fraction: float = 0.1, seed: int = 0,
                     train_limit: int | None = None, workers: int | None = None,
                     skip_bad_images: bool = False) -> dict:
    """The splits of an image folder and what describes them, for ``datasets.load_dataset``:
    train, val, test (None if absent), classes, in_chans, mean, std, val_source, crop_pct."""
    checks.positive_int("image_size", image_size)
    workers = default_workers() if workers is None else workers
    root = Path(data_dir)
    classes, splits = _layout(root)
    gray = True
    for name in list(splits):
        splits[name], is_gray = _read_headers(splits[name], skip_bad_images)
        gray = gray and is_gray
    train = splits["train"]
    if "val" in splits:
        val, val_source = splits["val"], f"the {root / 'val'} folder"
    else:
        kept, held = stratified_split(train.labels, val_fraction, seed)
        train, val = train.subset(kept), train.subset(held)
        val_source = f"{100 * val_fraction:g}% of the training images, stratified by class, seed {seed}"
    if train_limit is not None and train_limit < len(train):
        train = train.subset(torch.arange(train_limit))
    test = splits.get("test")
    count = len(train) + len(val) + (len(test) if test is not None else 0)
    small = count <= SMALL_IMAGES and count * 3 * image_size ** 2 <= SMALL_BYTES
    if small:
        return _in_memory(root, classes, train, val, test, image_size, workers, val_source, skip_bad_images)
    in_chans = 1 if gray else 3
    sample = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:STATS_SAMPLE])
    images = _decode_all(sample, image_size, workers, skip_bad_images=True).images
    mean, std = channel_stats(images[:, :1] if gray else images)
    log.info("imagefolder %s: %d classes, %d train, %d val, %d test images, %s; streamed from disk at %d px "
             "(%d decoding workers); mean and std of %d training images", root, len(classes), len(train), len(val),
             0 if test is None else len(test), "grayscale" if gray else "RGB", image_size, workers, len(sample))
    return dict(train=train, val=val, test=test, classes=classes, in_chans=in_chans, mean=mean, std=std,
                val_source=val_source, crop_pct=CROP_PCT)


def _in_memory(root: Path, classes: list[str], train: FileSplit, val: FileSplit, test: FileSplit | None,
               size: int, workers: int, val_source: str, skip_bad_images: bool) -> dict:
    out = {name: _decode_all(split, size, workers, skip_bad_images) for name, split in
           (("train", train), ("val", val), ("test", test)) if split is not None}
    colour = any(bool((s.images[:, 0] != s.images[:, 1]).any() or (s.images[:, 1] != s.images[:, 2]).any())
                 for s in out.values())
    if not colour:  # a gray image decoded as RGB has three equal planes: one of them is exact
        out = {k: Split(s.images[:, :1].clone(), s.labels) for k, s in out.items()}
    mean, std = channel_stats(out["train"].images)
    log.info("imagefolder %s: %d classes, %d train, %d val, %d test images, %s %dx%d, decoded into memory",
             root, len(classes), len(train), len(val), 0 if test is None else len(test),
             "RGB" if colour else "grayscale", size, size)
    return dict(train=out["train"], val=out["val"], test=out.get("test"), classes=classes,
                in_chans=3 if colour else 1, mean=mean, std=std, val_source=val_source, crop_pct=1.0)
