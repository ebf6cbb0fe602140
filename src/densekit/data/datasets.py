"""Dataset names, where their files live by default, and the one entry point that loads them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .. import checks
from .cifar import load_cifar
from .core import DataArgumentError, DataError, Dataset, Split, channel_stats
from .idx import load_idx
from .imagefolder import load_imagefolder

log = logging.getLogger(__name__)

DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder")

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


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    train_limit: int | None = None,
    image_size: int | None = None,
) -> Dataset:
    """Load dataset ``name`` from ``data_dir`` (default: ``default_data_dir(name)``).

    ``train_limit`` keeps only the first N training images (the statistics are then
    those of the kept images, since they are what the model trains on).
    ``image_size`` is the side images are resized to, for imagefolder only (default
    64); the other formats have a fixed size and ignore it.
    """
    _check_name(name)
    checks.optional(checks.positive_int, "train_limit", train_limit)
    checks.optional(checks.positive_int, "image_size", image_size)
    path = Path(data_dir) if data_dir is not None else default_data_dir(name)

    if name in ("fashion-mnist", "mnist"):
        train, test, classes = load_idx(name, path)
        in_chans = 1
    elif name in ("cifar10", "cifar100"):
        train, test, classes = load_cifar(name, path)
        in_chans = 3
    else:
        train, test, classes, in_chans = load_imagefolder(path, 64 if image_size is None else image_size)
    if image_size is not None and name != "imagefolder":
        log.info("%s: image_size=%d ignored; this format has a fixed size", name, image_size)

    if train_limit is not None and train_limit < len(train):
        # clone, so the dropped images' memory is freed rather than kept alive by a view
        train = Split(images=train.images[:train_limit].clone(), labels=train.labels[:train_limit].clone())
    mean, std = channel_stats(train.images)
    return Dataset(
        name=name,
        train=train,
        test=test,
        classes=classes,
        in_chans=in_chans,
        image_size=(int(train.images.shape[2]), int(train.images.shape[3])),
        mean=mean,
        std=std,
    )
