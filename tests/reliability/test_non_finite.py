"""Non-finite values: an infinite or NaN loss, or weights that a finite loss's gradient made
non-finite, stop training with one line naming the step, and leave the last good
checkpoint exactly as it was (same bytes, never rewritten). tests/train/test_resume.py
covers a NaN loss from a huge learning rate in a fresh run; here the bad value is injected
at chosen steps of a resumed run, so the good checkpoint can be compared byte for byte."""

from __future__ import annotations

import json

import pytest
import torch

from densekit.rundir import RunDir, pruned_structure

from .conftest import TINY, diff_snapshots, snapshot, write_mnist

# 64 images / batch 16 = 4 steps an epoch.
RUN = ["--dataset", "mnist", "--epochs", "2", "--batch-size", "16", "--deterministic", "--device", "cpu",
       "--no-progress"]


class _InfGrad(torch.autograd.Function):
    """Identity forward; an infinite gradient backward: a finite loss that wrecks the weights."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def poison_loss(monkeypatch, at_call: int, how: str) -> None:
    """Make the ``at_call``-th training loss (counted from now) infinite, NaN, or finite with an
    infinite gradient. The trainer builds its criterion as ``nn.CrossEntropyLoss``."""
    calls = [0]
    base = torch.nn.CrossEntropyLoss

    class Poisoned(base):
        def forward(self, logits, target):
            loss = super().forward(logits, target)
            calls[0] += 1
            if calls[0] != at_call:
                return loss
            if how == "inf":
                return loss * float("inf")
            if how == "nan":
                return loss * float("nan")
            return _InfGrad.apply(loss)

    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", Poisoned)


@pytest.fixture
def stopped_run(cli, tmp_path):
    """A run stopped by --max-steps 6 (epoch 2, batch 2), with its files as they were."""
    data = write_mnist(tmp_path / "mnist", n_train=74)  # 10 held out to validate on: 64 to train, 4 steps an epoch
    run = tmp_path / "run"
    rc, out, err = cli("train", *TINY, *RUN, "--data-dir", data, "--out", run, "--max-steps", "6")
    assert rc == 0, err
    assert RunDir(run).read_resume_meta()["global_step"] == 6
    return run, {name: (run / name).read_bytes() for name in ("resume.safetensors", "model.safetensors", "metrics.jsonl")}


@pytest.mark.parametrize("how, save_every, at_call, message", [
    # the first step after the resume, with a checkpoint due at that very step
    ("inf", "1", 1, "loss is inf at step 7 (epoch 2, batch 3 of 4)"),
    # the last step of the epoch: the end-of-epoch checkpoint, metrics and weights are due
    ("nan", "100", 2, "loss is nan at step 8 (epoch 2, batch 4 of 4)"),
    # a finite loss whose gradient is infinite: caught by the weight check before the save
    ("grad", "1", 1, "the weights became non-finite by step 7"),
])
def test_non_finite_stops_with_the_step_and_keeps_the_checkpoint(cli, stopped_run, monkeypatch, how, save_every,
                                                                 at_call, message):
    run, before = stopped_run
    files = snapshot(run)
    poison_loss(monkeypatch, at_call, how)
    rc, out, err = cli("train", "--out", run, "--resume", "--save-every", save_every, "--device", "cpu",
                       "--no-progress")
    assert rc == 2 and out == "", err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"densekit train: error: {message}"), err
    assert f"(step 6) is kept in {run}; try a lower --lr" in lines[0]

    # the last good state, byte for byte and never rewritten (same mtime)
    after = snapshot(run)
    for name in ("resume.safetensors", "model.safetensors"):
        assert after[str(run / name)] == files[str(run / name)], name
    assert {name: (run / name).read_bytes() for name in before} == before
    assert json.loads((run / "summary.json").read_text())["steps"] == 6  # no summary of a diverged run
    assert not list(run.glob(".*.tmp"))
    assert not {p for p in diff_snapshots(files, after) if not p.endswith("metrics.jsonl")}  # only rewritten as is

    # the kept checkpoint is a good one: without the poison the run goes on to its end
    monkeypatch.undo()
    rc, out, err = cli("train", "--out", run, "--resume", "--device", "cpu", "--no-progress")
    assert rc == 0, err
    assert json.loads((run / "summary.json").read_text())["finished"]
