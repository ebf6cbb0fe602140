"""CIFAR-10 and CIFAR-100: the "python version" pickle folders.

``cifar-10-batches-py`` holds ``data_batch_1..5``, ``test_batch`` and ``batches.meta``;
``cifar-100-python`` holds ``train``, ``test`` and ``meta``. Each batch is a pickled
dict with ``data`` (N x 3072 uint8, the 32x32 R plane then G then B) and the labels.

Unpickling runs whatever callables a file names, so a downloaded file could run code
on load; the unpickler here resolves only the handful of numpy and codec callables
that the real files (and re-pickled copies of them) need, and refuses anything else.
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from .core import DataError, Split, check_labels

log = logging.getLogger(__name__)

_LAYOUT = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        train=["train"],
        test=["test"],
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
    ),
}

# What a CIFAR pickle may reference. numpy 2 moved numpy.core to numpy._core; files
# pickled under either name are accepted and resolved in whichever this numpy has.
# _codecs.encode is how pickle protocol 2 writes bytes from Python 3; _frombuffer is
# how protocol 5 writes arrays; scalar is how numpy scalars (e.g. a np.int64 label) go.
_ALLOWED_BUILTIN = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
_ALLOWED_NUMPY_CORE = {("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")}


def _resolve(module: str, name: str) -> object | None:
    if (module, name) in _ALLOWED_BUILTIN:
        return getattr(importlib.import_module(module), name)
    package, _, sub = module.rpartition(".")
    if package in ("numpy.core", "numpy._core") and (sub, name) in _ALLOWED_NUMPY_CORE:
        for candidate in ("numpy._core", "numpy.core"):
            try:
                return getattr(importlib.import_module(f"{candidate}.{sub}"), name)
            except (ImportError, AttributeError):
                continue
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: Path) -> None:
        super().__init__(file, encoding="latin1")  # the original files are Python 2 pickles
        self._source = source

    def find_class(self, module: str, name: str) -> object:
        target = _resolve(module, name)
        if target is None:
            raise DataError(
                f"{self._source}: refusing to unpickle {module}.{name}: a CIFAR file holds only "
                "dicts, lists, bytes and numpy arrays"
            )
        return target


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    except Exception as e:  # a damaged pickle can fail in many ways (EOFError, UnpicklingError, ...)
        raise DataError(f"{path}: corrupt pickle file: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def _get(obj: dict, key: str, path: Path) -> object:
    # Python 2 pickles loaded with encoding="latin1" have str keys; ones written with
    # encoding="bytes" in mind may have bytes keys.
    for k in (key, key.encode()):
        if k in obj:
            return obj[k]
    raise DataError(f"{path}: missing key {key!r}; found keys {sorted(map(str, obj))}")


def _read_batch(path: Path, label_key: str, num_classes: int) -> Split:
    obj = _unpickle(path)
    data = _get(obj, "data", path)
    labels = _get(obj, label_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of shape N x 3072, found {desc}")
    try:
        array = np.asarray(labels)
    except (TypeError, ValueError) as e:  # ragged nested lists
        raise DataError(f"{path}: {label_key!r} must be a list of integers: {e}") from e
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise DataError(f"{path}: {label_key!r} must be a list of integers, found {array.dtype} of shape {array.shape}")
    labels = torch.from_numpy(array.astype(np.int64))
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} entries in {label_key!r}")
    check_labels(labels, num_classes, path)
    images = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32)
    return Split(images=images, labels=labels)


def _read_names(path: Path, key: str, num_classes: int) -> list[str]:
    names = _get(_unpickle(path), key, path)
    if not isinstance(names, (list, tuple)) or len(names) != num_classes:
        found = len(names) if isinstance(names, (list, tuple)) else type(names).__name__
        raise DataError(f"{path}: {key!r} must list {num_classes} class names, found {found}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def find_folder(name: str, data_dir: Path) -> Path:
    """Accept either the batches folder itself or the folder that contains it."""
    layout = _LAYOUT[name]
    for candidate in (data_dir, data_dir / layout["folder"]):
        if (candidate / layout["meta"]).is_file():
            return candidate
    files = ", ".join(layout["train"] + layout["test"] + [layout["meta"]])
    raise DataError(f"{data_dir}: no {name} data: expected {files} here or in {data_dir / layout['folder']}")


def load_cifar(name: str, data_dir: str | os.PathLike) -> tuple[Split, Split, list[str]]:
    """Load the train and test splits of ``cifar10`` or ``cifar100`` from ``data_dir``."""
    if name not in _LAYOUT:
        raise ValueError(f"name must be one of {', '.join(_LAYOUT)}, got {name!r}")
    layout = _LAYOUT[name]
    folder = find_folder(name, Path(data_dir))
    n = layout["num_classes"]
    classes = _read_names(folder / layout["meta"], layout["names_key"], n)

    def read(files: list[str]) -> Split:
        parts = [_read_batch(folder / f, layout["label_key"], n) for f in files]
        return Split(images=torch.cat([p.images for p in parts]), labels=torch.cat([p.labels for p in parts]))

    train, test = read(layout["train"]), read(layout["test"])
    log.info("loaded %s from %s: %d train, %d test images", name, folder, len(train), len(test))
    return train, test, classes
