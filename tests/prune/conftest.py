"""The pruning suite's pieces: the shared writers, tiny model and fixtures (testkit), no stray
data root, and one finished tiny run."""

from __future__ import annotations


import pytest

from densekit.cli import main

from testkit import TINY as _TINY, cli, one_thread, write_mnist  # noqa: F401


@pytest.fixture(autouse=True)
def no_data_root(monkeypatch):
    """No DENSEKIT_DATA from the environment: every test names its data."""
    monkeypatch.delenv("DENSEKIT_DATA", raising=False)

# tests/train's tiny BC model with two layers per block, so that a layer reads a concatenation
TINY = [*_TINY, "--model-arg", "block_config=(2,2)"]
# 64 images, batch 8: 8 steps an epoch
RUN = ["--dataset", "mnist", "--epochs", "2", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(MNIST-format data folder, a finished tiny run on it), shared by a module's tests."""
    root = tmp_path_factory.mktemp("prune")
    data, run = write_mnist(root / "mnist"), root / "run"
    assert main([str(a) for a in ("train", *TINY, *RUN, "--data-dir", data, "--out", run)]) == 0
    return data, run
