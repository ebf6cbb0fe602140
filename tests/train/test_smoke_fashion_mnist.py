"""A short real run: Fashion-MNIST from the system package, a tiny model, 20 steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not any((FASHION / f).is_file() for f in ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz")),
                    reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_smoke(cli, tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("DENSEKIT_DATA", raising=False)  # the default location, as `densekit train` uses it
    run = tmp_path / "run"
    # 512 images / 32 = 16 steps an epoch: epoch 1 completes, epoch 2 stops at step 20
    rc, out, err = cli("train", *tiny, "--train-limit", "512", "--batch-size", "32", "--epochs", "2",
                       "--max-steps", "20", "--out", run, "--no-progress")
    assert rc == 0, err
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["epoch"] == 1
    m = metrics[0]
    assert 0 < m["lr"] <= 0.2 and m["seconds"] > 0 and 0 <= m["train_acc"] <= 1
    assert m["train_loss"] < 2.3  # below chance's ln(10) = 2.303 after one epoch
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dataset"] == "fashion-mnist" and summary["input_size"] == [1, 28, 28]
    assert summary["train_images"] == 512 and summary["test_images"] == 10000  # the full test split
    assert summary["steps"] == 20 and summary["total_steps"] == 32 and not summary["finished"]
    assert summary["epochs_completed"] == 1 and summary["epochs"] == 2
    assert summary["params"] == 1550 and summary["macs"] > 0
    assert summary["train_seconds"] > 0 and summary["images_per_second"] > 0
    assert 0 < summary["data_wait_fraction"] < 0.5  # batches held in memory: the step is most of the time
    # a run stopped on the way is not scored on the test split: where to stop is never chosen by it
    assert summary["test_accuracy"] is None and summary["test_loss"] is None and summary["kept_epoch"] == 1
    rc, out, err = cli("train", "--out", run, "--resume", "--no-progress")
    assert rc == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 32
    # better than chance after 32 steps of a 1.5k-parameter model
    assert summary["test_loss"] < math.log(10) and 0.1 < summary["test_accuracy"] <= 1
    assert summary["test_correct"] == round(summary["test_accuracy"] * 10000)
    info = json.loads((run / "model.json").read_text())
    assert info["classes"][0] == "T-shirt/top" and info["preprocessing"]["in_chans"] == 1
