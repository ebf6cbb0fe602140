"""Dataset names, where their files live by default, and the one entry point that loads them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .. import checks
from .cifar import load_cifar
from .csvfile import CsvLayout, layout_from_dict, load_csv
from .core import DataArgumentError, DataError, Dataset, Split, channel_stats, stratified_split
from .idx import load_idx
from .imagefolder import load_imagefolder

log = logging.getLogger(__name__)

DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "csv")

# Where Debian's dataset packages put the files (dataset-fashion-mnist installs the
# .gz IDX files in the first).
_SYSTEM_DIRS = {
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
    "mnist": Path("/usr/share/datasets/mnist"),
}

ENV_VAR = "DENSEKIT_DATA"


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def default_data_dir(name: str) -> Path:
    """Where ``name`` is read from when no directory is given.

    With ``DENSEKIT_DATA=ROOT`` set: ``ROOT/<name>`` if it exists, else ``ROOT``.
    Otherwise the Debian package location for fashion-mnist and mnist; the other
    datasets have no default and raise DataError.
    """
    _check_name(name)
    root = os.environ.get(ENV_VAR)
    if root:
        root_path = Path(root)
        return root_path / name if (root_path / name).is_dir() else root_path
    if name in _SYSTEM_DIRS:
        return _SYSTEM_DIRS[name]
    raise DataArgumentError(f"{name}: no default data directory; give {{data_dir}} or set {ENV_VAR}")


FIXED_SIZE = ("fashion-mnist", "mnist", "cifar10", "cifar100")  # every image one size, the format's


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    train_limit: int | None = None,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    workers: int | None = None,
    skip_bad_images: bool = False,
    csv: CsvLayout | dict | None = None,
    stream: bool | None = None,
) -> Dataset:
    """Load dataset ``name`` from ``data_dir`` (default: ``default_data_dir(name)``).

    Every dataset gets a validation split: its own (an image folder's ``val/``), or
    ``val_fraction`` of the training images, stratified by class and chosen by ``seed``
    (``core.stratified_split``); the test split, where the dataset has one, is left whole.
    ``train_limit`` keeps only the first N of the remaining training images (the statistics
    are then those of the kept images, since they are what the model trains on).
    ``image_size`` is the side of the batches (default: the images' own for the fixed-size
    formats, which loaders resize per batch when it differs; 224 for image files).
    ``workers`` and ``skip_bad_images`` are for image files (an image folder, a CSV): decoding
    processes, and whether a file that does not decode (or a CSV row's missing image) is
    skipped with a warning instead of refused. ``csv``, for the csv dataset and it alone, names
    its CSV files and columns (``csvfile.CsvLayout``, or its fields as a dict, as a run keeps it).
    ``stream``, for image files: decoded into memory (False) or streamed (True) whatever their
    number (default: by their number and size, ``files.load_files``).
    """
    _check_name(name)
    checks.optional(checks.positive_int, "train_limit", train_limit)
    checks.optional(checks.positive_int, "image_size", image_size)
    checks.fraction("val_fraction", val_fraction)
    if name == "csv" and csv is None:
        raise DataArgumentError("the csv dataset needs {csv}, a CsvLayout naming its CSV files and columns")
    if name != "csv" and csv is not None:
        raise DataArgumentError(f"{{csv}} describes the csv dataset's files; {name} has none")
    if isinstance(csv, dict):
        csv = layout_from_dict(csv)
    path = Path(data_dir) if data_dir is not None else default_data_dir(name)
    if name in ("imagefolder", "csv"):
        size = 224 if image_size is None else image_size
        if name == "csv":
            parts = load_csv(path, csv, size, val_fraction, seed, train_limit, workers, skip_bad_images, stream)
        else:
            parts = load_imagefolder(path, size, val_fraction, seed, train_limit, workers, skip_bad_images, stream)
        return Dataset(name=name, image_size=(size, size), **parts)
    if name in ("fashion-mnist", "mnist"):
        train, test, classes = load_idx(name, path)
        in_chans = 1
    else:
        train, test, classes = load_cifar(name, path)
        in_chans = 3
    kept, held = stratified_split(train.labels, val_fraction, seed)
    train, val = train.subset(kept), train.subset(held)
    if train_limit is not None and train_limit < len(train):
        train = train.subset(torch.arange(train_limit))
    mean, std = channel_stats(train.images)
    side = train.images.shape[-1] if image_size is None else image_size
    return Dataset(name=name, train=train, val=val, test=test, classes=classes, in_chans=in_chans,
                   image_size=(side, side), mean=mean, std=std,
                   val_source=f"{100 * val_fraction:g}% of the training images, stratified by class, seed {seed}")
