"""Data-parallel training on torch.distributed (gloo, real processes on this CPU).

The parity test states what a 2-rank run computes: each rank's half of every global
batch, gradients averaged, batch norm over each half, running statistics from rank 0.
An in-process simulation of exactly that must give the weights the ranks saved.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from densekit import distributed
from densekit.data import DeviceLoader, load_dataset
from densekit.errors import UserError
from densekit.models import create_model
from densekit.rundir import RunDir
from safetensors.torch import load_file as read_state_dict
from densekit.train.recipes import augment_for, build_optimizer, build_scheduler, get_recipe
from densekit.train.runtime import seed_everything

from .conftest import TINY, run_cli, write_mnist

TINY_ARGS = dict(growth_rate=4, block_config=(1, 1), num_init_features=4)
PYTHON = sys.executable


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("data") / "mnist", n_train=74)  # 64 to train, 10 to validate


def train_argv(mnist, out, *extra):
    # float32: simulate() replays the ranks' arithmetic in float32, tolerances fit to its rounding
    return ["train", *TINY, "--dataset", "mnist", "--data-dir", str(mnist), "--batch-size", "16", "--epochs", "1",
            "--device", "cpu", "--precision", "fp32", "--no-progress", "--out", str(out), *extra]


def densekit(*argv, timeout=240):
    return subprocess.run([PYTHON, "-m", "densekit", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout)


def test_from_env_reads_torchrun_variables():
    assert distributed.from_env({}) == distributed.Dist(0, 1, 0)
    job = distributed.from_env(dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="h", MASTER_PORT="1"))
    assert (job.rank, job.world_size, job.local_rank, job.active, job.is_main) == (1, 2, 1, True, False)
    for bad, match in [(dict(WORLD_SIZE="two"), "WORLD_SIZE must be an integer"),
                       (dict(RANK="2", WORLD_SIZE="2", MASTER_ADDR="h", MASTER_PORT="1"), "inconsistent"),
                       (dict(RANK="0", WORLD_SIZE="2"), "MASTER_ADDR and MASTER_PORT not set")]:
        with pytest.raises(UserError, match=match):
            distributed.from_env(bad)


def test_rank_env_splits_the_cores():
    env = distributed.rank_env(1, 2, 12345, base={})
    assert env["RANK"] == env["LOCAL_RANK"] == "1" and env["WORLD_SIZE"] == "2" and env["MASTER_PORT"] == "12345"
    assert int(env["OMP_NUM_THREADS"]) >= 1
    assert distributed.rank_env(0, 2, 1, base={"OMP_NUM_THREADS": "7"})["OMP_NUM_THREADS"] == "7"


def test_launcher_ends_the_other_ranks_when_one_fails():
    sleeper = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    failing = subprocess.Popen([PYTHON, "-c", "raise SystemExit(3)"])
    start = time.monotonic()
    assert distributed._wait([sleeper, failing], 0.05, settle=0.5) == (3, 1)
    assert time.monotonic() - start < 30 and sleeper.returncode is not None  # ended, not waited for
    # rank 0's own failure is the job's, whoever failed first
    late = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(1); raise SystemExit(2)"])
    early = subprocess.Popen([PYTHON, "-c", "raise SystemExit(1)"])
    assert distributed._wait([late, early], 0.05, settle=20) == (2, 0)
    killed = subprocess.Popen([PYTHON, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert distributed._wait([killed], 0.05) == (128 + 9, 0)


def simulate(mnist, steps: int, world: int) -> dict[str, torch.Tensor]:
    """What ``world`` ranks compute in ``steps`` steps, in one process (see the module doc)."""
    data = load_dataset("mnist", str(mnist), None, None)
    recipe = get_recipe("fast")
    seed_everything(0)
    model = create_model("densenet_bc_100_k12", **TINY_ARGS, num_classes=10, in_chans=1)
    loader = DeviceLoader(data.train, 16, mean=data.mean, std=data.std, shuffle=True,
                          augment=augment_for(recipe, "mnist"), drop_last=True, seed=0)
    optimizer = build_optimizer(model, recipe, recipe.lr)
    scheduler = build_scheduler(optimizer, recipe, len(loader), len(loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    replicas = [model.train()] + [copy.deepcopy(model) for _ in range(world - 1)]
    for _, (x, y) in zip(range(steps), loader.epoch(0)):
        optimizer.zero_grad()
        for replica, xr, yr in zip(replicas, x.tensor_split(world), y.tensor_split(world)):
            with torch.no_grad():  # DDP broadcasts rank 0's buffers before every forward
                for mine, rank0 in zip(replica.buffers(), model.buffers()):
                    mine.copy_(rank0)
            (criterion(replica(xr), yr) / world).backward()
        for replica in replicas[1:]:  # the all-reduce: every rank gets the mean gradient
            for p, q in zip(model.parameters(), replica.parameters()):
                p.grad += q.grad
                q.grad = None
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            for replica in replicas[1:]:
                for p, q in zip(model.parameters(), replica.parameters()):
                    q.copy_(p)
    return model.state_dict()


def test_two_ranks_compute_data_parallel_sgd_and_resume(mnist, tmp_path, capsys):
    run = tmp_path / "run"
    r = densekit(*train_argv(mnist, run, "--nproc", "2", "--max-steps", "3"))
    assert r.returncode == 0, r.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    # rank 0 alone prints the summary, with the command that continues the run as it ran
    assert r.stdout.count("stopped at step 3 of 4") == 1 and f"--out {run} --resume --nproc 2" in r.stdout

    saved = read_state_dict(run / "model.safetensors")
    expected = simulate(mnist, 3, 2)
    assert saved.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(saved[k], v, rtol=1e-4, atol=1e-5, msg=k)
    # and it is not what one process on whole batches computes: batch norm saw halves
    one = simulate(mnist, 3, 1)
    assert max((one[k] - v).abs().max().item() for k, v in expected.items() if v.is_floating_point()) > 1e-3

    # resumed, the ranks go on from the checkpoint to the end of the epoch (4 steps)
    r = densekit(*train_argv(mnist, run, "--nproc", "2", "--resume"))
    assert r.returncode == 0, r.stderr
    saved = read_state_dict(run / "model.safetensors")
    for k, v in simulate(mnist, 4, 2).items():
        torch.testing.assert_close(saved[k], v, rtol=1e-4, atol=1e-5, msg=k)

    # the sharded evaluation adds up to the whole test set, as `densekit eval` sees it
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_images"] == 30 and summary["world_size"] == 2 and summary["finished"]
    rc, out, err = run_cli(capsys, "eval", run, "--json", "--device", "cpu", "--precision", "fp32")
    assert rc == 0, err
    report = json.loads(out)
    # every rank scored rank 0's model (its batch-norm statistics), the one saved
    assert report["accuracy"] == summary["test_accuracy"]
    assert report["loss"] == pytest.approx(summary["test_loss"], rel=1e-6)


def test_bad_batch_for_the_ranks_is_a_user_error(mnist, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, *train_argv(mnist, out, "--nproc", "3"))  # batch 16 does not split in 3
    assert rc == 2
    assert err.strip().splitlines() == ["densekit train: error: --batch-size 16 does not split evenly between 3 "
                                        "processes; pick a multiple of 3"]
    assert not out.exists()


def test_nproc_must_match_an_outside_launcher(mnist, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    rc, _, err = run_cli(capsys, *train_argv(mnist, tmp_path / "run", "--nproc", "4"))
    assert rc == 2 and "--nproc 4" in err and "WORLD_SIZE=2" in err


def _processes_writing(out) -> list[int]:
    """The pids of processes whose command line names ``out`` (the ranks of that run)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(out) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_terminated_launcher_ends_its_ranks(mnist, tmp_path):
    # `kill PID` (a scheduler, an IDE's stop button) signals the launcher alone: the ranks must
    # not go on writing the run directory
    out = tmp_path / "long"
    launcher = subprocess.Popen([PYTHON, "-m", "densekit", *train_argv(mnist, out, "--nproc", "2", "--epochs",
                                                                       "10000", "--save-every", "2")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read().decode()
        time.sleep(0.2)
    assert len(_processes_writing(out)) == 3  # the launcher and two ranks
    launcher.terminate()
    assert launcher.wait(timeout=30) == 128 + 15
    deadline = time.monotonic() + 10
    while _processes_writing(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_writing(out) == []
    # and what they left is a run that resumes
    meta = RunDir(out).read_resume_meta()
    assert meta["global_step"] >= 4
