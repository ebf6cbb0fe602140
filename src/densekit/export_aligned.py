"""A 2D DenseNet with its channel counts padded to a multiple (16), for the ONNX export.

onnxruntime's CPU provider runs convolutions in a blocked layout (NCHWc: 8 channels to a
block with AVX2, 16 with AVX-512) and keeps a tensor in that layout from one operator to the
next only where every channel count is a multiple of the block: a concatenation whose inputs
are not, a batch norm after it, and a convolution reading it fall back to the plain layout,
with a reorder before and after each convolution. A DenseNet-BC with growth rate 12 is such a
model everywhere (12 new maps per layer, block inputs of 24 + 12i channels), and a pruned
one reads channel subsets, which no blocked operator gathers.

So the export traces an equivalent copy in which every map a layer adds, every bottleneck,
and every stem and transition output is padded to a multiple of 16 channels (a multiple of
8 too) with zero filters, and every reader (a layer's BN-ReLU-convolution, a transition, the
final norm, the classifier) takes its padded input whole, with zero weights (and batch-norm
scale and shift) on the channels it does not read. The outputs are the same function; a pad
channel is exactly zero from the convolution that writes it onward. A pruned layer then
reads whole maps rather than its subset: its 1x1 convolution costs more multiply-accumulates,
but the graph has no gather, no reorder and no batch norm outside the blocked convolutions,
which turn a batch norm into a depthwise convolution with the ReLU fused.

Transitions pool before their convolution, as the fused path does (both linear, on
different axes: the same function, a quarter of the convolution's work).

This is hand-written because no exporter or runtime pass does it: onnxruntime pads a
convolution's *outputs* to its block internally, but not the channel counts that its
concatenations and readers see. Measured gains are in docs/design.md, "Export".
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import DenseNet
from .models.layers import DenseBlock, DenseLayer, Transition

ALIGN = 16  # onnxruntime's block is 16 channels with AVX-512 and 8 with AVX2: 16 serves both


def _up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _bn(bn: nn.BatchNorm2d, positions: Sequence[int], width: int) -> nn.BatchNorm2d:
    """``bn`` on ``width`` channels: its own at ``positions``, zero out elsewhere (scale and shift 0)."""
    out = nn.BatchNorm2d(width, eps=bn.eps).eval()
    idx = torch.as_tensor(list(positions), dtype=torch.long)
    with torch.no_grad():
        out.weight.zero_()
        out.bias.zero_()
        out.weight[idx] = bn.weight.detach().float()
        out.bias[idx] = bn.bias.detach().float()
        out.running_mean[idx] = bn.running_mean.float()
        out.running_var[idx] = bn.running_var.float()
    return out


def _conv(conv: nn.Conv2d, positions: Sequence[int], width: int, out_width: int) -> nn.Conv2d:
    """``conv`` reading ``width`` channels (its inputs at ``positions``, zero weights elsewhere)
    and writing ``out_width`` (its outputs first, then zero filters)."""
    out = nn.Conv2d(width, out_width, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, bias=conv.bias is not None).eval()
    idx = torch.as_tensor(list(positions), dtype=torch.long)
    with torch.no_grad():
        out.weight.zero_()
        out.weight[:conv.out_channels, idx] = conv.weight.detach().float()
        if conv.bias is not None:
            out.bias.zero_()
            out.bias[:conv.out_channels] = conv.bias.detach().float()
    return out


class _Layout:
    """Where a dense block's channels lie once padded: map p (the block input, then each
    layer's new maps) holds logical channels ``ids[p]`` at the start of ``width[p]`` channels."""

    def __init__(self) -> None:
        self.ids: List[List[int]] = []
        self.width: List[int] = []
        self.total = 0

    def add(self, channels: int, multiple: int) -> None:
        self.ids.append(list(range(self.total, self.total + channels)))
        self.width.append(_up(channels, multiple))
        self.total += channels

    def reader(self, index: Sequence[int] | None) -> tuple[List[int], List[int], int]:
        """The maps a reader of ``index`` (None: every channel) concatenates, the position of
        each channel it reads in that concatenation, and the concatenation's width."""
        wanted = list(range(self.total)) if index is None else [int(i) for i in index]
        need = set(wanted)
        maps = [p for p, ids in enumerate(self.ids) if need.intersection(ids)]
        where, offset = {}, 0
        for p in maps:
            for j, c in enumerate(self.ids[p]):
                where[c] = offset + j
            offset += self.width[p]
        return maps, [where[c] for c in wanted], offset


def _cat(feats: List[Tensor], maps: List[int]) -> Tensor:
    return feats[maps[0]] if len(maps) == 1 else torch.cat([feats[p] for p in maps], 1)


class _Layer(nn.Module):
    def __init__(self, layer: DenseLayer, layout: _Layout, multiple: int) -> None:
        super().__init__()
        index = None if layer.input_index is None else layer.input_index.tolist()
        self.maps, positions, width = layout.reader(index)
        first = layer.conv1
        mid = _up(first.out_channels, multiple)
        self.norm1 = _bn(layer.norm1, positions, width)
        self.conv1 = _conv(first, positions, width, mid)
        self.has_bottleneck = layer.has_bottleneck
        if layer.has_bottleneck:
            keep = range(first.out_channels)
            self.norm2 = _bn(layer.norm2, keep, mid)
            self.conv2 = _conv(layer.conv2, keep, mid, _up(layer.conv2.out_channels, multiple))
        self.out_channels = (layer.conv2 if layer.has_bottleneck else first).out_channels

    def forward(self, feats: List[Tensor]) -> Tensor:
        x = self.conv1(F.relu(self.norm1(_cat(feats, self.maps))))
        return self.conv2(F.relu(self.norm2(x))) if self.has_bottleneck else x


class _Block(nn.Module):
    def __init__(self, block: DenseBlock, in_channels: int, multiple: int) -> None:
        super().__init__()
        self.layout = _Layout()
        self.layout.add(in_channels, multiple)
        self.layers = nn.ModuleList()
        for layer in block.values():
            self.layers.append(_Layer(layer, self.layout, multiple))
            self.layout.add(self.layers[-1].out_channels, multiple)
        self.output_index = None if block.output_index is None else block.output_index.tolist()

    def forward(self, x: Tensor) -> List[Tensor]:
        feats = [x]
        for layer in self.layers:
            feats.append(layer(feats))
        return feats


class _Transition(nn.Module):
    def __init__(self, transition: Transition, block: _Block, multiple: int) -> None:
        super().__init__()
        self.maps, positions, width = block.layout.reader(block.output_index)
        self.norm = _bn(transition.norm, positions, width)
        self.pool = transition.pool
        self.conv = _conv(transition.conv, positions, width, _up(transition.conv.out_channels, multiple))

    def forward(self, feats: List[Tensor]) -> Tensor:
        return self.conv(self.pool(F.relu(self.norm(_cat(feats, self.maps)))))


class AlignedDenseNet(nn.Module):
    """The export copy (see the module's docstring); build it with :func:`aligned_copy`."""

    def __init__(self, model: DenseNet, multiple: int) -> None:
        super().__init__()
        stem, stages = [], nn.ModuleList()
        names = list(model.features._modules)
        c = None
        for name in names:
            module = model.features._modules[name]
            if isinstance(module, DenseBlock):
                stages.append(_Block(module, c, multiple))
            elif isinstance(module, Transition):
                stages.append(_Transition(module, stages[-1], multiple))
                c = module.conv.out_channels
            elif name == "conv0":
                c = module.out_channels
                stem.append(_conv(module, range(module.in_channels), module.in_channels, _up(c, multiple)))
            elif name == "norm0":
                stem.append(_bn(module, range(c), _up(c, multiple)))
            elif name in ("relu0", "pool0"):
                stem.append(module)
        final = model.features._modules[names[-1]]
        last = stages[-1]
        self.maps, positions, width = last.layout.reader(last.output_index)
        self.stem = nn.Sequential(*stem)
        self.stages = stages
        self.norm = _bn(final, positions, width)
        self.global_pool = model.global_pool
        classifier = model.classifier
        if type(classifier) is nn.Linear and model.global_pool in ("avg", "max"):
            head = nn.Linear(width, classifier.out_features, bias=classifier.bias is not None).eval()
            with torch.no_grad():
                head.weight.zero_()
                head.weight[:, torch.as_tensor(positions)] = classifier.weight.detach().float()
                if classifier.bias is not None:
                    head.bias.copy_(classifier.bias.detach().float())
            self.classifier = head
            self.register_buffer("select", None)
        else:  # pooled or unpooled features out: take the logical channels back
            self.classifier = classifier
            self.register_buffer("select", torch.as_tensor(positions, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        feats: List[Tensor] = []
        for stage in self.stages:
            if isinstance(stage, _Block):
                feats = stage(x)
            else:
                x = stage(feats)
        x = F.relu(self.norm(_cat(feats, self.maps)))
        # global pooling that keeps the blocked layout (ONNX GlobalAveragePool, GlobalMaxPool)
        if self.global_pool == "avg":
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        elif self.global_pool == "max":
            x = F.adaptive_max_pool2d(x, 1).flatten(1)
        if self.select is not None:
            x = x.index_select(1, self.select)
        return self.classifier(x)


def _widths(model: DenseNet) -> List[int]:
    """Every channel count a blocked layout must see a multiple of its block in."""
    out = []
    for module in model.features.modules():
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
            out.append(module.num_features if isinstance(module, nn.BatchNorm2d) else module.out_channels)
    return out


def _pruned(model: DenseNet) -> bool:
    return any(getattr(m, "input_index", None) is not None or getattr(m, "output_index", None) is not None
               for m in model.features.modules())


# The module types the copy rebuilds; any other (a subclass, an activation swapped in, a layer
# of the user's) means a function the copy would not compute: the model is exported as it is.
_STOCK = (DenseBlock, DenseLayer, Transition, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d)


def _stock(module: nn.Module) -> bool:
    if type(module) not in _STOCK:
        return False
    if type(module) is nn.Conv2d:
        return module.groups == 1 and module.padding_mode == "zeros"
    if type(module) is nn.BatchNorm2d:
        return module.affine and module.running_mean is not None and module.running_var is not None
    return True


def _supported(model: nn.Module) -> bool:
    """A 2D DenseNet in eval mode built of the stock modules: a stem (conv0, then norm0, relu0,
    pool0 if any, in that order), dense blocks and transitions in turn, a dense block last, a
    final batch norm, and a linear or no classifier; every transition's pooling commutes with
    its convolution."""
    if type(model) is not DenseNet or model.spatial_dims != 2 or model.features_only or model.training:
        return False
    if type(model.classifier) not in (nn.Linear, nn.Identity):
        return False
    features = model.features._modules
    names = list(features)
    stem = [n for n in names if n in ("conv0", "norm0", "relu0", "pool0")]
    kinds = {"conv0": nn.Conv2d, "norm0": nn.BatchNorm2d, "relu0": nn.ReLU, "pool0": nn.MaxPool2d}
    if not stem or names[:len(stem)] != [n for n in kinds if n in stem] or stem[0] != "conv0" \
            or any(type(features[n]) is not kinds[n] for n in stem):
        return False
    body = [features[n] for n in names[len(stem):]]
    if len(body) < 2 or len(body) % 2 or type(body[-1]) is not nn.BatchNorm2d:
        return False
    for i, module in enumerate(body[:-1]):
        if type(module) is not (DenseBlock if i % 2 == 0 else Transition):
            return False
        if type(module) is Transition and not module.commutes:
            return False
    return all(_stock(m) for n in names for m in features[n].modules())


def aligned_copy(model: nn.Module, multiple: int = ALIGN) -> nn.Module | None:
    """A float32 CPU eval-mode copy of ``model`` (a CPU float32 model in eval mode, as the
    export makes) with every channel count padded to ``multiple``; None where the model is
    already aligned and unpruned (nothing to gain), is in training mode, or is not a 2D
    DenseNet of the stock modules (exported as it is)."""
    if not multiple or multiple < 2 or not _supported(model):
        return None
    if all(w % multiple == 0 for w in _widths(model)) and not _pruned(model):
        return None
    with torch.no_grad():
        return AlignedDenseNet(model, multiple).eval()
