"""Parameters, MACs and saved activations: checked against published and hand-counted figures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from densekit.analyze import activation_memory, cost_table, saved_activation_bytes
from densekit.analyze.cost import REFERENCES


def test_cost_table_matches_published_parameter_counts_and_macs():
    rows = {r["model"]: r for r in cost_table(["torchvision:resnet50", "densekit:densenet121", "paper:resnet110"])}
    resnet, densenet, paper = rows["torchvision:resnet50"], rows["densekit:densenet121"], rows["paper:resnet110"]
    assert resnet["params"] == 25_557_032 and densenet["params"] == 7_978_856
    # torchvision publishes 4.09 and 2.83 GFLOPS (multiply-accumulates, in its terms) at 224 px
    assert resnet["macs"] / 1e9 == pytest.approx(4.09, abs=0.01)
    assert densenet["macs"] / 1e9 == pytest.approx(2.83, abs=0.01)
    assert resnet["published"] == dict(metric="ImageNet-1k top-1 accuracy (%), 224 px single crop", value=76.13,
                                       source="torchvision ResNet50_Weights.IMAGENET1K_V1")
    assert densenet["published"]["value"] == 74.434 and "DenseNet121_Weights" in densenet["published"]["source"]
    # a row from the paper only: nothing built, its figures and source kept
    assert paper["params"] is None and paper["params_published"] == "1.7M"
    assert paper["published"]["value"] == 6.41 and "Table 2" in paper["published"]["source"]


def test_cifar_rows_cite_table_2():
    rows = cost_table(["densekit:densenet_bc_100_k12"], macs=False)
    assert rows[0]["params"] == 769_162  # the paper's 0.8M
    assert rows[0]["published"]["value"] == 4.51 and rows[0]["macs"] is None
    with pytest.raises(ValueError, match="unknown reference model 'resnet50'; known: "):
        cost_table(["resnet50"])
    assert all(ref.source or ref.published is None for ref in REFERENCES.values())


def test_saved_bytes_are_counted_once_per_storage_without_parameters():
    # Linear saves its input (2x8 fp32 = 64 B); ReLU its output (2x16 = 128 B), which the
    # second Linear saves again as its input: one storage, counted once. Weights: not counted.
    model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 3))
    assert saved_activation_bytes(model, torch.randn(2, 8)) == 64 + 128


def test_densenet_keeps_more_activations_than_resnet_unless_fused():
    result = activation_memory(image_size=64, batch=1)
    per_image = {r["model"]: r["saved_bytes_per_image"] for r in result["rows"]}
    plain, fused = per_image["torchvision:densenet121"], per_image["densekit:densenet121 (fused)"]
    assert per_image["densekit:densenet121 (reference path)"] == pytest.approx(plain, rel=0.05)
    assert plain > per_image["torchvision:resnet50"]
    assert fused < 0.5 * plain
