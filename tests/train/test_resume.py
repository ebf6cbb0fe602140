"""Resuming: an interrupted run, stopped by --max-steps or killed outright, ends bit-identical
to an uninterrupted one; a diverged run keeps its last good checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

import densekit
from densekit.cli import main
from densekit.errors import UserError
from densekit.rundir import RunDir
from densekit.rundir.files import write as _write

# 64 images / batch 8 = 8 steps an epoch, 2 epochs; the fast recipe (warmup, cosine,
# label smoothing, crops) so that every piece of state matters.
RUN = ["--dataset", "mnist", "--epochs", "2", "--batch-size", "8", "--deterministic", "--no-progress"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(run / "model.safetensors")


def assert_same_run(run: Path, ref: Path) -> None:
    a, b = weights(run), weights(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit, not approximately
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
                       for line in (p / "metrics.jsonl").read_text().splitlines()]
    assert strip(run) == strip(ref)
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (run, ref))
    keys = ("steps", "kept_epoch", "val_accuracy", "val_loss", "test_accuracy", "test_loss")
    assert [sa[k] for k in keys] == [sb[k] for k in keys]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny, writers):
    """An uninterrupted run, shared by the tests that compare against it."""
    root = tmp_path_factory.mktemp("resume")
    data = writers.mnist(root / "mnist")
    run = root / "reference"
    assert main([str(a) for a in ["train", *tiny, *RUN, "--data-dir", data, "--out", run]]) == 0
    return data, run


def test_max_steps_then_resume_is_bit_identical(cli, tiny, reference, tmp_path, caplog):
    data, ref = reference
    run = tmp_path / "run"
    base = ["train", *tiny, *RUN, "--data-dir", data, "--out", run]
    rc, out, err = cli(*base, "--max-steps", "3")  # stops inside epoch 1
    assert rc == 0, err
    meta = RunDir(run).read_resume_meta()
    assert (meta["epoch"], meta["step_in_epoch"], meta["global_step"]) == (0, 3, 3)
    summary = json.loads((run / "summary.json").read_text())
    assert not summary["finished"] and summary["steps"] == 3 and "--resume" in out
    assert (run / "metrics.jsonl").read_text() == ""

    rc, out, err = cli("train", "--out", run, "--resume", "--max-steps", "11", "--save-every", "2")  # into epoch 2
    assert rc == 0, err
    meta = RunDir(run).read_resume_meta()
    assert (meta["epoch"], meta["step_in_epoch"]) == (1, 5) and meta["config"]["save_every"] == 2  # 6 steps an epoch
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1

    # the same command as the first, without --resume, picks the unfinished run up again
    caplog.set_level("INFO", logger="densekit")
    rc, out, err = cli(*base)
    assert rc == 0, err
    assert "resuming" in caplog.text
    assert_same_run(run, ref)


def test_killed_process_resumes_bit_identical(cli, tiny, reference, tmp_path):
    """`python -m densekit`, killed with SIGKILL at an arbitrary step, loses nothing but time."""
    data, ref = reference
    run = tmp_path / "run"
    # one thread, as in this process (conftest.one_thread): the same kernels, the same bits
    env = dict(os.environ, PYTHONPATH=str(Path(densekit.__file__).parents[1]), OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "densekit", "train", *tiny, *RUN, "--data-dir", str(data), "--out", str(run),
            "--save-every", "1"]
    argv.remove("--no-progress")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if RunDir(run).read_resume_meta()["global_step"] >= 6:
                    break
            except UserError:
                pass  # not written yet
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "epoch 1/2:" in stderr and "/12 [" in stderr  # the progress bar, on stderr
    meta = RunDir(run).read_resume_meta()
    assert 6 <= meta["global_step"] < 12

    rc, out, err = cli("train", "--out", run, "--resume")
    assert rc == 0, err
    assert_same_run(run, ref)
    assert not list(run.glob(".*.tmp"))  # what the kill left half-written is cleaned up


def test_nan_loss_stops_and_keeps_the_last_checkpoint(cli, tiny, reference, tmp_path):
    data, _ = reference
    run = tmp_path / "run"
    rc, out, err = cli("train", *tiny, *RUN, "--data-dir", data, "--out", run, "--recipe", "paper",
                       "--lr", "1e30", "--save-every", "1")
    assert rc == 2 and out == ""
    line = err.strip().splitlines()[-1]
    assert line.startswith("densekit train: error: loss is nan at step 2 (epoch 1, batch 2 of 6)"), err
    assert "step 1) is kept" in line
    meta = RunDir(run).read_resume_meta()
    assert meta["global_step"] == 1
    state = safetensors.torch.load_file(run / "resume.safetensors")
    assert all(t.isfinite().all() for k, t in state.items() if t.is_floating_point())
    assert not (run / "summary.json").exists() and not (run / "model.safetensors").exists()


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "state.bin"
    _write(path, b"old", replace=True)

    def killed(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        _write(path, b"new and longer", replace=True)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]  # the temp file is cleaned up
    monkeypatch.undo()
    _write(path, b"new", replace=True)
    assert path.read_bytes() == b"new" and oct(path.stat().st_mode & 0o777) != "0o600"


def test_corrupt_resume_state_is_a_user_error(cli, tiny, reference, tmp_path):
    data, _ = reference
    run = tmp_path / "run"
    assert cli("train", *tiny, *RUN, "--data-dir", data, "--out", run, "--max-steps", "1")[0] == 0
    (run / "resume.safetensors").write_bytes((run / "resume.safetensors").read_bytes()[:100])
    rc, out, err = cli("train", "--out", run, "--resume")
    assert rc == 2 and "resume.safetensors" in err and len(err.strip().splitlines()) == 1


def test_streamed_folder_resumes_mid_epoch_bit_identical(cli, tiny, writers, tmp_path, monkeypatch, caplog):
    # a folder counted as large is decoded in worker processes, each image with its own seeded
    # crop and flip: stopped inside an epoch and resumed, the run is the uninterrupted one
    from densekit.data import files

    monkeypatch.setattr(files, "SMALL_IMAGES", 5)
    data = writers.imagefolder(tmp_path / "photos", n_train=10, n_test=2)  # 30 train images, 3 classes
    base = ["train", *tiny, "--dataset", "imagefolder", "--data-dir", data, "--image-size", "16", "--epochs", "2",
            "--batch-size", "6", "--workers", "1", "--deterministic", "--no-progress"]
    rc, _, err = cli(*base, "--out", tmp_path / "ref")
    assert rc == 0, err
    summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["val_images"] == 3  # 27 images to train on: 4 batches an epoch
    run = tmp_path / "run"
    rc, _, err = cli(*base, "--out", run, "--max-steps", "2")
    assert rc == 0, err
    assert RunDir(run).read_resume_meta()["step_in_epoch"] == 2
    caplog.set_level("INFO", logger="densekit")
    rc, _, err = cli("train", "--out", run, "--resume", "--no-progress")
    assert rc == 0, err
    assert "streamed from disk" in caplog.text and "resuming" in caplog.text
    assert_same_run(run, tmp_path / "ref")


def test_a_resumed_run_keeps_the_precision_it_started_with(cli, tiny, reference, tmp_path):
    # started in fp32 on purpose: resumed without --precision it goes on in fp32, bit-identical to
    # an uninterrupted fp32 run, whatever the device's default
    data, _ = reference
    ref, run = tmp_path / "ref", tmp_path / "run"
    base = ["train", *tiny, *RUN, "--data-dir", data, "--precision", "fp32"]
    assert cli(*base, "--out", ref)[0] == 0
    rc, _, err = cli(*base, "--out", run, "--max-steps", "3")
    assert rc == 0, err
    assert RunDir(run).read_resume_meta()["config"]["precision"] == "fp32"
    rc, _, err = cli("train", "--out", run, "--resume")
    assert rc == 0, err
    assert json.loads((run / "summary.json").read_text())["precision"] == "fp32"
    assert_same_run(run, ref)
