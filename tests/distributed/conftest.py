"""The tiny model and dataset writers of tests/train/conftest.py, loaded by path (the suite
runs with --import-mode=importlib, so tests/ is not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_densekit_train_conftest_dist",
                                               Path(__file__).parents[1] / "train" / "conftest.py")
_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train)

TINY: list[str] = list(_train.TINY)
write_mnist = _train.write_mnist
run_cli = _train.run_cli
one_thread = _train.one_thread  # tiny models on a shared 2-core machine: one intra-op thread
