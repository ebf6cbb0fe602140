"""Shared pieces of the reliability suite: the tiny datasets and model of tests/train, the
CLI runner, a one-thread torch, subprocess environments and directory snapshots."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

import densekit

# one_thread: also the same kernels as the OMP_NUM_THREADS=1 children whose bits are compared with ours
from testkit import TINY, cli, idx_bytes, one_thread, patterns, run_cli, write_cifar, write_imagefolder, write_mnist  # noqa: F401

SRC = str(Path(densekit.__file__).parents[1])


class Exploit:
    """Unpickling this would create a folder: a stand-in for any code hidden in a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a ``python -m densekit`` child: this checkout, one thread (as in this
    process, so that its kernels and hence its bits are the same), no stray data root."""
    env = {k: v for k, v in os.environ.items() if k != "DENSEKIT_DATA"}
    env.update(PYTHONPATH=SRC, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


PYTHON = sys.executable


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under ``roots``: (kind, size, mtime_ns, sha256) by path."""
    state = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames:
                p = Path(dirpath, name)
                state[str(p)] = ("dir",)
            for name in filenames:
                p = Path(dirpath, name)
                st = p.lstat()
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
                state[str(p)] = ("file", st.st_size, st.st_mtime_ns, digest)
    return state


def diff_snapshots(before: dict, after: dict) -> list[str]:
    changes = [f"removed {p}" for p in before.keys() - after.keys()]
    changes += [f"created {p}" for p in after.keys() - before.keys()]
    changes += [f"changed {p}" for p in before.keys() & after.keys() if before[p] != after[p]]
    return sorted(changes)


@pytest.fixture(autouse=True)
def no_data_root(monkeypatch):
    monkeypatch.delenv("DENSEKIT_DATA", raising=False)
