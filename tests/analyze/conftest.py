"""The analyze suite's pieces: the shared writers, tiny model and fixtures (testkit), and one
tiny finished run that the CLI tests analyze."""

from __future__ import annotations

from pathlib import Path

import pytest

from testkit import TINY, cli, one_thread, run_cli, write_mnist  # noqa: F401


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
