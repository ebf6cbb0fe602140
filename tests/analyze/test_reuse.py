"""Feature reuse (the paper's Fig. 5): known weights in, known heatmap out."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from densekit import DenseBlock, DenseNet
from densekit.analyze import feature_reuse
from densekit.analyze.reuse import block_reuse, channel_weights, reuse_png, source_widths


def hand_block() -> DenseBlock:
    """Two plain layers (3x3 conv), block input of 2 channels, k = 1, weights set by hand:
    layer 1 reads source 0 with |w| 1 and 3 on its two channels; layer 2 reads source 0 with
    |w| 2 and source 1 (layer 1's map) with |w| 4."""
    block = DenseBlock(in_channels=2, growth_rate=1, num_layers=2, bn_size=0)
    with torch.no_grad():
        w1 = block.denselayer1.conv1.weight            # (1, 2, 3, 3)
        w1[:, 0], w1[:, 1] = 1.0, -3.0
        w2 = block.denselayer2.conv1.weight            # (1, 3, 3, 3)
        w2[:, :2], w2[:, 2] = -2.0, 4.0
    return block


def test_hand_built_block_gives_the_known_heatmap():
    block = hand_block()
    reader = nn.Linear(4, 2, bias=False)  # reads the block's 2 + 1 + 1 output channels
    with torch.no_grad():
        reader.weight[:] = torch.tensor([[1.0, 1.0, 6.0, 0.0], [-1.0, -1.0, -6.0, 0.0]])
    result = block_reuse(block, reader, "classifier")
    assert result["sources"] == ["block input", "layer 1", "layer 2"]
    assert result["targets"] == ["layer 1", "layer 2", "classifier"]
    assert result["source_channels"] == [2, 1, 1]
    # rows: sources; columns: targets; None where the source comes after the target
    assert result["mean_abs"] == [[2.0, 2.0, 1.0], [None, 4.0, 6.0], [None, None, 0.0]]
    # each column scaled to its maximum (the paper's colour scale is per target)
    assert result["normalized"] == [[1.0, 0.5, 1 / 6], [None, 1.0, 1.0], [None, None, 0.0]]
    # mass shares: layer 2 puts 2*2*9 = 36 on source 0 and 4*9 = 36 on source 1
    assert result["share"][0][1] == pytest.approx(0.5) and result["share"][1][1] == pytest.approx(0.5)
    s = result["summary"]
    assert s["older_share"] == pytest.approx(0.5)              # only layer 2 has an older source
    assert s["older_channel_fraction"] == pytest.approx(2 / 3)  # 2 of its 3 input channels
    assert s["block_input_share"] == pytest.approx((1.0 + 0.5) / 2)
    assert s["classifier_late_half_share"] == pytest.approx(0.0)  # late half of 2 layers: layer 2, weight 0
    assert s["classifier_block_input_share"] == pytest.approx(4 / 16)


def test_input_index_maps_weights_back_to_the_channels_they_read():
    """A pruned layer 2 reads channels 0 and 2 only: its weights go back to those channels,
    and the channel it dropped counts as a cut connection (0)."""
    block = hand_block()
    layer = block.denselayer2
    layer.norm1 = nn.BatchNorm2d(2)
    layer.conv1 = nn.Conv2d(2, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        layer.conv1.weight[:, 0], layer.conv1.weight[:, 1] = 6.0, 5.0
    layer.input_index = torch.tensor([0, 2])
    assert block.forward_plain(torch.randn(2, 2, 5, 5)).shape == (2, 4, 5, 5)  # the pruned block still runs

    assert channel_weights(layer.conv1.weight, layer.input_index, 3).tolist() == [6.0, 0.0, 5.0]
    result = block_reuse(block)
    assert [row[1] for row in result["mean_abs"]] == [3.0, 5.0, None]  # source 0: (6 + 0) / 2 channels


def test_source_widths_follow_the_modules():
    block = DenseBlock(in_channels=5, growth_rate=3, num_layers=4)
    assert source_widths(block) == [5, 3, 3, 3, 3]


def test_every_block_gets_a_heatmap_with_its_reader():
    torch.manual_seed(0)
    model = DenseNet(4, (3, 2), num_init_features=6, stem="cifar", in_chans=1, num_classes=10)
    result = feature_reuse(model)
    first, last = result["blocks"]
    assert (first["block"], first["targets"][-1]) == ("denseblock1", "transition")
    assert (last["block"], last["targets"][-1]) == ("denseblock2", "classifier")
    assert len(first["mean_abs"]) == 4 and all(len(row) == 4 for row in first["mean_abs"])
    for block in result["blocks"]:
        for col in range(len(block["targets"])):
            column = [row[col] for row in block["normalized"] if row[col] is not None]
            assert max(column) == pytest.approx(1.0)
    # the transition reads every source: its column is full
    assert all(row[-1] is not None for row in first["mean_abs"])
    # at Kaiming initialization no source is favoured: the weight share matches the channel share
    s = first["summary"]
    assert s["older_share"] == pytest.approx(s["older_channel_fraction"], abs=0.1)
    png = reuse_png(result)
    assert png.startswith(b"\x89PNG")


def test_transition_column_uses_the_transition_weights():
    torch.manual_seed(0)
    model = DenseNet(2, (2, 1), num_init_features=2, stem="cifar", bn_size=0, num_classes=3)
    with torch.no_grad():
        model.features.transition1.conv.weight.fill_(0.25)
    column = [row[-1] for row in feature_reuse(model)["blocks"][0]["mean_abs"]]
    assert all(math.isclose(v, 0.25) for v in column)
