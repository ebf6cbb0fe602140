"""Gradient flow at initialization: the chain really is a chain, and the numbers are right."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from densekit import DenseLayer, DenseNet
from densekit.analyze import ChainBlock, chain_of, gradient_flow
from densekit.analyze.gradients import dense_layers, gradients_png, layer_gradients


def small_densenet(**kw) -> DenseNet:
    torch.manual_seed(0)
    args = dict(growth_rate=4, block_config=(4, 4), num_init_features=8, stem="cifar", in_chans=1, num_classes=10)
    return DenseNet(**{**args, **kw})


def test_chain_has_no_dense_connections():
    model = small_densenet()
    chain = chain_of(model)
    blocks = [m for m in chain.features if isinstance(m, ChainBlock)]
    assert len(blocks) == 2
    for block in blocks:
        layers = list(block)
        assert all(isinstance(layer, DenseLayer) for layer in layers)
        # every layer after the first reads exactly the previous layer's k new maps
        for before, layer in zip(layers, layers[1:]):
            assert layer.conv1.in_channels == before.growth_rate == 4
        assert block.out_channels == 4
    assert blocks[0][0].conv1.in_channels == 8            # the stem's width
    assert blocks[1][0].conv1.in_channels == 4            # the chain transition keeps the width
    assert [len(list(b)) for b in blocks] == [4, 4]       # same depth
    assert chain.classifier.in_features == 4
    # same layer types as the DenseNet: bottleneck 1x1 to 4k, then 3x3 to k
    dense_layer, chain_layer = model.features.denseblock1.denselayer2, blocks[0][1]
    assert chain_layer.conv1.out_channels == dense_layer.conv1.out_channels == 16
    assert chain_layer.conv2.weight.shape == dense_layer.conv2.weight.shape
    assert chain(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_chain_of_a_pruned_model_has_its_narrower_bottlenecks():
    model = small_densenet()
    model.features.denseblock1.denselayer2.prune_(width=torch.tensor([0, 3, 5, 9, 11]))
    chain = chain_of(model)
    link = chain.features.denseblock1.denselayer2
    assert (link.conv1.out_channels, link.norm2.num_features, link.conv2.in_channels) == (5, 5, 5)
    assert chain.features.denseblock1.denselayer3.conv1.out_channels == 16  # the others stay whole
    assert chain(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_chain_output_is_only_the_last_layer():
    """Changing a layer's output changes the chain's output only through the layers after it:
    the block's output is the last layer's maps, nothing concatenated."""
    block = ChainBlock(small_densenet().features.denseblock1).eval()
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(block(x), block[-1](block[-2](block[-3](block[-4](x)))))


def test_gradient_norms_are_the_norms_of_the_conv_weight_gradients():
    model = small_densenet(block_config=(2,))
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    result = layer_gradients(model, x, y)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    layer = model.features.denseblock1.denselayer2
    expected = math.sqrt(layer.conv1.weight.grad.pow(2).sum() + layer.conv2.weight.grad.pow(2).sum())
    assert result["layers"][1]["grad_norm"] == pytest.approx(expected, rel=1e-5)
    numel = layer.conv1.weight.numel() + layer.conv2.weight.numel()
    assert result["layers"][1]["grad_rms"] == pytest.approx(expected / math.sqrt(numel), rel=1e-5)
    assert result["first_last_ratio"] == pytest.approx(result["layers"][0]["grad_norm"] / expected)


def test_dense_gradients_stay_even_where_the_chain_explodes():
    """At initialization, with batch norm in every layer, the chain's gradient grows towards the
    input (Yang et al. 2019); the dense connections keep it within a small factor."""
    model = small_densenet(block_config=(6, 6, 6))
    torch.manual_seed(1)
    x, y = torch.randn(16, 1, 16, 16), torch.arange(16) % 10
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = gradient_flow(model, x, y, seed=0)
    dense, chain = result["dense"], result["chain"]
    assert len(dense["layers"]) == len(chain["layers"]) == 18
    assert chain["first_last_ratio"] > 10 * dense["first_last_ratio"]
    assert chain["max_min_ratio"] > 10 * dense["max_min_ratio"]
    assert abs(math.log(dense["first_last_ratio"])) < abs(math.log(chain["first_last_ratio"]))
    assert result["dense_over_chain_ratio"] == pytest.approx(dense["first_last_ratio"] / chain["first_last_ratio"])
    # the model handed in is left as it was: both networks are fresh copies
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert gradients_png(result).startswith(b"\x89PNG")


def test_same_seed_same_numbers_and_fresh_weights():
    model = small_densenet()
    with torch.no_grad():
        model.classifier.weight.fill_(7.0)  # "trained" weights must not leak into the analysis
    x, y = torch.randn(4, 1, 16, 16), torch.arange(4)
    a, b = gradient_flow(model, x, y, seed=3), gradient_flow(model, x, y, seed=3)
    assert a["dense"]["layers"] == b["dense"]["layers"] and a["chain"]["layers"] == b["chain"]["layers"]
    fresh = gradient_flow(small_densenet(), x, y, seed=3)
    assert fresh["dense"]["layers"] == a["dense"]["layers"]
    assert [name for name, _ in dense_layers(model)][0] == "features.denseblock1.denselayer1"
