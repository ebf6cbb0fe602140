"""The analyze suite's shared pieces: the dataset writers, tiny model and CLI runner of
tests/train (loaded by path: tests/ is not a package), one torch thread, and one tiny
finished run that the CLI tests analyze."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("_densekit_train_conftest_for_analyze",
                                               Path(__file__).parents[1] / "train" / "conftest.py")
_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train)

TINY = list(_train.TINY)
write_mnist = _train.write_mnist
run_cli = _train.run_cli


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core CPU: a second thread only waits at OpenMP barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli(capsys):
    return lambda *argv: run_cli(capsys, *argv)


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("data") / "mnist")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mnist) -> Path:
    """A finished two-epoch run of the tiny model on the tiny MNIST files."""
    from densekit.cli import main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    argv = ["train", *TINY, "--dataset", "mnist", "--data-dir", mnist, "--epochs", "2", "--batch-size", "16",
            "--device", "cpu", "--out", out, "--no-progress"]
    assert main([str(a) for a in argv]) == 0
    return out
