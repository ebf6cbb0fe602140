"""What many test folders share: tiny datasets in every format, written by the tests, a tiny
model to train on them, the in-process CLI runner, and two fixtures (one torch thread, ``cli``)
that a folder's conftest.py takes in with ``from testkit import ...``. tests/ is on the import
path (pyproject.toml, ``pythonpath``); the suite itself is no package (--import-mode=importlib)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densekit.cli import main

# A DenseNet small enough to train in well under a second on a loaded 2-core CPU: the
# BC-100 variant (CIFAR stem, bottleneck) cut to two blocks of one layer, k=4.
TINY = ["--model", "densenet_bc_100_k12", "--model-arg", "growth_rate=4", "--model-arg", "block_config=(1,1)",
        "--model-arg", "num_init_features=4"]


def patterns(n: int, size: int, chans: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise with a bright square whose place on a 4x4 grid is the label: learnable, and
    not left-right symmetric, so that flips matter."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) * 7 + seed) % num_classes
    images = rng.integers(0, 80, (n, chans, size, size), dtype=np.uint8)
    cell = size // 4
    for i, label in enumerate(labels):
        r, c = divmod(int(label) % 16, 4)
        images[i, :, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = 230
    return images, labels.astype(np.uint8)


def idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_mnist(root: Path, n_train: int = 64, n_test: int = 30, size: int = 16, gz: bool = True) -> Path:
    """The four MNIST IDX files (optionally gzipped) with ``size`` x ``size`` images."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = patterns(n, size, 1, 10, seed)
        for name, arr in ((f"{split}-images-idx3-ubyte", images[:, 0]), (f"{split}-labels-idx1-ubyte", labels)):
            data = idx_bytes(np.ascontiguousarray(arr))
            (root / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(data) if gz else data)
    return root


def write_cifar(root: Path, num_classes: int = 10, n: int = 8) -> Path:
    """A CIFAR-10 (five train batches of ``n``) or CIFAR-100 python pickle folder."""
    def batch(count: int, seed: int, key: str) -> dict:
        images, labels = patterns(count, 32, 3, num_classes, seed)
        return {"data": images.reshape(count, -1), key: [int(v) for v in labels]}

    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i in range(1, 6):
            (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n, i, "labels"), protocol=2))
        (folder / "test_batch").write_bytes(pickle.dumps(batch(n, 9, "labels"), protocol=2))
        names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}, protocol=2))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        (folder / "train").write_bytes(pickle.dumps(batch(5 * n, 1, "fine_labels")))
        (folder / "test").write_bytes(pickle.dumps(batch(n, 2, "fine_labels")))
        (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"class{i:02d}" for i in range(100)]}))
    return root


def write_imagefolder(root: Path, classes=("circle", "cross", "square"), n_train: int = 12, n_test: int = 4,
                      size: int = 20) -> Path:
    """ROOT/train/<class>/*.png and ROOT/test/<class>/*.png, in colour."""
    for split, n, seed in (("train", n_train, 3), ("test", n_test, 4)):
        images, labels = patterns(n * len(classes), size, 3, len(classes), seed)
        for i, (img, label) in enumerate(zip(images, labels)):
            img = img.copy()
            img[int(label) % 3] //= 2  # a colour cast per class, so the folder is RGB
            path = root / split / classes[int(label)] / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.transpose(1, 2, 0)).save(path)
    return root


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``densekit ARGV`` in-process; returns (exit code, stdout, stderr)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: with two intra-op threads every op waits at
    an OpenMP barrier for a core someone else holds, and a step takes 3-4x longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli(capsys):
    return lambda *argv: run_cli(capsys, *argv)


def randomize_norms(module: torch.nn.Module, var=(0.1, 2.0), gamma=(-1.5, 1.5)) -> None:
    """Running statistics and affine parameters away from their defaults in every batch norm of
    ``module``, so that eval-mode paths are compared on more than the identity."""
    for m in module.modules():
        if hasattr(m, "running_var"):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(*var)
            m.weight.data.uniform_(*gamma)
            m.bias.data.uniform_(-0.3, 0.3)


def saved_bytes(model: torch.nn.Module, x: torch.Tensor, skip: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
    """The bytes of the distinct tensors (by address) that autograd keeps for backward while
    ``model(x)`` runs, leaving out ``skip`` where given, and the output."""
    seen = {}

    def pack(t):
        if skip is None or t.data_ptr() != skip.data_ptr():
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    return sum(seen.values()), y
