"""Run directories from strangers: crafted files never hang, exhaust memory or traceback.

A table of run directories, each a copy of a real one with one file crafted as a hostile
sender would (sizes that would allocate gigabytes, depths that would search for hours,
FIFOs that would block a reader forever, malformed fields, tampered resume states), goes
through every command that reads a run directory: eval, predict, prune, export, analyze,
train --init, densekit.load, and train --resume for the resume states. All of them run in
one child process, so that its peak memory is theirs alone. Each must answer within
10 seconds with exit status 2 and one line naming the file, and leave every file as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

from densekit.cli import main

from .conftest import PYTHON, TINY, diff_snapshots, subprocess_env, write_mnist

SECONDS = 10
PEAK_RSS_MB = 1500  # the child: torch, the tiny model, every case; a crafted model would take gigabytes

# -- the crafts --------------------------------------------------------------------------------


def _json(change):
    def craft(run: Path) -> None:
        info = json.loads((run / "model.json").read_text())
        change(info)
        (run / "model.json").write_text(json.dumps(info))
    return craft


def _kwargs(**values):
    return _json(lambda i: i["model_kwargs"].update(values))


def _fifo(name):
    def craft(run: Path) -> None:
        (run / name).unlink()
        os.mkfifo(run / name)
    return craft


def _folder(name):
    def craft(run: Path) -> None:
        (run / name).unlink()
        (run / name).mkdir()
    return craft


def _sparse(name, size):
    def craft(run: Path) -> None:
        with open(run / name, "r+b") as f:
            f.truncate(size)  # a hole: no disk, but a reader would read it all
    return craft


def _nested(run: Path) -> None:
    text = (run / "model.json").read_text().rstrip()
    depth = 200_000
    (run / "model.json").write_text(text[:-1] + ', "model_args_extra": ' + "[" * depth + "]" * depth + "}")


def _resume(change):
    def craft(run: Path) -> None:
        path = run / "resume.safetensors"
        with safetensors.safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["densekit.resume"])
        tensors = load_file(path)
        change(meta, tensors)
        save_file(tensors, path, metadata={"densekit.resume": json.dumps(meta)})
    return craft


def _set(*keys, value):
    def change(meta, tensors):
        target = meta
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    return change


def _weights_dtype(run: Path) -> None:
    state = load_file(run / "model.safetensors")
    state["classifier.weight"] = state["classifier.weight"].to(torch.int32)
    save_file(state, run / "model.safetensors")


def _weights_dtype8(run: Path) -> None:
    state = load_file(run / "model.safetensors")
    state["classifier.weight"] = state["classifier.weight"].to(torch.float8_e4m3fn)
    save_file(state, run / "model.safetensors")


def _weights_huge(run: Path) -> None:
    state = load_file(run / "model.safetensors")
    state["classifier.weight"] = state["classifier.weight"].double() * 1e300  # finite here, infinite as float32
    save_file(state, run / "model.safetensors")


LAYER = "features.denseblock1.denselayer1"
BLOCK = "features.denseblock1"

# (id, craft, the file the error must name, what it must say)
MODEL_CASES = [
    ("forty-one-layer-blocks", _kwargs(block_config=[1] * 40), "model.json", "needs images of at least"),
    ("twenty-one-layer-blocks", _kwargs(block_config=[1] * 20), "model.json", "needs images of at least"),
    ("huge-growth-rate", _kwargs(growth_rate=10 ** 6), "model.json", "refusing to build it"),
    ("huge-stem", _kwargs(num_init_features=10 ** 7), "model.json", "refusing to build it"),
    ("huge-block", _kwargs(block_config=[10 ** 9, 1]), "model.json", "refusing to build it"),
    ("huge-bottleneck", _kwargs(bn_size=10 ** 9), "model.json", "refusing to build it"),
    ("outputs-not-the-classes", _kwargs(num_classes=10 ** 9), "model.json", "outputs for 10 classes"),
    ("huge-image", _json(lambda i: i["preprocessing"].update(image_size=[8192, 8192])), "model.json",
     "activations per image"),
    ("image-beyond-any", _json(lambda i: i["preprocessing"].update(image_size=[10 ** 9, 10 ** 9])), "model.json",
     "field 'preprocessing.image_size'"),
    ("pruned-width-huge", _json(lambda i: i.update(pruned={LAYER: {"inputs": None, "width": 10 ** 12}})),
     "model.json", f"'pruned.{LAYER}.width' must be at most"),
    ("pruned-inputs-huge", _json(lambda i: i.update(pruned={LAYER: {"inputs": 10 ** 12, "width": None}})),
     "model.json", f"'pruned.{LAYER}.inputs' must be at most"),
    ("pruned-a-number", _json(lambda i: i.update(pruned=5)), "model.json", "field 'pruned' must be a JSON object"),
    ("pruned-no-such-layer", _json(lambda i: i.update(pruned={"features.conv0": {"inputs": 1}})), "model.json",
     "not a dense layer"),
    ("pruned-outputs-huge", _json(lambda i: i.update(pruned={BLOCK: {"outputs": 10 ** 12}})),
     "model.json", f"'pruned.{BLOCK}.outputs' must be at most"),
    ("pruned-outputs-of-a-layer", _json(lambda i: i.update(pruned={LAYER: {"outputs": 3}})), "model.json",
     "not a dense layer of the model with those fields"),
    ("pruned-inputs-of-a-block", _json(lambda i: i.update(pruned={BLOCK: {"inputs": 3}})), "model.json",
     "must give only the outputs of a dense block"),
    ("pruned-nothing", _json(lambda i: i.update(pruned={BLOCK: {}})), "model.json",
     f"'pruned.{BLOCK}' must give inputs and width, or outputs"),
    ("no-dataset", _json(lambda i: i.pop("dataset")), "model.json", "missing field 'dataset'"),
    ("data-dir-a-number", _json(lambda i: i.update(data_dir=123)), "model.json", "field 'data_dir'"),
    ("deeply-nested", _nested, "model.json", "nested too deeply"),
    ("unknown-argument", _kwargs(evil=1), "model.json", "unknown DenseNet argument 'evil'"),
    ("3d-model", _kwargs(spatial_dims=3), "model.json", "it is not a 2D classifier"),
    ("compression-a-string", _kwargs(compression="0.5"), "model.json", "compression must be a number"),
    ("block-config-a-string", _kwargs(block_config="66"), "model.json", "block_config must be a non-empty"),
    ("class-not-a-string", _json(lambda i: i["classes"].__setitem__(0, {"x": 1})), "model.json", "field 'classes'"),
    ("model-json-fifo", _fifo("model.json"), "model.json", "is a FIFO, not a file"),
    ("model-json-folder", _folder("model.json"), "model.json", "is a directory, not a file"),
    ("model-json-huge", lambda r: (r / "model.json").write_text(" " * (2 << 20) + "{}"), "model.json",
     "more than such a file can hold"),
    ("weights-fifo", _fifo("model.safetensors"), "model.safetensors", "is a FIFO, not a file"),
    ("weights-folder", _folder("model.safetensors"), "model.safetensors", "is a directory, not a file"),
    ("weights-huge", _sparse("model.safetensors", 64 << 30), "model.safetensors", "more than such a file can hold"),
    ("weights-integers", _weights_dtype, "model.safetensors", "tensor(s) of another kind"),
    ("weights-float8", _weights_dtype8, "model.safetensors", "tensor(s) of another kind"),
    ("weights-beyond-float32", _weights_huge, "model.safetensors", "NaN or infinite values"),
    ("wide-bottleneck", _kwargs(growth_rate=1, bn_size=2_000_000), "model.json", "activations per image"),
    ("mean-beyond-float", _json(lambda i: i["preprocessing"].update(mean=[10 ** 400])), "model.json",
     "field 'preprocessing.mean'"),
    ("mean-nan", lambda r: (r / "model.json").write_text((r / "model.json").read_text().replace(
        '"mean": [', '"mean": [NaN, ', 1)), "model.json", "NaN is not a JSON number"),
    ("class-a-lone-surrogate", _json(lambda i: i["classes"].__setitem__(0, "\ud800")), "model.json",
     "field 'classes'"),
    ("class-a-terminal-escape", _json(lambda i: i["classes"].__setitem__(0, "\x1b[2J")), "model.json",
     "field 'classes'"),
    ("model-name-a-path", _json(lambda i: i.update(model="x/../../escaped")), "model.json", "field 'model'"),
    ("dataset-unknown", _json(lambda i: i.update(dataset="nope")), "model.json", "field 'dataset'"),
    ("drop-rate-five", _kwargs(drop_rate=5), "model.json", "field 'model_kwargs'"),
    ("data-dir-a-nul", _json(lambda i: i.update(data_dir="a\x00b")), "model.json", "field 'data_dir'"),
]

RESUME_CASES = [
    ("optimizer-state-a-number", _resume(_set("optimizer", "state", value=5)), "resume.safetensors",
     "field 'optimizer.state'"),
    ("stats-unknown-key", _resume(_set("stats", "evil", value=1)), "resume.safetensors", "unknown field 'stats.evil'"),
    ("scheduler-base-lrs", _resume(_set("scheduler", "base_lrs", value=[1e9, 1e9])), "resume.safetensors",
     "field 'scheduler' does not fit the run"),
    ("scheduler-extra-key", _resume(_set("scheduler", "lr_lambdas_evil", value=1)), "resume.safetensors",
     "field 'scheduler' has unknown entry"),
    ("param-group-momentum-a-string", _resume(_set("optimizer", "param_groups", 0, "momentum", value="0.9")),
     "resume.safetensors", "field 'optimizer.param_groups.0.momentum'"),
    ("rng-wrong-size", _resume(lambda m, t: t.update({"rng/cpu": torch.zeros(3, dtype=torch.uint8)})),
     "resume.safetensors", "is not a random generator state"),
    ("step-inconsistent", _resume(_set("global_step", value=10 ** 12)), "resume.safetensors", "field 'global_step'"),
    ("history-not-records", _resume(_set("history", value=[{"epoch": "x"}])), "resume.safetensors", "field 'history'"),
    ("resume-fifo", _fifo("resume.safetensors"), "resume.safetensors", "is a FIFO, not a file"),
    ("stats-beyond-float", _resume(_set("stats", "seen", value=10 ** 400)), "resume.safetensors",
     "field 'stats.seen'"),
    ("optimizer-key-superscript", _resume(_set("optimizer", "state", value={"\u00b2": {}})), "resume.safetensors",
     "field 'optimizer.state'"),
    ("momentum-a-scalar", _resume(lambda m, t: t.update({k: torch.zeros(()) for k in t if k.endswith(
        "momentum_buffer")})), "resume.safetensors", "does not fit the run's parameters"),
    ("model-args-huge", _resume(_set("config", "model_args", value={"growth_rate": 10 ** 6})),
     "resume.safetensors", "config.model_args"),
    ("resume-meta-huge", _resume(_set("stats", "evil", value="x" * (17 << 20))), "resume.safetensors",
     "more than one can hold"),
]


# -- the runs and the child ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("strangers")
    data = write_mnist(root / "mnist")
    common = ["train", *TINY, "--dataset", "mnist", "--data-dir", data, "--batch-size", "16", "--device", "cpu",
              "--no-progress", "--seed", "1"]
    finished, stopped = root / "finished", root / "stopped"
    assert main([str(a) for a in [*common, "--epochs", "1", "--out", finished]]) == 0
    assert main([str(a) for a in [*common, "--epochs", "2", "--max-steps", "5", "--out", stopped]]) == 0
    png = root / "image.png"
    from PIL import Image

    Image.new("L", (16, 16), 128).save(png)
    return dict(root=root, data=data, finished=finished, stopped=stopped, png=png)


def _commands(run: Path, out: Path, world: dict) -> list[list[str]]:
    return [["eval", run, "--device", "cpu"], ["predict", run, world["png"], "--device", "cpu"],
            ["prune", run, "--amount", "0.3", "--out", out / "pruned"], ["export", run, "--out", out / "m.onnx"],
            ["analyze", run, "--what", "reuse", "--out", out / "analysis"],
            ["train", "--init", run, "--out", out / "tuned", "--epochs", "1", "--no-progress", "--device", "cpu"],
            ["load", run]]


_CHILD = textwrap.dedent('''
    import contextlib, io, json, sys, time
    import densekit
    from densekit.cli import main
    from densekit.errors import UserError
    results = []
    for argv in json.load(sys.stdin):
        err = io.StringIO()
        start = time.monotonic()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if argv[0] == "load":
                try:
                    densekit.load(argv[1])
                    rc = 0
                except UserError as e:
                    rc = 2
                    print(f"densekit.load: error: {e}", file=sys.stderr)
            else:
                rc = main(argv)
        results.append(dict(argv=argv, rc=rc, err=err.getvalue(), seconds=time.monotonic() - start))
    # VmHWM, not ru_maxrss: Linux keeps the larger of the parent's at fork in the latter
    peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    peak_mb = peak_kb / 1024
    print(json.dumps(dict(results=results, peak_mb=peak_mb)))
''')


def _state(root: Path) -> dict[str, tuple]:
    """What every entry under ``root`` is, without reading any (one is a FIFO, one a 64 GiB hole)."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            state[os.path.join(dirpath, name)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
    return state


def _last_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def test_crafted_run_directories_are_refused_in_one_line(world, tmp_path):
    assert len(MODEL_CASES) + len(RESUME_CASES) >= 25
    jobs, expected = [], []
    for cases, base in ((MODEL_CASES, world["finished"]), (RESUME_CASES, world["stopped"])):
        for name, craft, file, message in cases:
            run = Path(shutil.copytree(base, tmp_path / name / "run"))
            craft(run)
            out = tmp_path / name / "out"
            out.mkdir()
            argvs = _commands(run, out, world) if cases is MODEL_CASES else [["train", "--out", run, "--resume"]]
            for argv in argvs:
                jobs.append([str(a) for a in argv])
                expected.append((name, run / file, message))
    before = _state(tmp_path)
    child = subprocess.run([PYTHON, "-c", _CHILD], input=json.dumps(jobs), capture_output=True, text=True,
                           env=subprocess_env(), timeout=SECONDS * len(jobs))
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.splitlines()[-1])
    problems = []
    for result, (name, path, message) in zip(report["results"], expected):
        line = _last_line(result["err"])
        what = f"{name}: {' '.join(result['argv'][:2])}"
        if result["rc"] != 2:
            problems.append(f"{what}: exit {result['rc']}: {result['err'][-300:]}")
        elif "Traceback" in result["err"] or not line.startswith("densekit"):
            problems.append(f"{what}: not one line: {result['err'][-300:]}")
        elif f"{path}" not in line or message not in line:
            problems.append(f"{what}: {line}")
        if result["seconds"] > SECONDS:
            problems.append(f"{what}: took {result['seconds']:.1f} s")
    assert not problems, "\n".join(problems)
    assert report["peak_mb"] < PEAK_RSS_MB, report["peak_mb"]
    assert max(r["seconds"] for r in report["results"]) < SECONDS
    assert not diff_snapshots(before, _state(tmp_path))


# -- where a run's data is read from ------------------------------------------------------------


def test_a_stored_data_dir_is_the_run_directorys_and_only_a_default(world, tmp_path, monkeypatch, capsys, caplog):
    run = Path(shutil.copytree(world["finished"], tmp_path / "runs" / "run"))
    shutil.copytree(world["data"], tmp_path / "data" / "mnist")
    info = json.loads((run / "model.json").read_text())
    info["data_dir"] = "../../data/mnist"  # relative: the run directory's, not the reader's
    (run / "model.json").write_text(json.dumps(info))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with caplog.at_level("INFO"):
        assert main(["eval", str(run), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 30
    assert f"reading mnist from {run / '../../data/mnist'}" in caplog.text
    # a sender's folder that is not here: said, and a folder given on the command line wins
    info["data_dir"] = "/nonexistent/sender/mnist"
    (run / "model.json").write_text(json.dumps(info))
    assert main(["eval", str(run), "--device", "cpu"]) == 2
    assert "/nonexistent/sender/mnist" in capsys.readouterr().err
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(["eval", str(run), "--device", "cpu", "--data-dir", str(world["data"]), "--json"]) == 0
        assert main(["prune", str(run), "--amount", "0.2", "--out", str(tmp_path / "p"), "--data-dir",
                     str(world["data"]), "--device", "cpu"]) == 0
    assert "/nonexistent" not in caplog.text


def test_records_a_run_writes_read_back(world, tmp_path, capsys):
    # a test loss that is not a number (an empty split) is written as null, and read back
    run = Path(shutil.copytree(world["stopped"], tmp_path / "run"))
    _resume(lambda meta, tensors: meta["history"][0].update(val_loss=None))(run)  # as densekit writes NaN
    assert main(["train", "--out", str(run), "--resume", "--no-progress", "--device", "cpu"]) == 0, \
        capsys.readouterr().err
    # an epoch number beyond any float, in metrics.jsonl: one line, naming the file
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0].replace('"epoch": 1', '"epoch": ' + "9" * 400) + "\n")
    capsys.readouterr()
    assert main(["analyze", str(run), "--what", "overfit", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{run / 'metrics.jsonl'}: line 1" in err, err
