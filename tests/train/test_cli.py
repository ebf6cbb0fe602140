"""End to end through the command line: train on every dataset format, then eval and predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import densekit
from densekit.data import load_dataset
from densekit.models import native
from densekit.train.runtime import bf16_preferred

METRIC_KEYS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_idx_then_eval_and_load(cli, tiny, writers, mnist_dir, tmp_path):
    run = tmp_path / "run"
    rc, out, err = cli("train", *tiny, "--dataset", "mnist", "--data-dir", mnist_dir, "--epochs", "2",
                       "--batch-size", "16", "--out", run)
    assert rc == 0, err
    assert sorted(p.name for p in run.iterdir()) == ["curves.png", "metrics.jsonl", "model.json", "model.safetensors",
                                                    "resume.safetensors", "summary.json"]
    assert "test accuracy" in out and str(run) in out

    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(set(m) == METRIC_KEYS for m in metrics)
    assert metrics[-1]["lr"] == 0.0  # the fast recipe anneals to zero at the last step
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == 2 * (54 // 16) and summary["finished"]
    # the kept weights are the best epoch's on the validation split, held out of the training images
    assert summary["kept"] == "best" and summary["val_images"] == 10 and summary["train_images"] == 54
    assert summary["val_accuracy"] == max(m["val_acc"] for m in metrics)
    assert metrics[summary["kept_epoch"] - 1]["val_acc"] == summary["val_accuracy"]
    assert summary["test_images"] == 30 and 0 <= summary["test_accuracy"] <= 1 and "stratified" in summary["val_split"]
    assert summary["params"] == sum(p.numel() for p in densekit.load(run).parameters())
    assert summary["macs"] > 0 and summary["device"] == "cpu" and summary["torch"] == torch.__version__
    assert summary["native_cpu_kernels"] is native.available()  # which kernels the fused block ran
    # by default bf16 autocast where the CPU's bf16 instructions are the faster, else float32
    assert summary["bf16_hardware"] in ("AMX-BF16", "AVX512-BF16", "none")
    assert summary["precision"] == ("bf16" if bf16_preferred(torch.device("cpu")) else "fp32")
    assert summary["cuda_graph"] is False and summary["cuda_graph_captured"] is False  # configured, and what ran
    assert summary["recipe"]["name"] == "fast" and summary["recipe"]["label_smoothing"] == 0.1
    assert (run / "curves.png").read_bytes()[:8] == PNG_MAGIC

    info = json.loads((run / "model.json").read_text())
    assert info["model"] == "densenet_bc_100_k12" and info["dataset"] == "mnist"
    assert info["model_kwargs"]["block_config"] == [1, 1] and info["model_kwargs"]["in_chans"] == 1
    assert info["preprocessing"]["image_size"] == [16, 16]
    ds = load_dataset("mnist", mnist_dir)
    assert info["preprocessing"]["mean"] == pytest.approx(ds.mean) and info["classes"] == ds.classes

    # densekit.load: eval mode, the trained weights, and what is needed to feed it
    model = densekit.load(run)
    assert not model.training
    saved = safetensors.torch.load_file(run / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (1, 16, 16) and cfg["classes"] == ds.classes and cfg["num_classes"] == 10
    mean, std = (torch.tensor(cfg[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    x = (ds.test.images.float() / 255 - mean) / std
    with torch.no_grad():
        correct = int((model(x).argmax(1) == ds.test.labels).sum())

    # eval reports the very number training wrote, with the same code path
    rc, out, err = cli("eval", run, "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["accuracy"] == summary["test_accuracy"]
    assert report["correct"] == correct == summary["test_correct"]
    assert report["loss"] == pytest.approx(summary["test_loss"], rel=1e-6)
    assert [c["label"] for c in report["per_class"]] == ds.classes
    assert sum(c["count"] for c in report["per_class"]) == 30
    assert np.trace(np.array(report["confusion"])) == report["correct"]
    assert (run / "confusion.png").read_bytes()[:8] == PNG_MAGIC

    # another dataset's test split: only if the model can take its images
    cifar = writers.cifar(tmp_path / "cifar")
    rc, out, err = cli("eval", run, "--dataset", "cifar10", "--data-dir", cifar)
    assert rc == 2 and "images are 3x16x16 but the model" in err and len(err.strip().splitlines()) == 1

    rc, out, err = cli("eval", run, "--out", tmp_path / "cm.png")
    assert rc == 0, err
    assert f"{100 * summary['test_accuracy']:.2f}%" in out and len(out.splitlines()) == 12
    assert (tmp_path / "cm.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("classes", [10, 100])
def test_train_cifar(cli, tiny, writers, tmp_path, classes):
    data = writers.cifar(tmp_path / "data", classes)
    run = tmp_path / "run"
    rc, out, err = cli("train", *tiny, "--dataset", f"cifar{classes}", "--data-dir", data, "--epochs", "1",
                       "--batch-size", "20", "--recipe", "paper", "--out", run)
    assert rc == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["input_size"] == [3, 32, 32] and summary["num_classes"] == classes
    assert summary["steps"] == summary["train_images"] // 20 == 1
    assert summary["train_images"] + summary["val_images"] == 40 and summary["val_images"] >= 4
    assert summary["recipe"]["name"] == "paper" and summary["batch_size"] == 20
    model = densekit.load(run)
    assert model.classifier.out_features == classes and model.pretrained_cfg["in_chans"] == 3
    rc, out, err = cli("eval", run, "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["accuracy"] == summary["test_accuracy"] and len(report["per_class"]) == classes
    # classes with no test image have no accuracy
    assert sum(c["accuracy"] is None for c in report["per_class"]) == sum(c["count"] == 0 for c in report["per_class"])


def test_imagefolder_and_predict(cli, tiny, writers, tmp_path):
    data = writers.imagefolder(tmp_path / "folder")
    run = tmp_path / "run"
    rc, out, err = cli("train", *tiny, "--dataset", "imagefolder", "--data-dir", data, "--image-size", "16",
                       "--epochs", "2", "--batch-size", "12", "--out", run)
    assert rc == 0, err
    info = json.loads((run / "model.json").read_text())
    assert info["classes"] == ["circle", "cross", "square"]
    assert info["preprocessing"]["in_chans"] == 3 and info["preprocessing"]["image_size"] == [16, 16]

    # files of other sizes, modes and formats than the training images
    rng = np.random.default_rng(0)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    files = []
    for name, mode, size in (("a.png", "RGB", 16), ("b.png", "RGBA", 40), ("c.png", "L", 9),
                             ("d.jpg", "RGB", 50), ("e.jpeg", "L", 16), ("f.png", "P", 23)):
        shape = (size, size) if mode in ("L", "P") else (size, size, len(mode))
        im = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), "L" if mode == "P" else None)
        (im.convert("P") if mode == "P" else im).save(imgs / name)
        files.append(imgs / name)
    rc, out, err = cli("predict", run, *files, "--top-k", "3", "--precision", "fp32")  # as the check below
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in rows] == [str(f) for f in files]

    # the probabilities are the loaded model's on images decoded and normalized as in training
    model = densekit.load(run)
    cfg = model.pretrained_cfg
    assert info["preprocessing"]["crop_pct"] == 1.0  # a small folder: short side to 16, the center kept
    x = densekit.data.load_images(files, 3, (16, 16), crop_pct=1.0).float() / 255
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = model(x).softmax(1)
    for row, p in zip(rows, probs):
        assert row["index"] == int(p.argmax()) and row["label"] == cfg["classes"][row["index"]]
        assert row["prob"] == pytest.approx(float(p.max()), abs=1e-5)
        assert [t["prob"] for t in row["top"]] == sorted((t["prob"] for t in row["top"]), reverse=True)
        assert len(row["top"]) == 3 and row["top"][0]["index"] == row["index"]
        assert sum(t["prob"] for t in row["top"]) == pytest.approx(1.0, abs=1e-5)

    rc, out, err = cli("predict", run, files[0])
    assert rc == 0 and "top" not in json.loads(out)

    # a missing file or a non-image: one line, exit 2, and nothing on stdout
    (tmp_path / "notes.txt").write_text("not an image")
    for bad in (tmp_path / "missing.png", tmp_path / "notes.txt"):
        rc, out, err = cli("predict", run, files[0], bad)
        assert rc == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and str(bad) in err, err
    rc, out, err = cli("predict", run, files[0], "--top-k", "4")
    assert rc == 2 and "--top-k" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs: must be a positive integer"),
    (["--lr", "-1"], "--lr: must be a positive finite number"),
    (["--lr", "nan"], "--lr: must be a positive finite number"),
    (["--batch-size", "x"], "--batch-size: must be a positive integer"),
    (["--dataset", "svhn"], "invalid choice"),
    (["--recipe", "slow"], "invalid choice"),
    (["--model", "densnet121"], "unknown model 'densnet121'; known: dense_resnet121"),
    (["--model-arg", "growth"], "expected KEY=VALUE"),
    (["--model-arg", "growthrate=3"], "unknown argument 'growthrate'"),
    (["--model-arg", "num_classes=3"], "comes from the dataset"),
    (["--model-arg", "compression=2"], "compression must be a number in (0, 1]"),
    (["--device", "tpu"], "device must be one of auto, cpu, cuda"),
    (["--model", "densenet121", "--image-size", "16"], "--image-size 16 is below the smallest input densenet121 "
                                                         "takes (29 px"),
    (["--model", "densenet121", "--model-arg", "growth=1"], "unknown argument 'growth'"),
    (["--batch-size", "65"], "larger than the 54 training images"),
    (["--val-fraction", "1"], "--val-fraction: must be a number in [0, 1)"),
    (["--keep", "first"], "invalid choice"),
    (["--patience", "0"], "--patience: must be a positive integer"),
    (["--resume"], "--resume needs --out"),
])
def test_bad_flags_exit_2_with_one_line(cli, tiny, mnist_dir, tmp_path, argv, message):
    run = tmp_path / "run"
    model = [] if "--model" in argv else tiny  # a whole densenet121, to meet its size limit
    args = ["train", *model, "--dataset", "mnist", "--data-dir", mnist_dir, "--batch-size", "16", "--out", run, *argv]
    if argv == ["--resume"]:
        args.remove("--out"), args.remove(run)
    rc, out, err = cli(*args)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not run.exists()  # nothing written for a refused run


def test_data_errors_exit_2(cli, tiny, mnist_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("DENSEKIT_DATA", raising=False)
    out_dir = tmp_path / "r"
    rc, out, err = cli("train", *tiny, "--dataset", "mnist", "--data-dir", tmp_path / "nowhere", "--out", out_dir)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "nowhere" in err
    (mnist_dir / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    rc, out, err = cli("train", *tiny, "--dataset", "mnist", "--data-dir", mnist_dir, "--out", out_dir)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "corrupt gzip" in err
    rc, out, err = cli("train", *tiny, "--dataset", "cifar10", "--out", out_dir)
    assert rc == 2 and "--data-dir" in err  # cifar has no default location
    rc, out, err = cli("eval", tmp_path / "nowhere")
    assert rc == 2 and "run directory not found" in err
    assert not out_dir.exists()


def test_never_overwrites(cli, tiny, mnist_dir, tmp_path):
    base = ["train", *tiny, "--dataset", "mnist", "--data-dir", mnist_dir, "--batch-size", "32", "--epochs", "1"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    rc, out, err = cli(*base, "--out", mine)
    assert rc == 2 and "not empty" in err and len(err.strip().splitlines()) == 1
    rc, out, err = cli(*base, "--out", mine, "--resume")
    assert rc == 2
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"] and (mine / "thesis.tex").read_text() == "precious"

    run = tmp_path / "run"
    assert cli(*base, "--out", run)[0] == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    rc, out, err = cli(*base, "--out", run)  # the same config, finished
    assert rc == 2 and "finished run" in err
    rc, out, err = cli(*base, "--out", run, "--seed", "1")
    assert rc == 2 and "seed is 0 there, 1 here" in err
    rc, out, err = cli(*base, "--out", run, "--lr", "0.05", "--resume")
    assert rc == 2 and "lr is 0.2 there, 0.05 here" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    rc, out, err = cli("train", "--out", tmp_path / "empty", "--resume")
    assert rc == 2 and "holds no run" in err


@pytest.mark.parametrize("argv, message", [
    (["eval"], "the following arguments are required: DIR"),
    (["eval", "run", "--dataset", "svhn"], "invalid choice"),
    (["predict", "run"], "the following arguments are required: IMAGE"),
    (["predict", "run", "x.png", "--top-k", "0"], "--top-k: must be a positive integer"),
    (["predict", "run", "x.png", "--device", "gpu"], "device must be one of"),
])
def test_bad_eval_and_predict_flags(cli, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli(*argv)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("recipe", ["sprint", "long"])
def test_gpu_presets_run_and_record_their_recipe(cli, tiny, mnist_dir, tmp_path, recipe):
    # The presets are for an H100; here one step on CPU checks they are wired end to end
    # (long's Cutout included) and that the run records the recipe it used.
    run = tmp_path / recipe
    rc, out, err = cli("train", *tiny, "--dataset", "mnist", "--data-dir", mnist_dir, "--recipe", recipe,
                       "--batch-size", "16", "--max-steps", "1", "--out", run)
    assert rc == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["recipe"]["name"] == recipe and summary["steps"] == 1
    assert summary["recipe"]["erase"] == (10 if recipe == "long" else 0)


def test_an_image_size_a_run_cannot_keep_is_refused_before_reading(cli, tiny, tmp_path):
    rc, _, err = cli("train", *tiny, "--dataset", "mnist", "--data-dir", tmp_path / "nowhere", "--image-size", "9000",
                     "--out", tmp_path / "run")
    assert rc == 2 and err.strip().splitlines() == [
        "densekit train: error: --image-size 9000 is above the largest side a run keeps (8192)"]
    assert not (tmp_path / "run").exists()


def test_eval_skips_the_files_training_skipped(cli, tiny, writers, tmp_path):
    data = writers.imagefolder(tmp_path / "photos", n_train=6, n_test=2)
    junk = data / "test" / "circle" / "junk.png"
    junk.write_bytes(b"not an image")
    run = tmp_path / "run"
    rc, out, err = cli("train", *tiny, "--dataset", "imagefolder", "--data-dir", data, "--image-size", "16",
                       "--epochs", "1", "--batch-size", "4", "--skip-bad-images", "--out", run, "--no-progress")
    assert rc == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_images"] == 6
    rc, _, err = cli("eval", run, "--json")
    assert rc == 2 and "--skip-bad-images" in err and "junk.png" in err
    rc, out, err = cli("eval", run, "--json", "--skip-bad-images")
    assert rc == 0, err
    assert json.loads(out)["accuracy"] == summary["test_accuracy"]


def test_precision_bf16_trains_evaluates_and_predicts_on_the_cpu(cli, tiny, mnist_dir, tmp_path):
    run = tmp_path / "run"
    rc, out, err = cli("train", *tiny, "--dataset", "mnist", "--data-dir", mnist_dir, "--epochs", "1",
                       "--batch-size", "16", "--precision", "bf16", "--out", run)
    assert rc == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"] == "bf16" and "bf16" in out
    # the weights stay float32 under autocast
    assert all(t.dtype == torch.float32 for t in safetensors.torch.load_file(run / "model.safetensors").values()
               if t.is_floating_point())
    rc, out, err = cli("eval", run, "--json", "--precision", "bf16")
    assert rc == 0, err
    report = json.loads(out)
    assert report["precision"] == "bf16" and 0 <= report["accuracy"] <= 1
    rc, out, err = cli("eval", run, "--json", "--precision", "fp32")
    assert rc == 0 and json.loads(out)["precision"] == "fp32"
    # auto scores a run trained in bf16 as the device prefers: bf16 only where its bf16 is the faster
    rc, out, err = cli("eval", run, "--json")
    assert rc == 0 and json.loads(out)["precision"] == ("bf16" if bf16_preferred(torch.device("cpu")) else "fp32")
    fp32_run = tmp_path / "fp32"
    rc, _, err = cli("train", *tiny, "--dataset", "mnist", "--data-dir", mnist_dir, "--epochs", "1",
                     "--batch-size", "16", "--precision", "fp32", "--out", fp32_run)
    assert rc == 0, err
    rc, out, err = cli("eval", fp32_run, "--json")
    report = json.loads(out)
    assert rc == 0 and report["precision"] == "fp32"
    assert report["accuracy"] == json.loads((fp32_run / "summary.json").read_text())["test_accuracy"]
    rc, _, err = cli("train", *tiny, "--dataset", "mnist", "--data-dir", mnist_dir, "--precision", "fp16",
                     "--out", tmp_path / "other")
    assert rc == 2 and "--precision" in err


def test_select_runtime_precision():
    from densekit.errors import UserError
    from densekit.train.runtime import select_runtime

    # auto: bf16 autocast where the CPU's bf16 instructions are faster than its float32 ones
    want = torch.bfloat16 if bf16_preferred(torch.device("cpu")) else None
    assert select_runtime("cpu").amp_dtype == want
    cpu = torch.device("cpu")
    assert bf16_preferred(cpu, "AMX-BF16", "GenuineIntel") and bf16_preferred(cpu, "AVX512-BF16", "AuthenticAMD")
    # an Intel CPU without AMX multiplies as many float32 values per cycle (two FMA units)
    assert not bf16_preferred(cpu, "AVX512-BF16", "GenuineIntel") and not bf16_preferred(cpu, "none", "AuthenticAMD")
    assert not bf16_preferred(cpu, "AVX512-BF16", "")
    assert select_runtime("cpu", precision="bf16").amp_dtype == torch.bfloat16
    assert select_runtime("cpu", precision="fp32").precision == "fp32"
    with pytest.raises(UserError, match="precision must be one of auto, fp32, bf16, got 'half'"):
        select_runtime("cpu", precision="half")
