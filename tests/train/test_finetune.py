"""Fine-tuning from the command line: pretrained weights (a densekit run, a torchvision file),
a new head, a frozen backbone, a head trained first, and multi-label CSV data end to end
(train, eval, predict, export)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision
from PIL import Image

from densekit.train.recipes import FINETUNE, build_optimizer

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)
LABELS = ("left", "right", "top")


def write_multilabel(root: Path, n: dict[str, int], size: int = 16, seed: int = 0) -> Path:
    """Gray PNGs whose labels are the bright halves they hold (left, right, top), listed in
    CSVs in ChestX-ray14's layout ("Image Index", "Finding Labels" joined by "|")."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    k = 0
    for split, count in n.items():
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["Image Index", "Finding Labels"])
            for _ in range(count):
                present = rng.random(3) < 0.5
                img = rng.integers(0, 60, (size, size), dtype=np.uint8)
                h = size // 2
                for on, region in zip(present, (np.s_[:, :h], np.s_[:, h:], np.s_[:h, :])):
                    if on:
                        img[region] = np.maximum(img[region], 200)
                name = f"images/{k:04d}.png"
                Image.fromarray(img).save(root / name)
                w.writerow([name, "|".join(l for l, on in zip(LABELS, present) if on) or "No Finding"])
                k += 1
    return root


CSV_ARGS = ["--dataset", "csv", "--train-csv", "train.csv", "--val-csv", "val.csv", "--test-csv", "test.csv",
            "--path-column", "Image Index", "--label-column", "Finding Labels", "--label-sep", "|"]


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny, writers):
    """A single-label run on 16 px MNIST-like images: the weights to start from."""
    from densekit.cli import main

    root = tmp_path_factory.mktemp("source")
    data = writers.mnist(root / "mnist")
    run = root / "run"
    assert main([str(a) for a in ["train", *tiny, "--dataset", "mnist", "--data-dir", data, "--epochs", "1",
                                  "--batch-size", "16", "--out", run, "--no-progress"]]) == 0
    return run


def weights(run: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(run / "model.safetensors")


def test_multi_label_fine_tune_from_a_run_then_eval_predict_export(cli, source, tmp_path):
    data = write_multilabel(tmp_path / "data", dict(train=48, val=16, test=16))
    run = tmp_path / "ft"
    rc, out, err = cli("train", "--pretrained", source, *CSV_ARGS, "--data-dir", data, "--multi-label",
                       "--pos-weight", "auto", "--epochs", "2", "--batch-size", "8", "--out", run, "--no-progress")
    assert rc == 0, err
    s = json.loads((run / "summary.json").read_text())
    # everything but the classifier loaded from the run: 10 MNIST classes there, 3 labels here
    assert s["pretrained"]["kind"] == "densekit" and s["pretrained"]["new"] == ["classifier.weight", "classifier.bias"]
    assert len(s["pretrained"]["loaded"]) == len(weights(source)) - 2 and not s["pretrained"]["adapted"]
    assert s["multi_label"] and s["recipe"]["name"] == "finetune" and s["recipe"]["optimizer"] == "adamw"
    assert s["input_size"] == [1, 16, 16] and s["num_classes"] == 3 and s["val_images"] == 16
    assert 0 <= s["test_auroc"] <= 1 and 0 <= s["test_ap"] <= 1 and sorted(s["test_auroc_per_label"]) == sorted(LABELS)
    # the kept epoch is the one of the best mean validation AUROC
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert s["kept_epoch"] == 1 + max(range(2), key=lambda i: (records[i]["val_auroc"], -i))
    assert s["val_auroc"] == pytest.approx(records[s["kept_epoch"] - 1]["val_auroc"])
    info = json.loads((run / "model.json").read_text())
    source_info = json.loads((source / "model.json").read_text())
    assert info["multi_label"] and info["preprocessing"]["mean"] == source_info["preprocessing"]["mean"]
    assert info["csv"]["label_sep"] == "|" and info["classes"] == sorted(LABELS)

    rc, out, err = cli("eval", run, "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["multi_label"] and report["mean_auroc"] == pytest.approx(s["test_auroc"])
    assert [r["label"] for r in report["per_label"]] == sorted(LABELS)
    assert (run / "roc.png").read_bytes().startswith(b"\x89PNG")
    rc, out, err = cli("eval", run)
    assert rc == 0 and "AUROC" in out and "positives" in out

    image = data / "images" / "0000.png"
    rc, out, err = cli("predict", run, image, "--threshold", "0.0")
    assert rc == 0, err
    row = json.loads(out)
    assert sorted(row["probs"]) == sorted(LABELS) and row["labels"] == sorted(LABELS)  # threshold 0: every label
    assert all(0 <= p <= 1 for p in row["probs"].values())

    rc, out, err = cli("export", run, "--out", tmp_path / "m.onnx")
    assert rc == 0, err
    from densekit.export import read_metadata

    meta = read_metadata(tmp_path / "m.onnx")
    assert meta["output_activation"] == "sigmoid" and meta["classes"] == sorted(LABELS)


def test_frozen_backbone_trains_the_classifier_alone(cli, source, writers, tmp_path):
    data = writers.mnist(tmp_path / "m")
    run = tmp_path / "probe"
    rc, out, err = cli("train", "--pretrained", source, "--dataset", "mnist", "--data-dir", data, "--freeze-backbone",
                       "--epochs", "1", "--batch-size", "16", "--out", run, "--no-progress")
    assert rc == 0, err
    before, after = weights(source), weights(run)
    for k, v in before.items():
        if k.startswith("classifier"):
            assert not torch.equal(v, after[k]), k  # the same 10 classes: kept, then trained
        else:
            assert torch.equal(v, after[k]), k  # weights and batch-norm statistics alike
    s = json.loads((run / "summary.json").read_text())
    # a linear probe by default: unaugmented images, a large rate, the converged (last) head
    assert s["recipe"]["name"] == "probe" and s["lr"] == 0.1 and s["kept"] == "last" and s["kept_epoch"] == 1
    assert (s["recipe"]["crop_padding"], s["recipe"]["hflip"], s["recipe"]["crop_scale"]) == (0, False, None)


def test_head_epochs_then_everything(cli, source, writers, tmp_path):
    data = writers.mnist(tmp_path / "m")
    run = tmp_path / "run"
    base = ["train", "--pretrained", source, "--dataset", "mnist", "--data-dir", data, "--head-epochs", "1",
            "--epochs", "2", "--batch-size", "16", "--keep", "last", "--out", run, "--no-progress", "--deterministic"]
    rc, _, err = cli(*base, "--max-steps", "3")  # 3 steps an epoch: the head alone
    assert rc == 0, err
    mid = weights(run)
    assert all(torch.equal(v, mid[k]) for k, v in weights(source).items() if not k.startswith("classifier"))
    rc, _, err = cli(*base)  # resumed: epoch 2 trains everything
    assert rc == 0, err
    end = weights(run)
    assert not torch.equal(end["features.conv0.weight"], mid["features.conv0.weight"])


def test_backbone_learning_rate_scale_and_adamw():
    from densekit.models import create_model

    model = create_model("densenet_bc_100_k12", growth_rate=4, block_config=(1, 1), num_classes=3)
    head = {id(p) for p in model.get_classifier().parameters()}
    opt = build_optimizer(model, FINETUNE, 1e-3, head=head, backbone_lr_scale=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    groups = [(g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups]
    # the head's weight (decayed) and bias (not), then the backbone's alike at a tenth of the rate
    assert groups[:2] == [(1e-3, 0.01, 1), (1e-3, 0.0, 1)]
    assert [g[:2] for g in groups[2:]] == [(pytest.approx(1e-4), 0.01), (pytest.approx(1e-4), 0.0)]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_a_torchvision_file_fine_tunes_with_a_new_head_and_predicts(cli, tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.DenseNet(growth_rate=8, block_config=(1, 1, 1, 1), num_init_features=8)
    torch.save(tv.state_dict(), tmp_path / "tiny-densenet.pth")
    data = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 1)):
        for c, name in enumerate("abcdefg"):
            for i in range(n):
                (data / split / name).mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) // (1 + c % 3)
                Image.fromarray(pixels).save(data / split / name / f"{i}.png")
    run = tmp_path / "run"
    rc, out, err = cli("train", "--pretrained", tmp_path / "tiny-densenet.pth", "--model", "densenet121",
                       "--model-arg", "growth_rate=8", "--model-arg", "block_config=(1,1,1,1)",
                       "--model-arg", "num_init_features=8", "--dataset", "imagefolder", "--data-dir", data,
                       "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--out", run, "--no-progress")
    assert rc == 0, err
    s = json.loads((run / "summary.json").read_text())
    assert s["pretrained"]["kind"] == "torchvision" and s["num_classes"] == 7
    assert s["pretrained"]["new"] == ["classifier.weight", "classifier.bias"]
    info = json.loads((run / "model.json").read_text())
    assert info["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])  # ImageNet's, as the weights
    jpeg = tmp_path / "x.jpg"
    Image.fromarray(np.full((50, 70, 3), 120, np.uint8)).save(jpeg)
    rc, out, err = cli("predict", run, jpeg)
    assert rc == 0, err
    assert json.loads(out)["label"] in "abcdefg"


def test_fine_tuning_refusals(cli, source, tmp_path):
    rc, _, err = cli("train", "--pretrained", source, "--init", source, "--out", tmp_path / "a")
    assert rc == 2 and "--pretrained and --init" in err
    rc, _, err = cli("train", "--pretrained", source, "--freeze-backbone", "--head-epochs", "1", "--out", tmp_path / "b")
    assert rc == 2 and "--freeze-backbone" in err and "--head-epochs" in err
    rc, _, err = cli("train", "--train-csv", "x.csv", "--out", tmp_path / "c")
    assert rc == 2 and err.strip().endswith("--train-csv describes the csv dataset's files; give --dataset csv")
    rc, _, err = cli("train", "--dataset", "csv", "--data-dir", tmp_path, "--out", tmp_path / "d")
    assert rc == 2 and "--train-csv" in err and "--path-column" in err
