"""The generalization gap from metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from densekit.analyze import check_records, overfitting
from densekit.errors import UserError
from densekit.rundir import RunDir


def read_metrics(run_dir):
    return check_records(RunDir(run_dir).read_metrics(), run_dir)


def record(epoch, train_acc, val_acc, train_loss, val_loss):
    return dict(epoch=epoch, train_acc=train_acc, val_acc=val_acc, train_loss=train_loss, val_loss=val_loss,
                lr=0.1, seconds=1.0)


HISTORY = [record(1, 0.70, 0.72, 0.90, 0.80), record(2, 0.85, 0.84, 0.60, 0.55),
           record(3, 0.95, 0.86, 0.30, 0.60), record(4, 0.99, 0.85, 0.10, 0.75)]


def test_gaps_per_epoch_and_the_onset_of_overfitting():
    result = overfitting(HISTORY)
    gaps = [(e["epoch"], round(e["acc_gap"], 6), round(e["loss_gap"], 6)) for e in result["epochs"]]
    assert gaps == [(1, -0.02, -0.1), (2, 0.01, -0.05), (3, 0.09, 0.3), (4, 0.14, 0.65)]
    s = result["summary"]
    assert (s["best_epoch"], s["best_val_acc"], s["num_epochs"]) == (3, 0.86, 4)
    assert s["final_acc_gap"] == pytest.approx(0.14) and s["max_acc_gap"] == pytest.approx(0.14)
    assert s["final_loss_gap"] == pytest.approx(0.65)
    # test loss up while train loss down: epochs 3 and 4, not 2
    assert s["val_loss_up_train_loss_down"] == [3, 4]


def test_read_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HISTORY) + "\n")
    assert read_metrics(tmp_path) == HISTORY


@pytest.mark.parametrize("content, message", [
    (None, "metrics.jsonl: file not found"),
    ("", "no epoch recorded yet"),
    ('{"epoch": 1,\n', "line 1: cannot read JSON"),
    (json.dumps(dict(record(1, 0.5, 0.5, 1.0, 1.0), val_loss=None)) + "\n", "lacks a number for 'val_loss'"),
])
def test_damaged_metrics_are_user_errors(tmp_path, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(UserError, match=message):
        read_metrics(tmp_path)
