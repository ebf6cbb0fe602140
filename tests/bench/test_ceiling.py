"""bench/ceiling.py: the MACs it divides by, and its output."""

import importlib.util
import json
from pathlib import Path

import pytest

from densekit import create_model

_PATH = Path(__file__).resolve().parents[2] / "bench" / "ceiling.py"


@pytest.fixture(scope="module")
def ceiling():
    spec = importlib.util.spec_from_file_location("bench_ceiling", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_densenet121_fast_path_macs(ceiling):
    # torchvision's published 2.83 GMACs (2,834,161,664 counted on the reference path), less
    # three quarters of each transition's 1x1 convolution, which the fast path runs after its
    # pooling: 3 x 102,760,448 x 3 / 4 = 231,211,008
    model = create_model("densenet121")
    assert ceiling.macs_per_image(model, (3, 224, 224), train=False) == 2_834_161_664 - 231_211_008


def test_a_training_step_counts_forward_and_both_gradients(ceiling):
    # backward multiplies as much as forward twice (input and weight gradients), but for the
    # stem convolution's input gradient, which nothing needs
    model = create_model("densenet_bc_100_k12", in_chans=1, num_classes=10)
    forward = ceiling.macs_per_image(model, (1, 28, 28), train=False)
    train = ceiling.macs_per_image(model, (1, 28, 28), train=True)
    stem = model.features.conv0.weight.numel() * 28 * 28
    assert train == pytest.approx(3 * forward - stem, rel=1e-6)
    assert model.features.conv0.weight.grad is None  # the count leaves no gradients behind


def test_prints_ceilings_and_what_a_target_needs(ceiling, capsys):
    ceiling.main(["--model", "densenet_bc_40_k12_s2", "--input-size", "28", "--in-chans", "1",
                  "--num-classes", "10", "--sizes", "64", "--rounds", "1", "--infer", "100"])
    out = json.loads(capsys.readouterr().out)
    best = out["rates"]["fp32"]["best"]
    assert best == max(r["best"] for r in out["rates"]["fp32"]["gmac_s"].values())
    assert out["rates"]["fp32"]["ceiling_img_s"]["infer"] == pytest.approx(best / out["macs_per_image"]["infer"],
                                                                          rel=1e-2)
    assert out["targets"]["infer"]["needs_gmac_s"] == pytest.approx(100 * out["macs_per_image"]["infer"], abs=0.1)
