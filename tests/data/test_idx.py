"""IDX reader (MNIST, Fashion-MNIST): real data, tiny hand-written files, and every
way a file can be broken."""

from __future__ import annotations

import gzip
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from densekit.data import DataError, load_dataset
from densekit.data.idx import CLASSES, read_idx

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B, np.dtype("i4"): 0x0C,
          np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr)
    header = struct.pack(">BBBB", 0, 0, _CODES[arr.dtype], arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray | bytes) -> Path:
    data = arr if isinstance(arr, bytes) else idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def make_mnist(root: Path, n_train=12, n_test=5, gz=False, seed=0):
    """Four IDX files with random images; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": ((np.arange(n_test) * 3) % 10).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        write_idx(root / (name + (".gz" if gz else "")), arr)
    return arrays


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    start = time.process_time()
    ds = load_dataset("fashion-mnist", val_fraction=0)
    elapsed = time.process_time() - start
    assert ds.train.images.shape == (60000, 1, 28, 28)
    assert ds.test.images.shape == (10000, 1, 28, 28)
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    assert ds.image_size == (28, 28) and ds.in_chans == 1
    assert ds.classes == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert torch.bincount(ds.train.labels).tolist() == [6000] * 10
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10
    assert ds.train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert ds.test.labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    # the published Fashion-MNIST normalization constants
    assert ds.mean == pytest.approx((0.2860406,), abs=1e-6)
    assert ds.std == pytest.approx((0.3530242,), abs=1e-6)
    # This process's CPU time, not wall time: another process on a busy 2-core machine once
    # stretched the wall time of the same load to 3.65 s. About 0.5 s of CPU here (AMD EPYC);
    # a per-image Python loop or a float64 copy would blow well past this.
    assert elapsed < 3.0, f"loading Fashion-MNIST took {elapsed:.2f} s of CPU time"
    # the validation split of every run: a stratified 10%, the test split left whole
    split = load_dataset("fashion-mnist", seed=0)
    assert len(split.train) == 54000 and torch.bincount(split.val.labels).tolist() == [600] * 10
    assert len(split.test) == 10000 and "stratified" in split.val_source


@pytest.mark.parametrize("gz", [False, True])
def test_tiny_mnist_roundtrip(tmp_path, gz):
    arrays = make_mnist(tmp_path, gz=gz)
    ds = load_dataset("mnist", tmp_path, val_fraction=0)
    assert ds.name == "mnist" and ds.classes == [str(i) for i in range(10)]
    assert torch.equal(ds.train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(ds.test.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert ds.train.labels.tolist() == list(range(10)) + [0, 1]
    assert ds.test.labels.tolist() == [0, 3, 6, 9, 2]
    x = arrays["train-images-idx3-ubyte"].astype(np.float64) / 255
    assert ds.mean == pytest.approx((x.mean(),), abs=1e-12)
    assert ds.std == pytest.approx((x.std(),), abs=1e-12)


def test_mixed_plain_and_gz(tmp_path):
    arrays = make_mnist(tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    write_idx(labels.with_name(labels.name + ".gz"), arrays["t10k-labels-idx1-ubyte"])
    labels.unlink()
    assert load_dataset("mnist", tmp_path, val_fraction=0).test.labels.tolist() == [0, 3, 6, 9, 2]


def test_train_limit_keeps_first_images_and_their_stats(tmp_path):
    arrays = make_mnist(tmp_path)
    ds = load_dataset("mnist", tmp_path, train_limit=3, val_fraction=0)
    assert ds.train.images.shape == (3, 1, 28, 28) and ds.train.labels.tolist() == [0, 1, 2]
    assert len(ds.test) == 5
    x = arrays["train-images-idx3-ubyte"][:3].astype(np.float64) / 255
    assert ds.mean == pytest.approx((x.mean(),), abs=1e-12)
    assert len(load_dataset("mnist", tmp_path, train_limit=1000, val_fraction=0).train) == 12


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_train_limit_must_be_positive_int(tmp_path, bad):
    make_mnist(tmp_path)
    with pytest.raises(ValueError, match="train_limit") as info:
        load_dataset("mnist", tmp_path, train_limit=bad, val_fraction=0)
    assert not isinstance(info.value, DataError)


@pytest.mark.parametrize("arr", [
    np.array([[1, -2], [300, -32768]], dtype=np.int16),
    np.array([1.5, -2.25, 1e30], dtype=np.float32),
    np.array([[[7]]], dtype=np.int32),
    np.array([-128, 127], dtype=np.int8),
    np.array([1e-300, 3.0], dtype=np.float64),
    np.zeros((0, 28, 28), dtype=np.uint8),
    np.zeros((0,), dtype=np.int16),
])
def test_read_idx_decodes_big_endian_dtypes(tmp_path, arr):
    t = read_idx(write_idx(tmp_path / "x-idx", arr))
    assert t.shape == arr.shape
    assert np.array_equal(t.numpy(), arr)


def test_truncated_file_names_file_and_sizes(tmp_path):
    make_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[: 16 + 1000])
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path, val_fraction=0)
    assert str(info.value) == (
        f"{path}: truncated IDX file: header says 12x28x28 = 9408 bytes of data, found 1000"
    )


def test_truncated_gz_file(tmp_path):
    make_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    # a valid gzip stream of a truncated IDX payload
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:500]))
    expected = "truncated IDX file: header says 5x28x28 = 3920 bytes of data, found 484"
    with pytest.raises(DataError, match=expected) as info:
        load_dataset("mnist", tmp_path, val_fraction=0)
    assert str(path) in str(info.value)


def test_trailing_data_is_an_error(tmp_path):
    path = write_idx(tmp_path / "labels-idx1-ubyte", idx_bytes(np.zeros(4, np.uint8)) + b"\0\0")
    with pytest.raises(DataError, match="trailing data: header says 4 = 4 bytes of data, found 6"):
        read_idx(path)


@pytest.mark.parametrize("data, message", [
    (b"\x00\x00", "shorter than the 4-byte magic number"),
    (b"\x01\x00\x08\x01" + b"\0" * 8, "not an IDX file: magic number 0x01000801"),
    (b"\x00\x00\x07\x01" + b"\0" * 8, "not an IDX file: magic number 0x00000701"),
    (b"\x00\x00\x08\x00", "not an IDX file"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x01", "header declares 3 dims, file has only 8 bytes"),
    (b"<html>not found</html>", "not an IDX file: magic number 0x3c68746d"),
    (b"\x00\x00\x08\x03" + b"\xff" * 12 + b"\0" * 8,
     "truncated IDX file: header says 4294967295x4294967295x4294967295 = 79228162458924105385300197375 bytes"),
])
def test_bad_headers(tmp_path, data, message):
    path = write_idx(tmp_path / "broken", data)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(info.value).startswith(f"{path}: ")


def test_corrupt_gzip_names_file(tmp_path):
    make_mnist(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[:10] + bytes(b ^ 0x5A for b in raw[10:]))
    with pytest.raises(DataError, match="corrupt gzip file") as info:
        load_dataset("mnist", tmp_path, val_fraction=0)
    assert str(info.value).startswith(f"{path}: ")


def test_cut_off_gzip_stream(tmp_path):
    make_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: corrupt gzip file"):
        load_dataset("mnist", tmp_path, val_fraction=0)


def test_image_label_count_mismatch(tmp_path):
    make_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path, val_fraction=0)
    msg = str(info.value)
    assert "5 images" in msg and "4 labels" in msg
    assert str(tmp_path / "t10k-images-idx3-ubyte") in msg and str(tmp_path / "t10k-labels-idx1-ubyte") in msg


def test_files_swapped(tmp_path):
    make_mnist(tmp_path)
    images, labels = tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte"
    data = images.read_bytes()
    images.write_bytes(labels.read_bytes())
    with pytest.raises(DataError, match=f"^{re.escape(str(images))}: expected uint8 images of shape N x H x W"):
        load_dataset("mnist", tmp_path, val_fraction=0)
    images.write_bytes(data)
    write_idx(labels, np.zeros((12, 2), np.uint8))
    with pytest.raises(DataError, match=f"^{re.escape(str(labels))}: expected uint8 labels of shape N"):
        load_dataset("mnist", tmp_path, val_fraction=0)


def test_wrong_dtype_images(tmp_path):
    make_mnist(tmp_path)
    path = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((12, 28, 28), np.float32))
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: expected uint8 images.*got torch.float32"):
        load_dataset("mnist", tmp_path, val_fraction=0)


def test_label_out_of_range(tmp_path):
    make_mnist(tmp_path)
    path = write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0] * 11 + [10], np.uint8))
    expected = rf"^{re.escape(str(path))}: labels must be in \[0, 9\], found values in \[0, 10\]"
    with pytest.raises(DataError, match=expected):
        load_dataset("mnist", tmp_path, val_fraction=0)


def test_missing_file_says_how_to_install(tmp_path):
    make_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", tmp_path, val_fraction=0)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 't10k-images-idx3-ubyte'}: file not found")
    assert "apt-get install dataset-fashion-mnist" in msg and "give data_dir" in msg
    assert "\n" not in msg


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'nope'))}: data directory not found.*give data_dir"):
        load_dataset("mnist", tmp_path / "nope", val_fraction=0)


def test_class_names_are_complete():
    assert len(CLASSES["fashion-mnist"]) == 10 and CLASSES["fashion-mnist"][0] == "T-shirt/top"
