"""The tiny dataset and model of tests/train, and one trained run directory to export."""

from __future__ import annotations

from pathlib import Path

import pytest

# the shared fixtures: one thread (tiny models on a shared CPU) and the in-process CLI runner
from testkit import TINY, cli, one_thread, write_mnist  # noqa: F401


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A finished run of the tiny model on 16 px MNIST-format data (1 channel, 10 classes).
    Tests that write into it use their own copy."""
    from densekit.cli import main

    root = tmp_path_factory.mktemp("export")
    data = write_mnist(root / "mnist")
    run = root / "run"
    argv = ["train", *TINY, "--dataset", "mnist", "--data-dir", data, "--epochs", "1", "--batch-size", "16",
            "--device", "cpu", "--out", run, "--no-progress"]
    assert main([str(a) for a in argv]) == 0
    return run

