"""The command-line contract: every user mistake exits 2 with one line on stderr and no
traceback, and changes nothing on disk; a bug in densekit keeps its traceback and exits 1.

Each case runs ``densekit.cli.main`` in this process against one shared world of inputs
(good and damaged datasets, a finished run and damaged copies of it, image files, an
unrelated folder) and compares a snapshot of that world (every path, size, mtime and
SHA-256) before and after. A few cases also run as a real ``python -m densekit`` process.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import subprocess

import numpy as np
import pytest
import torch

from densekit.cli import COMMANDS, main

from .conftest import (Exploit, PYTHON, TINY, diff_snapshots, idx_bytes, patterns, run_cli, snapshot, subprocess_env,
                       write_cifar, write_imagefolder, write_mnist)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every input the cases point at, under one root; returns the path placeholders."""
    root = tmp_path_factory.mktemp("world")
    d = root / "data"
    mnist = write_mnist(d / "mnist")

    missing = write_mnist(d / "mnist-missing-file")
    (missing / "t10k-labels-idx1-ubyte.gz").unlink()
    truncated = write_mnist(d / "mnist-truncated", gz=False)
    images = truncated / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    bad_gzip = write_mnist(d / "mnist-bad-gzip")
    (bad_gzip / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\x00not deflate" * 8)
    bad_magic = write_mnist(d / "mnist-bad-magic")
    (bad_magic / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x12\x34\x08\x01" + b"\x00" * 68))
    counts = write_mnist(d / "mnist-counts")
    _, labels = patterns(29, 16, 1, 10, 2)
    (counts / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    labels_range = write_mnist(d / "mnist-label-range")
    (labels_range / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(64, 42, np.uint8))))
    (d / "empty").mkdir()

    evil = write_cifar(d / "cifar-evil")
    marker = root / "PWNED"
    batch = evil / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({"data": Exploit(str(marker)), "labels": []}))
    text_png = write_imagefolder(d / "folder-text-png")
    next((text_png / "train" / "cross").glob("*.png")).write_text("this is not an image\n")
    no_test = write_imagefolder(d / "folder-no-test")
    shutil.rmtree(no_test / "test")

    runs = root / "runs"
    good = runs / "good"
    argv = ["train", *TINY, "--dataset", "mnist", "--data-dir", mnist, "--epochs", "1", "--batch-size", "16",
            "--device", "cpu", "--out", good, "--no-progress"]
    assert main([str(a) for a in argv]) == 0

    def broken(name, edit):
        path = runs / name
        shutil.copytree(good, path)
        edit(path)
        return path

    def edit_json(path, change):
        info = json.loads((path / "model.json").read_text())
        change(info)
        (path / "model.json").write_text(json.dumps(info))

    def truncate(path, keep=0.5):
        path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])

    from safetensors.torch import load_file, save_file

    paths = dict(
        root=root, mnist=mnist, missing=missing, truncated=truncated, bad_gzip=bad_gzip, bad_magic=bad_magic,
        counts=counts, labels_range=labels_range, empty=d / "empty", evil=evil, text_png=text_png, no_test=no_test,
        nowhere=root / "nowhere", new=root / "new-run", run=good,
        no_weights=broken("no-weights", lambda p: (p / "model.safetensors").unlink()),
        cut_weights=broken("cut-weights", lambda p: truncate(p / "model.safetensors")),
        junk_weights=broken("junk-weights", lambda p: (p / "model.safetensors").write_bytes(os.urandom(2048))),
        pickle_weights=broken("pickle-weights", lambda p: torch.save(
            {"w": Exploit(str(marker))}, p / "model.safetensors")),
        nan_weights=broken("nan-weights", lambda p: save_file(
            {k: v * float("nan") if v.is_floating_point() else v
             for k, v in load_file(p / "model.safetensors").items()}, p / "model.safetensors")),
        bad_json=broken("bad-json", lambda p: (p / "model.json").write_text('{"format": "densekit.run", ')),
        shape_json=broken("shape-json", lambda p: edit_json(p, lambda i: i["model_kwargs"].update(growth_rate=8))),
        keys_json=broken("keys-json", lambda p: edit_json(p, lambda i: i.pop("model_kwargs"))),
        other_json=broken("other-json", lambda p: edit_json(p, lambda i: i.update(format="keras"))),
        moved_data=broken("moved-data", lambda p: edit_json(p, lambda i: i.update(data_dir=str(root / "gone")))),
        cut_resume=broken("cut-resume", lambda p: truncate(p / "resume.safetensors", 0.9)),
        notrun=root / "notes",
        file=root / "notes" / "thesis.tex",
        png=root / "img" / "digit.png",
        text=root / "img" / "readme.png",
        empty_png=root / "img" / "empty.png",
        dir_png=root / "img" / "folder.png",
        cwd=root / "cwd",
    )
    paths["notrun"].mkdir()
    paths["file"].write_text("precious\n")
    (root / "img").mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(paths["png"])
    paths["text"].write_text("not a picture\n")
    paths["empty_png"].write_bytes(b"")
    paths["dir_png"].mkdir()
    paths["cwd"].mkdir()
    paths["summary"] = good / "summary.json"
    paths["marker"] = marker
    return {k: str(v) for k, v in paths.items()}


def train(*extra: str, data: str = "{mnist}", out: str = "{new}", model: bool = True) -> list[str]:
    """``densekit train`` of the tiny model on mnist (the finished run's config), plus ``extra``."""
    return ["train", *(TINY if model else []), "--dataset", "mnist", "--data-dir", data, "--batch-size", "16",
            "--out", out, *extra]


# (id, argv with {placeholders}, a piece of the one-line message)
CASES = [
    # -- the command line itself
    ("no-command", [], "the following arguments are required: COMMAND"),
    ("unknown-command", ["fit"], "invalid choice: 'fit'"),
    ("unknown-flag", train("--learning-rate", "3"), "unrecognized arguments: --learning-rate 3"),
    # -- train: the data
    ("train-missing-data-dir", train(data="{nowhere}"), "data directory not found; give --data-dir, a folder"),
    ("train-cifar-without-folder", ["train", "--dataset", "cifar10", "--out", "{new}"],
     "cifar10: no default data directory; give --data-dir or set DENSEKIT_DATA"),
    ("train-data-dir-is-a-file", train(data="{file}"), "data directory not found"),
    ("train-data-missing-file", train(data="{missing}"), "t10k-labels-idx1-ubyte: file not found"),
    ("train-empty-data-dir", train(data="{empty}"), "train-images-idx3-ubyte: file not found"),
    ("train-truncated-idx", train(data="{truncated}"), "truncated IDX file"),
    ("train-corrupt-gzip", train(data="{bad_gzip}"), "corrupt gzip file"),
    ("train-wrong-magic", train(data="{bad_magic}"), "not an IDX file: magic number 0x12340801"),
    ("train-count-mismatch", train(data="{counts}"), "30 images but"),
    ("train-label-out-of-range", train(data="{labels_range}"), "labels must be in [0, 9], found values in [42, 42]"),
    ("train-unknown-dataset", ["train", "--dataset", "svhn"], "invalid choice: 'svhn'"),
    ("train-cifar-without-data-dir", ["train", *TINY, "--dataset", "cifar10", "--out", "{new}"],
     "cifar10: no default data directory"),
    ("train-pickle-that-runs-code", ["train", *TINY, "--dataset", "cifar10", "--data-dir", "{evil}", "--out", "{new}"],
     "refusing to unpickle"),
    ("train-text-file-named-png", ["train", *TINY, "--dataset", "imagefolder", "--data-dir", "{text_png}",
                                   "--out", "{new}"], "not a readable image"),
    ("train-imagefolder-no-validation", ["train", *TINY, "--dataset", "imagefolder", "--data-dir", "{no_test}",
                                         "--val-fraction", "0", "--out", "{new}"],
     "the validation split is empty: give a --val-fraction above 0"),
    # -- train: the model
    ("train-unknown-model", train("--model", "densnet121", model=False), "unknown model 'densnet121'; known: "),
    ("train-model-too-deep-for-16px", train("--model", "densenet121", "--image-size", "16", model=False),
     "--image-size 16 is below the smallest input densenet121 takes (29 px"),
    ("train-model-arg-not-key-value", train("--model-arg", "growth"), "expected KEY=VALUE"),
    ("train-model-arg-unknown", train("--model-arg", "growthrate=3"), "unknown argument 'growthrate'"),
    ("train-model-arg-from-dataset", train("--model-arg", "num_classes=3"), "comes from the dataset"),
    ("train-model-arg-out-of-range", train("--model-arg", "compression=0"), "compression must be a number in (0, 1]"),
    # -- train: numbers
    ("train-epochs-zero", train("--epochs", "0"), "--epochs: must be a positive integer, got 0"),
    ("train-epochs-negative", train("--epochs", "-3"), "--epochs: must be a positive integer, got -3"),
    ("train-batch-size-zero", train("--batch-size", "0"), "--batch-size: must be a positive integer"),
    ("train-batch-size-not-a-number", train("--batch-size", "many"), "--batch-size: must be a positive integer"),
    ("train-batch-larger-than-data", train("--batch-size", "1000"), "larger than the 54 training images"),
    ("train-lr-zero", train("--lr", "0"), "--lr: must be a positive finite number, got 0"),
    ("train-lr-negative", train("--lr", "-0.1"), "--lr: must be a positive finite number"),
    ("train-lr-nan", train("--lr", "nan"), "--lr: must be a positive finite number, got nan"),
    ("train-lr-inf", train("--lr", "inf"), "--lr: must be a positive finite number, got inf"),
    ("train-train-limit-zero", train("--train-limit", "0"), "--train-limit: must be a positive integer"),
    ("train-seed-negative", train("--seed", "-1"), "--seed: must be an integer >= 0"),
    ("train-image-size-zero", train("--image-size", "0"), "--image-size: must be a positive integer"),
    ("train-save-every-zero", train("--save-every", "0"), "--save-every: must be a positive integer"),
    ("train-max-steps-zero", train("--max-steps", "0"), "--max-steps: must be a positive integer"),
    ("train-unknown-recipe", train("--recipe", "slow"), "invalid choice: 'slow'"),
    ("train-bad-device", train("--device", "tpu"), "device must be one of auto, cpu, cuda (or cuda:N), got 'tpu'"),
    ("train-absent-cuda-device", train("--device", "cuda:99"), "CUDA device"),
    ("train-cuda-graph-on-cpu", train("--device", "cpu", "--cuda-graph"), "CUDA graphs need a CUDA device"),
    # -- train: the run directory
    ("train-out-is-a-file", train(out="{file}"), "exists and is not a directory"),
    ("train-out-holds-other-files", train(out="{notrun}"), "not empty and holds no densekit run"),
    ("train-out-is-a-finished-run", train("--epochs", "1", out="{run}"), "holds a finished run"),
    ("train-out-is-another-config", train("--epochs", "1", "--seed", "1", out="{run}"), "seed is 0 there, 1 here"),
    ("train-resume-without-out", ["train", "--resume"], "--resume needs --out"),
    ("train-resume-nothing", ["train", "--out", "{empty}", "--resume"], "holds no run to resume"),
    ("train-resume-other-files", ["train", "--out", "{notrun}", "--resume"], "holds no densekit run"),
    ("train-resume-truncated-state", ["train", "--out", "{cut_resume}", "--resume"],
     "resume.safetensors: cannot read the resume state"),
    ("train-resume-other-config", ["train", "--out", "{run}", "--resume", "--lr", "0.05"],
     "lr is 0.2 there, 0.05 here"),
    # -- eval
    ("eval-missing-dir", ["eval", "{nowhere}"], "run directory not found"),
    ("eval-a-file", ["eval", "{file}"], "run directory not found"),
    ("eval-not-a-run", ["eval", "{notrun}"], "not a densekit run directory (no model.json)"),
    ("eval-no-weights", ["eval", "{no_weights}"], "model.safetensors: file not found"),
    ("eval-truncated-weights", ["eval", "{cut_weights}"], "model.safetensors: cannot read safetensors file"),
    ("eval-random-weights", ["eval", "{junk_weights}"], "model.safetensors: cannot read safetensors file"),
    ("eval-pickle-as-weights", ["eval", "{pickle_weights}"], "model.safetensors: cannot read safetensors file"),
    ("eval-nan-weights", ["eval", "{nan_weights}"], "hold NaN or infinite values"),
    ("eval-model-json-not-json", ["eval", "{bad_json}"], "model.json: cannot read JSON"),
    ("eval-model-json-other-shapes", ["eval", "{shape_json}"], "model.safetensors: does not match model.json: "),
    ("eval-model-json-missing-key", ["eval", "{keys_json}"], "model.json: missing field 'model_kwargs'"),
    ("eval-model-json-other-format", ["eval", "{other_json}"], "field 'format' must be 'densekit.run' (not a densekit run description), got 'keras'"),
    ("eval-data-moved", ["eval", "{moved_data}"], "gone: data directory not found"),
    ("eval-other-dataset-no-dir", ["eval", "{run}", "--dataset", "cifar10"], "no default data directory"),
    ("eval-pickle-that-runs-code", ["eval", "{run}", "--dataset", "cifar10", "--data-dir", "{evil}"],
     "refusing to unpickle"),
    ("eval-unknown-dataset", ["eval", "{run}", "--dataset", "svhn"], "invalid choice: 'svhn'"),
    ("eval-bad-device", ["eval", "{run}", "--device", "gpu"], "device must be one of"),
    ("eval-out-is-a-directory", ["eval", "{run}", "--out", "{notrun}"], "is a directory"),
    ("eval-out-in-missing-folder", ["eval", "{run}", "--out", "{nowhere}/cm.png"], "does not exist"),
    # -- predict
    ("predict-missing-image", ["predict", "{run}", "{png}", "{nowhere}.png"], "nowhere.png: image file not found"),
    ("predict-text-as-png", ["predict", "{run}", "{png}", "{text}"], "readme.png: not a readable image"),
    ("predict-empty-file", ["predict", "{run}", "{empty_png}"], "empty.png: empty file, expected an image"),
    ("predict-directory", ["predict", "{run}", "{dir_png}"], "folder.png: is a directory"),
    ("predict-top-k-zero", ["predict", "{run}", "{png}", "--top-k", "0"], "--top-k: must be a positive integer"),
    ("predict-top-k-above-classes", ["predict", "{run}", "{png}", "--top-k", "11"],
     "--top-k is 11 but the model knows only 10 classes"),
    ("predict-not-a-run", ["predict", "{notrun}", "{png}"], "not a densekit run directory"),
    ("predict-truncated-weights", ["predict", "{cut_weights}", "{png}"], "cannot read safetensors file"),
    ("predict-no-images", ["predict", "{run}"], "the following arguments are required: IMAGE"),
    # -- bench (each is refused before anything is timed)
    ("bench-batch-size-zero", ["bench", "--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    ("bench-bad-dtype", ["bench", "--dtype", "fp64"], "invalid choice: 'fp64'"),
    ("bench-unknown-model", ["bench", "--models", "densnet121"], "unknown model 'densnet121'"),
    ("bench-bad-cifar-depth", ["bench", "--models", "densenet_bc_7_k12"], "depth L must be"),
    ("bench-input-too-small", ["bench", "--models", "densenet121", "--input-size", "8"], "input size 8 is too small"),
    ("bench-steps-zero", ["bench", "--steps", "0"], "--steps must be a positive integer"),
    ("bench-warmup-negative", ["bench", "--warmup", "-1"], "warmup must be a non-negative integer"),
    ("bench-depths-of-imagenet-model", ["bench", "--models", "densenet121", "--depths", "100"],
     "--depths applies to CIFAR DenseNets"),
    ("bench-render-missing", ["bench", "--render", "{nowhere}.json"], "cannot read benchmark results"),
    ("bench-render-not-a-report", ["bench", "--render", "{summary}"], "is not a densekit bench report"),
    ("bench-append-to-nothing", ["bench", "--quick", "--append", "--out", "{nowhere}.json"], "--append: no results"),
    # -- models
    ("models-pattern-matches-nothing", ["models", "densnet*"], "no model matches 'densnet*'"),
    # -- export (each is refused before anything is written)
    ("export-missing-dir", ["export", "{nowhere}"], "run directory not found"),
    ("export-not-a-run", ["export", "{notrun}"], "not a densekit run directory (no model.json)"),
    ("export-out-exists", ["export", "{run}", "--out", "{file}"], "thesis.tex: already exists; refusing to overwrite"),
    ("export-out-in-missing-folder", ["export", "{run}", "--out", "{nowhere}/model.onnx"], "folder does not exist"),
    ("export-opset-zero", ["export", "{run}", "--opset", "0"], "--opset: must be a positive integer, got 0"),
    ("export-opset-unknown", ["export", "{run}", "--opset", "99"], "opset must be an integer from 9 to 20"),
    ("export-batch-size-zero", ["export", "{run}", "--batch-size", "0"], "--batch-size: must be a positive integer"),
    ("export-truncated-weights", ["export", "{cut_weights}"], "model.safetensors: cannot read safetensors file"),
    # -- analyze (each is refused before anything is computed or written)
    ("analyze-missing-target", ["analyze", "{nowhere}"], "{nowhere}: is neither a run directory nor a registered model"),
    ("analyze-not-a-run", ["analyze", "{notrun}"], "not a densekit run directory (no model.json)"),
    ("analyze-model-without-out", ["analyze", "densenet121"], "--out is needed when the target is a model name"),
    ("analyze-unknown-analysis", ["analyze", "{run}", "--what", "speed"], "--what: unknown analysis 'speed'"),
    ("analyze-overfit-of-a-model", ["analyze", "densenet121", "--what", "overfit", "--out", "{new}"],
     "--what overfit needs a run directory"),
    ("analyze-out-is-a-file", ["analyze", "{run}", "--out", "{file}"], "thesis.tex: exists and is not a directory"),
    ("prune-amount-one", ["prune", "{run}", "--amount", "1", "--out", "{new}"], "amount must be a number in [0, 1), got 1.0"),
    ("prune-missing-dir", ["prune", "{nowhere}", "--amount", "0.3", "--out", "{new}"], "run directory not found"),
    ("prune-out-not-empty", ["prune", "{run}", "--amount", "0.3", "--out", "{run}"], "directory is not empty"),
    # -- train: starting from a run
    ("train-init-missing", train("--init", "{nowhere}", model=False), "run directory not found"),
    ("train-init-with-model", train("--init", "{run}"), "drop --model and --model-arg"),
    # -- train: data-parallel processes
    ("train-nproc-zero", train("--nproc", "0"), "--nproc: must be a positive integer, got 0"),
    ("train-nproc-batch-split", train("--nproc", "3"), "--batch-size 16 does not split evenly between 3 processes"),
]


def fill(argv: list[str], world: dict) -> list[str]:
    return [a.format(**world) for a in argv]


def test_the_table_is_large_and_covers_every_command():
    assert len({case[0] for case in CASES}) == len(CASES) >= 30
    assert len({tuple(case[1]) for case in CASES}) == len(CASES)  # distinct inputs, not just distinct names
    covered = {argv[0] for _, argv, _ in CASES if argv}
    assert covered >= set(COMMANDS), f"commands without a bad-input case: {set(COMMANDS) - covered}"


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_error_exits_2_with_one_line_and_changes_nothing(capsys, monkeypatch, world, argv, message):
    monkeypatch.chdir(world["cwd"])  # a default output folder would appear here
    before = snapshot(world["root"])
    rc, out, err = run_cli(capsys, *fill(argv, world))
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert out == ""
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(("densekit", "usage")) and " error: " in lines[0], err
    assert message.format(**world) in lines[0], err
    assert diff_snapshots(before, snapshot(world["root"])) == []
    assert not os.path.exists(world["marker"])  # no code in a data or weights file ever ran


# The real process: what a shell sees (exit status, stderr), through `python -m densekit`.
# an argparse refusal, a refusal after data were loaded (and logged), one from a decoder
REAL = ["train-lr-nan", "train-model-too-deep-for-16px", "predict-text-as-png"]


@pytest.mark.parametrize("case", REAL)
def test_user_error_in_a_real_process(world, case):
    argv, message = next(c[1:] for c in CASES if c[0] == case)
    before = snapshot(world["root"])
    proc = subprocess.run([PYTHON, "-m", "densekit", *fill(argv, world)], capture_output=True, text=True,
                          env=subprocess_env(), cwd=world["cwd"], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    # log lines (e.g. "loaded mnist from ...") may come first; the error is one line, the last
    errors = [line for line in proc.stderr.splitlines() if " error: " in line]
    assert len(errors) == 1 and proc.stderr.rstrip("\n").endswith(errors[0]), proc.stderr
    assert message.format(**world) in errors[0]
    assert diff_snapshots(before, snapshot(world["root"])) == []


@pytest.mark.parametrize("error", [RuntimeError, ValueError, KeyError])
def test_internal_errors_are_not_dressed_up_as_user_errors(capsys, monkeypatch, world, error):
    """main() catches UserError only: a bug, even a plain ValueError, propagates with its traceback."""
    import densekit.models.layers as layers

    def bug(self, x, *args, **kwargs):
        raise error("simulated bug deep inside densekit")

    # the features' fused forward: every fused model runs it, the inference copy's included
    monkeypatch.setattr(layers.Features, "_forward_fused", bug)
    before = snapshot(world["root"])
    with pytest.raises(error, match="simulated bug"):
        main(["predict", world["run"], world["png"], "--device", "cpu"])
    assert diff_snapshots(before, snapshot(world["root"])) == []


def test_internal_error_in_a_real_process_exits_1_with_traceback(world):
    hook = ("import runpy, densekit.models.layers as d\n"
            "def bug(self, x, *a, **k): raise RuntimeError('simulated bug deep inside densekit')\n"
            "d.Features._forward_fused = bug\n"
            "runpy.run_module('densekit', run_name='__main__', alter_sys=True)\n")
    before = snapshot(world["root"])
    proc = subprocess.run([PYTHON, "-c", hook, "predict", world["run"], world["png"], "--device", "cpu"],
                          capture_output=True, text=True, env=subprocess_env(), cwd=world["cwd"], timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().endswith("RuntimeError: simulated bug deep inside densekit")
    assert diff_snapshots(before, snapshot(world["root"])) == []
