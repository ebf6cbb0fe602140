"""tests/train's fixtures; the writers, the tiny model and the shared fixtures live in testkit."""

from __future__ import annotations

from pathlib import Path

import pytest

from testkit import (TINY, cli, one_thread, patterns, run_cli, write_cifar, write_imagefolder,  # noqa: F401
                     write_mnist)


@pytest.fixture
def mnist_dir(tmp_path) -> Path:
    return write_mnist(tmp_path / "mnist")


@pytest.fixture(scope="session")
def tiny() -> list[str]:
    return list(TINY)


@pytest.fixture(scope="session")
def writers():
    class Writers:
        mnist = staticmethod(write_mnist)
        cifar = staticmethod(write_cifar)
        imagefolder = staticmethod(write_imagefolder)
        patterns = staticmethod(patterns)

    return Writers
