"""MNIST and Fashion-MNIST: the IDX format, plain or gzip-compressed.

The header is ``00 00 TT DD`` (type code, number of dims), then one big-endian uint32
per dim, then the data. torchvision's ``read_sn3_pascalvincent_tensor`` parses the
same format but only from an uncompressed path and with ``assert`` as its only check;
here the bytes come from memory (so ``.gz`` files need no temporary copy) and every
header field is checked before any data is interpreted, so that a bad file gives an
error that names it.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..checks import text
from .core import DataArgumentError, DataError, Split, check_labels

MAX_BYTES = 1 << 30  # a decompressed IDX file: MNIST's largest is 47 MB

log = logging.getLogger(__name__)

# IDX type code -> big-endian numpy dtype, as in the format's definition.
_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_UINT8 = 0x08

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

CLASSES = {
    # Zalando's label order (fashion-mnist README); importing torchvision.datasets for
    # these ten strings would pull in torch._dynamo, seconds per process.
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                      "Bag", "Ankle boot"],
    "mnist": [str(i) for i in range(10)],
}

_INSTALL_HINT = {
    "fashion-mnist": "install the Debian package dataset-fashion-mnist "
    "(apt-get install dataset-fashion-mnist) or give {data_dir}",
    "mnist": "give {data_dir}, a folder with the four MNIST IDX files",
}


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    # Sniff the gzip magic instead of trusting the suffix: an IDX file always starts
    # with two zero bytes, so the two cannot be confused.
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
            data = f.read(MAX_BYTES + 1)  # a bounded read: a small .gz can expand to gigabytes
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt gzip file: {e}") from e
    if len(data) > MAX_BYTES:
        raise DataError(f"{path}: expands to more than {MAX_BYTES:,} bytes, more than an IDX dataset holds; "
                        "refusing to read it")
    return data


def parse_idx(data: bytes, source: object) -> torch.Tensor:
    """Decode an IDX blob into a tensor of its declared dtype and shape.

    ``source`` names the file in error messages.
    """
    if len(data) < 4:
        raise DataError(f"{source}: truncated IDX file: {len(data)} bytes, shorter than the 4-byte magic number")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _IDX_TYPES or ndim == 0:
        raise DataError(
            f"{source}: not an IDX file: magic number 0x{data[:4].hex()}, expected 0x0000TTDD with "
            f"type code TT in {{{', '.join(f'{c:02x}' for c in _IDX_TYPES)}}} and DD >= 1 dims"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: truncated IDX file: header declares {ndim} dims, file has only {len(data)} bytes")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_TYPES[code]
    # math.prod: a corrupt header's dims can overflow a fixed-width product
    expected = math.prod(shape) * dtype.itemsize
    found = len(data) - header
    if found != expected:
        what = "truncated IDX file" if found < expected else "IDX file has trailing data"
        dims = "x".join(str(s) for s in shape)
        raise DataError(f"{source}: {what}: header says {dims} = {expected} bytes of data, found {found}")
    if code == _UINT8 and expected:
        # bytearray gives torch a writable buffer, so the tensor owns its memory
        # without a further copy or a non-writable-buffer warning.
        flat = torch.frombuffer(bytearray(memoryview(data)[header:]), dtype=torch.uint8)
    else:
        # wider types are big-endian on disk; numpy swaps them (and, unlike
        # torch.frombuffer, accepts zero-length data)
        count = expected // dtype.itemsize
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=header)
        flat = torch.from_numpy(arr.astype(dtype.newbyteorder("=")))
    return flat.view(*shape)


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read one IDX file (plain or gzip) into a tensor; errors name the file."""
    path = Path(path)
    return parse_idx(_read_bytes(path), path)


def _find(data_dir: Path, stem: str, name: str) -> Path:
    for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataArgumentError(f"{text(data_dir / stem)}: file not found (nor {stem}.gz); {_INSTALL_HINT[name]}")


def _read_split(data_dir: Path, images_stem: str, labels_stem: str, name: str) -> Split:
    images_path = _find(data_dir, images_stem, name)
    labels_path = _find(data_dir, labels_stem, name)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise DataError(
            f"{images_path}: expected uint8 images of shape N x H x W (magic 0x00000803), "
            f"got {images.dtype} of shape {'x'.join(map(str, images.shape))}"
        )
    if labels.dtype != torch.uint8 or labels.dim() != 1:
        raise DataError(
            f"{labels_path}: expected uint8 labels of shape N (magic 0x00000801), "
            f"got {labels.dtype} of shape {'x'.join(map(str, labels.shape))}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{images_path}: {len(images)} images but {labels_path} has {len(labels)} labels; "
            "the two files must have the same count"
        )
    check_labels(labels, len(CLASSES[name]), labels_path)
    return Split(images=images.unsqueeze(1), labels=labels.to(torch.int64))


def load_idx(name: str, data_dir: str | os.PathLike) -> tuple[Split, Split, list[str]]:
    """Load the train and test splits of ``mnist`` or ``fashion-mnist`` from ``data_dir``."""
    if name not in CLASSES:
        raise ValueError(f"name must be one of {', '.join(CLASSES)}, got {name!r}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataArgumentError(f"{text(data_dir)}: data directory not found; {_INSTALL_HINT[name]}")
    train = _read_split(data_dir, *_FILES["train"], name)
    test = _read_split(data_dir, *_FILES["test"], name)
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(
            f"{data_dir}: train images are {tuple(train.images.shape[2:])} but test images are "
            f"{tuple(test.images.shape[2:])}; both splits must have the same image size"
        )
    log.info("loaded %s from %s: %d train, %d test images", name, data_dir, len(train), len(test))
    return train, test, list(CLASSES[name])
