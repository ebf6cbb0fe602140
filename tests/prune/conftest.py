"""The pruning suite's pieces, reused from tests/reliability (and through it tests/train): the
dataset writers, the tiny model, the CLI runner, one torch thread and no stray data root. They
are loaded by path, since the suite runs with --import-mode=importlib (tests/ is no package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from densekit.cli import main

_spec = importlib.util.spec_from_file_location("_densekit_reliability_conftest_for_prune",
                                               Path(__file__).parents[1] / "reliability" / "conftest.py")
_shared = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_shared)

one_thread, no_data_root, cli = _shared.one_thread, _shared.no_data_root, _shared.cli  # fixtures
write_mnist = _shared.write_mnist

# tests/train's tiny BC model with two layers per block, so that a layer reads a concatenation
TINY = [*_shared.TINY, "--model-arg", "block_config=(2,2)"]
# 64 images, batch 8: 8 steps an epoch
RUN = ["--dataset", "mnist", "--epochs", "2", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(MNIST-format data folder, a finished tiny run on it), shared by a module's tests."""
    root = tmp_path_factory.mktemp("prune")
    data, run = write_mnist(root / "mnist"), root / "run"
    assert main([str(a) for a in ("train", *TINY, *RUN, "--data-dir", data, "--out", run)]) == 0
    return data, run
