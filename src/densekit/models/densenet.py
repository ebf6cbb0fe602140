"""DenseNet: a stem, dense blocks joined by transitions, and a classifier head.

Module names follow torchvision's DenseNet (``features.conv0``, ``features.denseblock1.
denselayer1.norm1``, ``features.transition1``, ``features.norm5``, ``classifier``) so that
its checkpoints load strictly. The head API follows timm: ``forward_features``,
``forward_head(x, pre_logits=False)``, ``reset_classifier(num_classes)``, and
``features_only=True`` with ``feature_info``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (DenseBlock, Transition, _check_drop_rate, _check_positive_int, check_spatial_dims,
                     conv_nd, max_pool_nd, norm_nd)

STEMS = ("imagenet", "cifar", "resnet")


def _check_block_config(block_config) -> tuple[int, ...]:
    if isinstance(block_config, int) or not isinstance(block_config, Sequence) or len(block_config) == 0:
        raise ValueError(f"block_config must be a non-empty sequence of positive integers, got {block_config!r}")
    for n in block_config:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"block_config must be a non-empty sequence of positive integers, got {block_config!r}")
    return tuple(block_config)


def _check_num_classes(num_classes) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")


def _growth_rates(growth_rate, num_blocks: int) -> tuple[int, ...]:
    rates = (growth_rate,) * num_blocks if isinstance(growth_rate, int) else tuple(growth_rate)
    if len(rates) != num_blocks:
        raise ValueError(f"growth_rate must be one integer or one per block ({num_blocks}), got {growth_rate!r}")
    for k in rates:
        _check_positive_int("growth_rate", k)
    return rates


class DenseNet(nn.Module):
    """A densely connected convolutional network (Huang et al., CVPR 2017).

    Args:
        growth_rate: k, the maps each dense layer adds; one integer, or one per block.
        block_config: the number of dense layers in each block.
        num_init_features: channels out of the stem; default ``2 * growth_rate`` of block 1.
        bn_size: bottleneck width factor (the paper's "B": 1x1 conv to ``bn_size * k``);
            None or 0 for the plain BN-ReLU-Conv3x3 layer.
        compression: theta, the fraction of channels a transition keeps (the paper's "C").
        drop_rate: dropout after each dense layer.
        num_classes: classifier outputs; 0 leaves the head as identity.
        in_chans: input channels.
        stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool), "cifar" (one 3x3 conv) or
            "resnet" (3x3 conv-BN-ReLU, the stem of the seed's hybrid).
        spatial_dims: 1, 2 or 3 (signals, images, volumes).
        memory_efficient: run each dense block as one fused, lean operation and each
            transition with its pooling first (``fused.py``); False keeps torchvision's
            concatenating reference path.
        features_only: forward returns the multi-scale feature maps (see ``feature_info``).
        out_indices: with ``features_only``, which of ``feature_info``'s maps to return.
        stem_stride: stride of the 3x3 conv of the "cifar" and "resnet" stems (1 or 2); 2
            quarters the cost of small inputs such as 28 px Fashion-MNIST.
    """

    def __init__(self, growth_rate: int | Sequence[int] = 32,
                 block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int | None = None, bn_size: int | None = 4,
                 compression: float = 0.5, drop_rate: float = 0.0, num_classes: int = 1000,
                 in_chans: int = 3, stem: str = "imagenet", spatial_dims: int = 2,
                 memory_efficient: bool = False, features_only: bool = False,
                 out_indices: Sequence[int] | None = None, stem_stride: int = 1) -> None:
        super().__init__()
        block_config = _check_block_config(block_config)
        rates = _growth_rates(growth_rate, len(block_config))
        if not (isinstance(compression, (int, float)) and 0 < compression <= 1):
            raise ValueError(f"compression must be in (0, 1], got {compression!r}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
        if stem_stride not in (1, 2) or (stem == "imagenet" and stem_stride != 1):
            raise ValueError(f"stem_stride must be 1 or 2 (and 1 for the imagenet stem), got {stem_stride!r}")
        _check_num_classes(num_classes)
        _check_positive_int("in_chans", in_chans)
        _check_drop_rate(drop_rate)
        check_spatial_dims(spatial_dims)
        if num_init_features is None:
            num_init_features = 2 * rates[0]
        _check_positive_int("num_init_features", num_init_features)

        self.spatial_dims = spatial_dims
        self.in_chans = in_chans
        self.stem = stem
        self.block_config = block_config
        self.growth_rate = rates[0] if len(set(rates)) == 1 else rates
        self.drop_rate = drop_rate

        c = num_init_features
        if stem == "imagenet":
            layers = [("conv0", conv_nd(spatial_dims, in_chans, c, 7, stride=2, padding=3)),
                      ("norm0", norm_nd(spatial_dims, c)), ("relu0", nn.ReLU(inplace=True)),
                      ("pool0", max_pool_nd(spatial_dims, 3, 2, 1))]
            info = [dict(num_chs=c, reduction=2, module="features.relu0")]
            reduction = 4
        elif stem == "resnet":
            layers = [("conv0", conv_nd(spatial_dims, in_chans, c, 3, stride=stem_stride, padding=1)),
                      ("norm0", norm_nd(spatial_dims, c)), ("relu0", nn.ReLU(inplace=True))]
            info = [dict(num_chs=c, reduction=stem_stride, module="features.relu0")]
            reduction = stem_stride
        else:
            # The paper's CIFAR networks go straight from a 3x3 conv into the first block,
            # whose layers begin with their own BN-ReLU.
            layers = [("conv0", conv_nd(spatial_dims, in_chans, c, 3, stride=stem_stride, padding=1))]
            info = [dict(num_chs=c, reduction=stem_stride, module="features.conv0")]
            reduction = stem_stride

        for i, (num_layers, k) in enumerate(zip(block_config, rates)):
            block = DenseBlock(c, k, num_layers, bn_size, drop_rate, memory_efficient, spatial_dims)
            layers.append((f"denseblock{i + 1}", block))
            c = block.out_channels
            if i != len(block_config) - 1:
                info.append(dict(num_chs=c, reduction=reduction, module=f"features.denseblock{i + 1}"))
                transition = Transition(c, max(1, int(c * compression)), spatial_dims, memory_efficient)
                layers.append((f"transition{i + 1}", transition))
                c = transition.out_channels
                reduction *= 2
        layers.append((f"norm{len(block_config) + 1}", norm_nd(spatial_dims, c)))
        info.append(dict(num_chs=c, reduction=reduction, module=f"features.norm{len(block_config) + 1}"))
        self.features = nn.Sequential(OrderedDict(layers))
        self.num_features = c
        self.feature_info = info
        self.features_only = features_only
        self._feature_names = [d["module"].split(".", 1)[1] for d in info]
        self.out_indices = tuple(range(len(info))) if out_indices is None else tuple(out_indices)
        for i in self.out_indices:
            if not -len(info) <= i < len(info):
                raise ValueError(f"out_indices must index feature_info (0..{len(info) - 1}), got {out_indices!r}")
        if features_only:
            self.feature_info = [info[i] for i in self.out_indices]
        self.num_classes = num_classes
        self.classifier = nn.Linear(c, num_classes) if num_classes and not features_only else nn.Identity()
        self._min_size = self._smallest_input()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    # -- input checks ---------------------------------------------------------------

    def _output_size(self, size: int) -> int:
        """Spatial size after the whole network for an input side of ``size``, 0 if it vanishes."""
        for module in self.features:
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
                k, s, p = (module.kernel_size, module.stride, module.padding)
                k, s, p = (v[0] if isinstance(v, tuple) else v for v in (k, s, p))
                size = (size + 2 * p - k) // s + 1
            elif isinstance(module, Transition):
                size //= 2
            if size < 1:
                return 0
        return size

    def _smallest_input(self) -> int:
        size = 1
        while self._output_size(size) < 1:
            size += 1
        return size

    @property
    def min_input_size(self) -> int:
        """The smallest side length this network can take (the downsampling must leave >= 1)."""
        return self._min_size

    def _check_input(self, x: torch.Tensor) -> None:
        want = self.spatial_dims + 2
        if x.dim() != want:
            raise ValueError(f"expected a {want}D input (batch, {self.in_chans} channels, "
                             f"{self.spatial_dims} spatial dims), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        if min(x.shape[2:]) < self._min_size:
            raise ValueError(f"input spatial size {tuple(x.shape[2:])} is too small: this network "
                             f"downsamples {self.feature_info[-1]['reduction']}x and needs every side >= {self._min_size}")

    # -- forward --------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map, after the last BN-ReLU."""
        self._check_input(x)
        return F.relu(self.features(x), inplace=True)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if x.dim() > 2:
            x = x.mean(dim=tuple(range(2, x.dim())))
        return x if pre_logits else self.classifier(x)

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every multi-scale map the network has (all of them, whatever ``out_indices`` says)."""
        self._check_input(x)
        out = []
        last = len(self.features) - 1
        for i, (name, module) in enumerate(self.features.named_children()):
            x = module(x)
            if i == last:
                x = F.relu(x, inplace=True)
            if name in self._feature_names:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor):
        if self.features_only:
            feats = self.forward_intermediates(x)
            return [feats[i] for i in self.out_indices]
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` (0: identity)."""
        _check_num_classes(num_classes)
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        if num_classes:
            nn.init.zeros_(self.classifier.bias)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def set_memory_efficient(self, enabled: bool = True) -> "DenseNet":
        """Switch every dense block and transition between the fast lean path and the reference path."""
        for m in self.modules():
            if isinstance(m, (DenseBlock, Transition)):
                m.memory_efficient = enabled
        return self
