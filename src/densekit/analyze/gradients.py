"""Gradient flow at initialization: does the loss reach the first layers of a deep network?

The DenseBlock blog post (and the paper's abstract) say dense connections "alleviate the
vanishing gradient". The test here: one real batch, one backward pass at the initial weights, and the
gradient norm of every dense layer's convolution weights, for the DenseNet and for the same
network with its dense connections cut (a *chain*: each layer sees only the k maps of the
layer before it; same layers, same depth, same initialization). A gradient that vanishes
towards the input shows as a small ratio of the first layer's norm to the last's; one that
explodes, as a large one. With batch norm in every layer, a deep plain chain at
initialization explodes rather than vanishes (Yang et al., "A Mean Field Theory of Batch
Normalization", ICLR 2019, arXiv:1902.08129): either way, what dense connectivity buys
shows as a ratio nearer 1 and a smaller spread (largest over smallest layer norm).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models import DenseBlock, DenseLayer, DenseNet, Transition
from ..models.layers import norm_nd


class ChainBlock(nn.Sequential):
    """A dense block with its dense connections cut: layer i reads only layer i-1's maps.

    The layers are the block's own kind (bottleneck or plain, growth rate, dropout, a pruned
    bottleneck's width; a pruned layer's input subset has no counterpart in a chain); the
    first reads the block input (``in_channels``, default the block's: a chain's earlier
    blocks are narrower), each later one the ``growth_rate`` maps of the one before, and the
    block's output is the last layer's maps.
    """

    def __init__(self, block: DenseBlock, in_channels: int | None = None) -> None:
        in_channels = block.in_channels if in_channels is None else in_channels
        layers, channels = OrderedDict(), in_channels
        for name, layer in block.items():
            link = DenseLayer(channels, layer.growth_rate, layer.bn_size, layer.drop_rate,
                              spatial_dims=layer.spatial_dims)
            if layer.has_bottleneck and layer.norm2.num_features < link.norm2.num_features:
                # a pruned bottleneck is narrower: the chain's layer is the same layer
                link.prune_(width=torch.arange(layer.norm2.num_features))
            layers[name] = link
            channels = layer.growth_rate
        super().__init__(layers)
        self.in_channels = in_channels
        self.out_channels = channels


def chain_of(model: DenseNet) -> DenseNet:
    """The chain counterpart of ``model``: its stem, each dense block as a :class:`ChainBlock`,
    transitions that keep the chain's width (compressing k maps would make the chain narrower
    than its own layers), and a head on that width; freshly initialized, as a DenseNet is."""
    chain = copy.deepcopy(model).set_fused(False)
    channels = None
    for name, module in list(chain.features.named_children()):
        if isinstance(module, DenseBlock):
            replacement = ChainBlock(module, channels)
            channels = replacement.out_channels
        elif isinstance(module, Transition):
            replacement = Transition(channels, channels, chain.spatial_dims)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and channels is not None:
            replacement = norm_nd(chain.spatial_dims, channels)  # the final norm, after the last block
        else:
            continue
        setattr(chain.features, name, replacement)
    chain.num_features = channels
    if isinstance(chain.classifier, nn.Linear):
        chain.classifier = nn.Linear(channels, chain.classifier.out_features)
    return reinitialize(chain)


def reinitialize(model: DenseNet) -> DenseNet:
    """Weights and statistics as a freshly built DenseNet has them (under the current seed)."""
    for module in model.modules():
        if hasattr(module, "reset_parameters"):  # Linear's default init; BN's running statistics
            module.reset_parameters()
    model._init_weights()  # Kaiming-normal convolutions, BN at (1, 0): DenseNet's own scheme
    return model


def dense_layers(model: nn.Module) -> list[tuple[str, DenseLayer]]:
    """Every dense layer in forward order, by its module name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DenseLayer)]


def _convolutions(layer: DenseLayer) -> list[nn.Module]:
    return [layer.conv1, layer.conv2] if layer.has_bottleneck else [layer.conv1]


def layer_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """One training-mode forward and backward of the cross-entropy on (images, labels); per
    dense layer, the L2 norm of its convolution weights' gradient (both convolutions of a
    bottleneck layer together) and that norm per weight (RMS), which does not grow with the
    layer's fan-in as a dense layer's does."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    rows = []
    for name, layer in dense_layers(model):
        grads = [conv.weight.grad for conv in _convolutions(layer)]
        squared = sum(float(g.double().pow(2).sum()) for g in grads)
        count = sum(g.numel() for g in grads)
        rows.append(dict(layer=name, in_channels=layer.conv1.in_channels, grad_norm=math.sqrt(squared),
                         grad_rms=math.sqrt(squared / count)))
    model.zero_grad(set_to_none=True)
    first, last = rows[0], rows[-1]
    return dict(
        loss=float(loss.detach()),
        layers=rows,
        first_last_ratio=first["grad_norm"] / last["grad_norm"],
        first_last_rms_ratio=first["grad_rms"] / last["grad_rms"],
        max_min_ratio=max(r["grad_norm"] for r in rows) / min(r["grad_norm"] for r in rows),
    )


def gradient_flow(model: DenseNet, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> dict:
    """Per-layer gradient norms at initialization of ``model``'s architecture, dense and as a
    chain, on one batch. ``model`` itself is not touched: both networks are fresh copies,
    initialized from ``seed``."""
    torch.manual_seed(seed)
    dense = reinitialize(copy.deepcopy(model).set_fused(False))
    torch.manual_seed(seed)
    chain = chain_of(model)
    out = dict(batch=list(images.shape), seed=seed)
    for kind, net in (("dense", dense), ("chain", chain)):
        out[kind] = layer_gradients(net, images, labels)
        out[kind]["params"] = sum(p.numel() for p in net.parameters())
    out["dense_over_chain_ratio"] = out["dense"]["first_last_ratio"] / out["chain"]["first_last_ratio"]
    return out


def gradients_png(result: dict, title: str = "") -> bytes:
    """Gradient norm per dense layer against depth, DenseNet and chain, on a log scale."""
    from matplotlib.figure import Figure

    from ..plots import png_bytes

    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.subplots()
    for kind, style in (("dense", "-"), ("chain", "--")):
        run = result[kind]
        norms = [r["grad_norm"] for r in run["layers"]]
        ax.plot(np.arange(1, len(norms) + 1), norms, style,
                label=f"{kind}: first/last = {run['first_last_ratio']:.3g}")
    blocks = [r["layer"].split(".")[-2] for r in result["dense"]["layers"]]
    for i in range(1, len(blocks)):
        if blocks[i] != blocks[i - 1]:
            ax.axvline(i + 0.5, color="grey", lw=0.8, alpha=0.6)  # a block boundary
    ax.set_yscale("log")
    ax.set(xlabel="dense layer (input side left; grey: block boundaries)",
           ylabel="||dL/dW|| of the layer's convolutions", title=title or "gradient flow at initialization")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return png_bytes(fig)
