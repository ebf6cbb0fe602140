"""CIFAR-10/100 pickle folders: layout, pixel order, pickle protocols, and refusal of
pickles that would run code."""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from densekit.data import DataError, load_dataset

C10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def dump(path: Path, obj, protocol=2) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def batch(n, seed, labels=None, key="labels", bytes_keys=False):
    rng = np.random.default_rng(seed)
    d = {
        "batch_label": "training batch",
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        key: labels if labels is not None else [int(v) for v in rng.integers(0, 10, n)],
        "filenames": [f"img{i}.png" for i in range(n)],
    }
    return {k.encode(): v for k, v in d.items()} if bytes_keys else d


def make_cifar10(parent: Path, n=3, protocol=2, bytes_keys=False) -> tuple[Path, dict]:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = batch(n, i, bytes_keys=bytes_keys)
        dump(folder / name, batches[name], protocol)
    meta = {"num_cases_per_batch": n, "label_names": C10_NAMES, "num_vis": 3072}
    dump(folder / "batches.meta", {k.encode(): v for k, v in meta.items()} if bytes_keys else meta, protocol)
    return folder, batches


def make_cifar100(parent: Path, n_train=6, n_test=4) -> tuple[Path, dict]:
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for name, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        d = batch(n, seed, labels=[(seed * 37 + 13 * i) % 100 for i in range(n)], key="fine_labels")
        d["coarse_labels"] = [0] * n
        out[name] = d
        dump(folder / name, d)
    dump(folder / "meta", {"fine_label_names": [f"fine{i:02d}" for i in range(100)],
                            "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    return folder, out


@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_cifar10_loads_from_folder_or_parent(tmp_path, point_at):
    folder, batches = make_cifar10(tmp_path)
    ds = load_dataset("cifar10", tmp_path if point_at == "parent" else folder, val_fraction=0)
    assert ds.train.images.shape == (15, 3, 32, 32) and ds.test.images.shape == (3, 3, 32, 32)
    assert ds.in_chans == 3 and ds.image_size == (32, 32) and ds.classes == C10_NAMES
    train_order = [f"data_batch_{k}" for k in range(1, 6)]
    assert ds.train.labels.tolist() == sum((batches[b]["labels"] for b in train_order), [])
    assert ds.test.labels.tolist() == batches["test_batch"]["labels"]
    expected = np.concatenate([batches[b]["data"] for b in train_order]).astype(np.float64) / 255
    planes = expected.reshape(-1, 3, 1024)
    assert ds.mean == pytest.approx(tuple(planes[:, c].mean() for c in range(3)), abs=1e-12)
    assert ds.std == pytest.approx(tuple(planes[:, c].std() for c in range(3)), abs=1e-12)


def test_pixel_layout_is_rgb_planes_row_major(tmp_path):
    folder, _ = make_cifar10(tmp_path, n=1)
    data = np.zeros((1, 3072), np.uint8)
    data[0, 0] = 11                   # R, row 0, col 0
    data[0, 1024 + 32 * 2 + 5] = 22   # G, row 2, col 5
    data[0, 2048 + 32 * 31 + 30] = 33  # B, row 31, col 30
    dump(folder / "test_batch", {"data": data, "labels": [4]})
    img = load_dataset("cifar10", folder, val_fraction=0).test.images[0]
    assert img[0, 0, 0] == 11 and img[1, 2, 5] == 22 and img[2, 31, 30] == 33
    assert int(img.sum()) == 66


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickle_protocols_and_bytes_keys(tmp_path, protocol):
    _, batches = make_cifar10(tmp_path, protocol=protocol, bytes_keys=True)
    ds = load_dataset("cifar10", tmp_path, val_fraction=0)
    assert ds.classes == C10_NAMES
    assert torch.equal(ds.test.images.reshape(3, -1), torch.from_numpy(batches["test_batch"][b"data"]))


def test_numpy1_pickles_load_without_warnings(tmp_path):
    """The real files name numpy.core.multiarray, which numpy 2 only keeps as a shim."""
    folder, batches = make_cifar10(tmp_path)
    path = folder / "test_batch"
    raw = pickle.dumps(batches["test_batch"], protocol=2)
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in raw
    path.write_bytes(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset("cifar10", folder, val_fraction=0)
    assert torch.equal(ds.test.images.reshape(3, -1), torch.from_numpy(batches["test_batch"]["data"]))


def test_numpy_int_labels_are_accepted(tmp_path):
    folder, _ = make_cifar10(tmp_path, n=2)
    dump(folder / "test_batch", {"data": np.zeros((2, 3072), np.uint8), "labels": np.array([7, 3])})
    assert load_dataset("cifar10", folder, val_fraction=0).test.labels.tolist() == [7, 3]


def test_cifar100_fine_labels_and_names(tmp_path):
    _, parts = make_cifar100(tmp_path)
    ds = load_dataset("cifar100", tmp_path, val_fraction=0)
    assert len(ds.classes) == 100 and ds.classes[0] == "fine00" and ds.classes[99] == "fine99"
    assert ds.train.labels.tolist() == parts["train"]["fine_labels"]
    assert ds.test.labels.tolist() == parts["test"]["fine_labels"]
    assert ds.train.images.shape == (6, 3, 32, 32)


class _Exploit:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (str(self.target),))


def test_refuses_pickles_that_run_code(tmp_path):
    folder, _ = make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    path = dump(folder / "data_batch_2", {"data": _Exploit(marker), "labels": []})
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", folder, val_fraction=0)
    assert not marker.exists()
    assert str(info.value).startswith(f"{path}: refusing to unpickle {os.mkdir.__module__}.mkdir")


@pytest.mark.parametrize("obj", [pickle.loads, eval, Path])
def test_refuses_other_callables(tmp_path, obj):
    folder, _ = make_cifar10(tmp_path)
    dump(folder / "batches.meta", {"label_names": obj})
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_dataset("cifar10", folder, val_fraction=0)


def test_truncated_pickle(tmp_path):
    folder, _ = make_cifar10(tmp_path)
    path = folder / "data_batch_4"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: corrupt pickle file"):
        load_dataset("cifar10", tmp_path, val_fraction=0)


def test_garbage_file(tmp_path):
    folder, _ = make_cifar10(tmp_path)
    path = folder / "test_batch"
    path.write_bytes(b"<html>404</html>")
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: corrupt pickle file"):
        load_dataset("cifar10", tmp_path, val_fraction=0)


@pytest.mark.parametrize("data, found", [
    (np.zeros((3, 1000), np.uint8), r"uint8 array of shape \(3, 1000\)"),
    (np.zeros((3, 3072), np.float32), r"float32 array of shape \(3, 3072\)"),
    (np.zeros((3, 3, 32, 32), np.uint8), r"uint8 array of shape \(3, 3, 32, 32\)"),
    ([[0] * 3072] * 3, "list"),
], ids=["narrow", "float", "4d", "list"])
def test_bad_data_shape(tmp_path, data, found):
    folder, _ = make_cifar10(tmp_path)
    path = dump(folder / "data_batch_1", {"data": data, "labels": [0, 1, 2]})
    expected = f"^{re.escape(str(path))}: 'data' must be a uint8 array of shape N x 3072, found {found}"
    with pytest.raises(DataError, match=expected):
        load_dataset("cifar10", tmp_path, val_fraction=0)


def test_label_count_mismatch(tmp_path):
    folder, _ = make_cifar10(tmp_path)
    path = dump(folder / "data_batch_5", {"data": np.zeros((3, 3072), np.uint8), "labels": [0, 1]})
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: 3 images but 2 entries in 'labels'"):
        load_dataset("cifar10", tmp_path, val_fraction=0)


@pytest.mark.parametrize("labels", [[0.5, 1.0, 2.0], ["a", "b", "c"], [[0], [1], [2]]])
def test_labels_must_be_integers(tmp_path, labels):
    folder, _ = make_cifar10(tmp_path)
    path = dump(folder / "data_batch_1", {"data": np.zeros((3, 3072), np.uint8), "labels": labels})
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: 'labels' must be a list of integers"):
        load_dataset("cifar10", tmp_path, val_fraction=0)


def test_label_out_of_range(tmp_path):
    folder, _ = make_cifar100(tmp_path)
    path = dump(folder / "test", {"data": np.zeros((2, 3072), np.uint8), "fine_labels": [5, 100]})
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: labels must be in \[0, 99\]"):
        load_dataset("cifar100", tmp_path, val_fraction=0)


def test_missing_labels_key(tmp_path):
    """A CIFAR-100 batch has 'fine_labels'; a CIFAR-10 one in its place is caught."""
    folder, _ = make_cifar100(tmp_path)
    path = dump(folder / "train", batch(2, 0))
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: missing key 'fine_labels'"):
        load_dataset("cifar100", tmp_path, val_fraction=0)


def test_wrong_number_of_class_names(tmp_path):
    folder, _ = make_cifar10(tmp_path)
    path = dump(folder / "batches.meta", {"label_names": C10_NAMES[:9]})
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: 'label_names' must list 10 class names, found 9"):
        load_dataset("cifar10", tmp_path, val_fraction=0)


def test_missing_batch_file(tmp_path):
    folder, _ = make_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=f"^{re.escape(str(folder / 'data_batch_3'))}: file not found"):
        load_dataset("cifar10", tmp_path, val_fraction=0)


def test_missing_folder_lists_expected_files(tmp_path):
    make_cifar10(tmp_path)  # a CIFAR-10 folder is not a CIFAR-100 one
    with pytest.raises(DataError) as info:
        load_dataset("cifar100", tmp_path, val_fraction=0)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path}: no cifar100 data")
    assert "train, test, meta" in msg and str(tmp_path / "cifar-100-python") in msg
