"""Crash safety: a training run killed with SIGKILL again and again, at random moments and
in the middle of checkpoint writes, loses nothing but time.

One ``python -m densekit train`` child per life, each started with the very command the
user first typed (no --resume: the same command picks an unfinished run up again). After
every kill each published file of the run directory must load, with densekit's readers
and with safetensors' own; at the end the weights must be bit-identical to those of an
uninterrupted run (CPU, --deterministic, one thread on both sides).

To land a kill *inside* a checkpoint write, that life runs under a small hook that stalls
``os.fsync`` of one chosen temporary file: the process is then frozen inside the run
directory's file write, after the data is written and before the rename publishes it, and the
test kills it there. The other lives are killed after a seeded random delay once the run
has made progress, wherever that falls (with a checkpoint every step, often in a write).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from densekit.cli import main
from densekit.errors import UserError
from densekit.rundir import RunDir, pruned_structure

from .conftest import PYTHON, TINY, subprocess_env, write_mnist

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL and /proc/self/fd: Linux")

# 96 images / batch 8 = 12 steps an epoch, 4 epochs = 48 steps, a checkpoint after every one.
N_TRAIN = 96
RUN = ["--dataset", "mnist", "--epochs", "4", "--batch-size", "8", "--deterministic", "--device", "cpu",
       "--save-every", "1", "--no-progress"]
TOTAL_STEPS = 48
MAX_RANDOM_STEPS = 8  # a random life's kill comes within this many steps of its first checkpoint
PUBLISHED = {"model.json", "model.safetensors", "resume.safetensors", "metrics.jsonl", "summary.json", "curves.png"}

# Runs densekit as `python -m densekit` does, with os.fsync of the FREEZE_AT-th write of a
# file whose temporary name starts with FREEZE_PREFIX stalled (after touching FREEZE_MARK).
FREEZE_HOOK = r"""
import os, sys, time, runpy
prefix, nth, mark = os.environ["FREEZE_PREFIX"], int(os.environ["FREEZE_AT"]), os.environ["FREEZE_MARK"]
seen = 0
real_fsync = os.fsync
def fsync(fd):
    global seen
    name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    if name.startswith(prefix) and name.endswith(".tmp"):
        seen += 1
        if seen == nth:
            open(mark, "w").close()
            time.sleep(300)  # killed here: inside the file write, before os.replace
    return real_fsync(fd)
os.fsync = fsync
runpy.run_module("densekit", run_name="__main__", alter_sys=True)
"""


def check_readable(run: Path) -> dict | None:
    """Load every published file of ``run``; returns the resume metadata (None before the first)."""
    names = {p.name for p in run.iterdir()}
    temps = {n for n in names if n.startswith(".") and n.endswith(".tmp")}
    assert names - temps <= PUBLISHED, f"unexpected files: {names - temps - PUBLISHED}"
    meta = None
    for name in {"resume.safetensors", "model.safetensors"} & names:
        with safetensors.safe_open(run / name, framework="pt") as f:  # the format's own reader
            for key in f.keys():
                assert f.get_tensor(key) is not None
        state = safetensors.torch.load_file(run / name)
        assert all(t.isfinite().all() for t in state.values() if t.is_floating_point()), name
    if "resume.safetensors" in names:
        meta = RunDir(run).read_resume_meta()
        assert 0 <= meta["global_step"] <= TOTAL_STEPS
    if "model.json" in names:
        RunDir(run).read_info()
        if "model.safetensors" in names:
            RunDir(run).load_model()  # model.json and model.safetensors agree
    if "metrics.jsonl" in names:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records] == list(range(1, len(records) + 1))
    if "summary.json" in names:
        json.loads((run / "summary.json").read_text())
    return meta


def published_step(run: Path) -> int:
    try:
        return RunDir(run).read_resume_meta()["global_step"]
    except UserError:  # not written yet
        return -1


def test_sigkill_at_random_moments_and_mid_write_loses_nothing(tmp_path):
    rng = random.Random(20240531)
    data = write_mnist(tmp_path / "mnist", n_train=N_TRAIN)
    run = tmp_path / "run"
    argv = ["train", *TINY, *RUN, "--data-dir", str(data), "--out", str(run)]

    # Each life: what to kill it at. "write" freezes the nth write of that file; "random"
    # kills after a random delay once the life has published a checkpoint of its own.
    schedule = [
        ("write", ".resume.safetensors.", 1),        # the run's first checkpoint: the folder holds nothing yet
        ("random", None, None),
        ("write", ".model.safetensors.", 1),         # the weights written at the end of an epoch
        ("random", None, None),
        ("write", ".resume.safetensors.", rng.randint(2, 4)),  # a mid-epoch checkpoint
        ("random", None, None),
    ]
    kills, mid_write = 0, 0
    last = -1
    for life, (kind, prefix, nth) in enumerate(schedule):
        start = published_step(run) if run.exists() else -1
        log = tmp_path / f"life{life}.log"
        mark = tmp_path / f"life{life}.frozen"
        if kind == "write":
            cmd = [PYTHON, "-c", FREEZE_HOOK, *argv]
            env = subprocess_env(FREEZE_PREFIX=prefix, FREEZE_AT=str(nth), FREEZE_MARK=str(mark))
        else:
            cmd = [PYTHON, "-m", "densekit", *argv]
            env = subprocess_env()
        with open(log, "wb") as err:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                if kind == "write" and mark.exists():
                    break
                if kind == "random" and published_step(run) > start:
                    # a random moment, but early enough that the run cannot finish first
                    until = time.monotonic() + rng.uniform(0.0, 0.2)
                    while time.monotonic() < until and published_step(run) < start + MAX_RANDOM_STEPS:
                        time.sleep(0.002)
                    break
                time.sleep(0.002)
            assert time.monotonic() < deadline, f"life {life} never reached its moment: {log.read_text()[-2000:]}"
            proc.send_signal(signal.SIGKILL)  # a no-op if it has exited: then rc tells
            rc = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert rc == -signal.SIGKILL, f"life {life} ({kind}) was not killed (exit {rc}): {log.read_text()[-2000:]}"
        kills += 1

        temps = [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
        if kind == "write":
            # the kill landed inside a file write: its temporary file is still there, unpublished
            assert any(t.startswith(prefix) for t in temps), (life, temps)
            mid_write += 1
        meta = check_readable(run)
        step = -1 if meta is None else meta["global_step"]
        assert step >= last, f"life {life} lost published work: step {step} after {last}"
        assert step < TOTAL_STEPS, "the run finished before it was killed"
        last = step

    assert kills >= 5 and mid_write >= 3
    assert last > 12  # the lives did advance the run, past at least one epoch end

    # the last life runs to the end (in this process: one fewer interpreter start-up)
    assert main(argv) == 0
    assert not list(run.glob(".*.tmp"))  # what the kills left half-written is cleaned up
    check_readable(run)

    ref = tmp_path / "reference"
    assert main(["train", *TINY, *RUN, "--data-dir", str(data), "--out", str(ref)]) == 0
    a = safetensors.torch.load_file(run / "model.safetensors")
    b = safetensors.torch.load_file(ref / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit
    ra, rb = (safetensors.torch.load_file(p / "resume.safetensors") for p in (run, ref))
    assert all(torch.equal(ra[k], rb[k]) for k in rb) and ra.keys() == rb.keys()  # optimizer and RNG too
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
                       for line in (p / "metrics.jsonl").read_text().splitlines()]
    assert strip(run) == strip(ref) and len(strip(ref)) == 4
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (run, ref))
    assert sa["finished"] and (sa["steps"], sa["test_loss"], sa["test_correct"]) == (
        sb["steps"], sb["test_loss"], sb["test_correct"])


def test_a_kill_during_the_first_checkpoint_leaves_a_startable_folder(cli, tmp_path):
    """The folder of a run killed inside its first write holds only a temporary file: the
    same command starts it afresh (it is not 'a non-empty folder that is not a run')."""
    data = write_mnist(tmp_path / "mnist")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".resume.safetensors.k1ll3d__.tmp").write_bytes(b"half a checkpoint")
    rc, out, err = cli("train", *TINY, "--dataset", "mnist", "--data-dir", data, "--epochs", "1",
                       "--batch-size", "32", "--device", "cpu", "--out", run, "--no-progress")
    assert rc == 0, err
    assert not list(run.glob(".*.tmp"))
    assert (run / "model.safetensors").is_file()
    # --resume of such a folder: nothing to resume, said in one line
    other = tmp_path / "other"
    other.mkdir()
    (other / ".resume.safetensors.k1ll3d__.tmp").write_bytes(b"")
    rc, out, err = cli("train", "--out", other, "--resume")
    assert rc == 2 and "holds no run to resume" in err and len(err.strip().splitlines()) == 1
