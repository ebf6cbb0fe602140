"""DenseNet: a stem, dense blocks joined by transitions, and a classifier head.

Module names follow torchvision's DenseNet (``features.conv0``, ``features.denseblock1.
denselayer1.norm1``, ``features.transition1``, ``features.norm5``, ``classifier``) so that
its checkpoints load strictly. The head and feature API follows timm: ``forward_features``,
``forward_head(x, pre_logits=False)``, ``forward_intermediates``, ``reset_classifier
(num_classes, global_pool)``, ``set_grad_checkpointing``, ``pretrained_cfg``, and
``features_only=True`` with ``feature_info``. The reference path (``fused=False``) scripts
with ``torch.jit.script``, and every model traces with ``torch.fx`` (a trace records the
reference path; pass :data:`NOTRACE_MODULES` as leaf modules to keep the fused ones).
"""

import math
from collections import OrderedDict
from typing import List, Sequence, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from .. import checks
from . import fused as _fused, fused_op as _fused_op
from .layers import (DenseBlock, DenseLayer, Features, Transition, _plain_only, check_spatial_dims, conv_nd,
                     max_pool_nd, norm_nd, set_fused)

STEMS = ("imagenet", "cifar", "resnet")
GLOBAL_POOLS = ("avg", "max", "")  # "": no pooling, forward returns the unpooled maps (num_classes 0)

# What pretrained_cfg says a model expects when no weights say otherwise: the ImageNet
# statistics (torchvision's and timm's DenseNets were trained with them), and their mean over
# the channels for other channel counts (the statistics of the same images in gray).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Modules a torch.fx tracer can keep as calls (``leaf_modules``, timm's notrace modules) so
# that the traced graph runs exactly what eager runs, fused blocks included.
NOTRACE_MODULES = (DenseBlock, Transition)


class FeatureInfo(list):
    """``feature_info`` as timm has it: a list of dicts (``num_chs``, ``reduction``,
    ``module``) that also answers ``channels()``, ``reduction()`` and ``module_name()`` for
    all maps or the ``idx`` ones, as FPN-style code asks it."""

    def get(self, key: str, idx: int | Sequence[int] | None = None):
        if idx is None:
            return [info[key] for info in self]
        if isinstance(idx, (tuple, list)):
            return [self[i][key] for i in idx]
        return self[idx][key]

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None):
        pick = (lambda d: dict(d)) if keys is None else (lambda d: {k: d[k] for k in keys})
        if idx is None:
            return [pick(d) for d in self]
        if isinstance(idx, (tuple, list)):
            return [pick(self[i]) for i in idx]
        return pick(self[idx])

    def channels(self, idx: int | Sequence[int] | None = None):
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None):
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None):
        return self.get("module", idx)


def _check_block_config(block_config) -> tuple[int, ...]:
    if isinstance(block_config, (int, str)) or not isinstance(block_config, Sequence) or len(block_config) == 0 \
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in block_config):
        raise checks.ArgumentError(f"{{block_config}} must be a non-empty sequence of positive integers, "
                                   f"got {checks.quote(block_config)}")
    return tuple(block_config)


def _growth_rates(growth_rate, num_blocks: int) -> tuple[int, ...]:
    rates = (growth_rate,) * num_blocks if isinstance(growth_rate, int) else tuple(growth_rate)
    if len(rates) != num_blocks:
        raise checks.ArgumentError(f"{{growth_rate}} must be one integer or one per block ({num_blocks}), "
                                   f"got {checks.quote(growth_rate)}")
    for k in rates:
        checks.positive_int("growth_rate", k)
    return rates


def _check_head(num_classes: int, global_pool: str) -> None:
    checks.non_negative_int("num_classes", num_classes)
    checks.one_of("global_pool", global_pool, GLOBAL_POOLS)
    if num_classes and not global_pool:
        raise checks.ArgumentError(f"{{global_pool}} '' (no pooling) needs {{num_classes}} 0, got {num_classes}: "
                                   "a linear classifier takes pooled features")


def _check_input(x: Tensor, spatial_dims: int, in_chans: int, min_size: int, reduction: int) -> None:
    want = spatial_dims + 2
    if x.dim() != want:
        raise ValueError(f"expected a {want}D input (batch, {in_chans} channels, {spatial_dims} spatial dims), "
                         f"got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if min(x.shape[2:]) < min_size:
        raise ValueError(f"input spatial size {tuple(x.shape[2:])} is too small: this network downsamples "
                         f"{reduction}x and needs every side >= {min_size}")


# A traced graph records the input check as a call that runs on every input, instead of
# failing on its branches over traced shapes.
torch.fx.wrap("_check_input")


class _GlobalMean(torch.autograd.Function):
    """``x.mean(dims)`` whose input gradient has ``x``'s memory layout. The mean's own backward
    returns it contiguous (NCHW); the final ReLU's backward before it then mixes that with its
    channels-last output, a slow path: 2.6 ms of a BC-100 bf16 training step at batch 64 on
    2 CPU cores (AMD EPYC), against 0.1 ms with the layouts alike."""

    @staticmethod
    def forward(ctx, x: Tensor, dims: List[int]) -> Tensor:
        ctx.shape, ctx.dims = x.shape, dims
        return x.mean(dims)

    @staticmethod
    def backward(ctx, grad: Tensor):
        count = math.prod(ctx.shape[d] for d in ctx.dims)
        spread = (grad / count).view(*grad.shape, *[1] * len(ctx.dims)).expand(ctx.shape)
        out = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device,
                          memory_format=_fused._channels_last(len(ctx.shape) - 2))
        return out.copy_(spread), None


def _channels_last_grad(x: Tensor) -> bool:
    """Will ``x``'s gradient flow back into channels-last memory through plain autograd (and
    the fast paths run)? Not under ``torch.func`` transforms (grad, jacrev, vmap: per-sample
    gradients) nor forward-mode AD, which a hand-written backward does not serve: there the
    mean's own formulas run."""
    return (not _plain_only() and not torch.compiler.is_compiling() and torch.is_grad_enabled()
            and not torch._C._are_functorch_transforms_active() and torch.autograd.forward_ad._current_level < 0
            and x.requires_grad and x.dim() in (4, 5)
            and x.is_contiguous(memory_format=_fused._channels_last(x.dim() - 2))
            and not x.is_contiguous())


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
            "resnet" (3x3 conv-BN-ReLU, the stem of the DenseBlock blog post's hybrid).
        spatial_dims: 1, 2 or 3 (signals, images, volumes).
        memory_efficient: torchvision's argument, with its meaning: each dense layer's
            concatenated BN-ReLU-Conv1x1 is recomputed in backward instead of kept (also
            :meth:`set_grad_checkpointing`, timm's name). On the reference path that is
            gradient checkpointing; a fused block, which keeps no concatenation anyway, then
            keeps no bottleneck either and runs each 1x1 convolution a second time.
        features_only: forward returns the multi-scale feature maps (see ``feature_info``).
        out_indices: with ``features_only``, which of ``feature_info``'s maps to return.
        stem_stride: stride of the 3x3 conv of the "cifar" and "resnet" stems (1 or 2); 2
            quarters the cost of small inputs such as 28 px Fashion-MNIST.
        fused: run each dense block as one fused operation (training memory linear in depth,
            faster), each transition with its pooling first (``fused.py``) and, in training,
            the ImageNet stem's BN-ReLU-MaxPool as one op that keeps only its input
            (``fused_stem.py``); the same function as the reference path, torchvision's,
            which ``fused=False`` keeps.
            :func:`densekit.create_model` turns it on.
        global_pool: "avg" (default), "max", or "" for none (with ``num_classes=0``: forward
            then returns the unpooled final maps, as timm's ``global_pool=''`` does).
    """

    __jit_unused_properties__ = ["pretrained_cfg", "default_cfg", "min_input_size", "grad_checkpointing"]

    def __init__(self, growth_rate: int | Sequence[int] = 32,
                 block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int | None = None, bn_size: int | None = 4,
                 compression: float = 0.5, drop_rate: float = 0.0, num_classes: int = 1000,
                 in_chans: int = 3, stem: str = "imagenet", spatial_dims: int = 2,
                 memory_efficient: bool = False, features_only: bool = False,
                 out_indices: Sequence[int] | None = None, stem_stride: int = 1,
                 fused: bool = False, global_pool: str = "avg") -> None:
        super().__init__()
        # the arguments that build this model again (a run directory's model.json keeps them)
        self.init_kwargs = dict(
            growth_rate=list(growth_rate) if isinstance(growth_rate, Sequence) else growth_rate,
            block_config=list(block_config), num_init_features=num_init_features, bn_size=bn_size,
            compression=compression, drop_rate=drop_rate, num_classes=num_classes, in_chans=in_chans, stem=stem,
            spatial_dims=spatial_dims, memory_efficient=memory_efficient, features_only=features_only,
            out_indices=None if out_indices is None else list(out_indices), stem_stride=stem_stride, fused=fused,
            global_pool=global_pool)
        block_config = _check_block_config(block_config)
        rates = _growth_rates(growth_rate, len(block_config))
        checks.fraction("compression", compression, high_included=True, low_included=False)
        checks.one_of("stem", stem, STEMS)
        if stem_stride not in (1, 2) or (stem == "imagenet" and stem_stride != 1):
            raise checks.ArgumentError(f"{{stem_stride}} must be 1 or 2 (and 1 for the imagenet stem), "
                                       f"got {checks.quote(stem_stride)}")
        _check_head(num_classes, global_pool)
        checks.positive_int("in_chans", in_chans)
        checks.fraction("drop_rate", drop_rate)
        check_spatial_dims(spatial_dims)
        if num_init_features is None:
            num_init_features = 2 * rates[0]
        checks.positive_int("num_init_features", num_init_features)

        self.spatial_dims = spatial_dims
        self.in_chans = in_chans
        self.stem = stem
        self.block_config = block_config
        self.growth_rate = rates[0] if len(set(rates)) == 1 else rates
        self.drop_rate = drop_rate
        self.global_pool = global_pool
        self._pool_dims: List[int] = list(range(2, 2 + spatial_dims))

        layers, info, c = self._stem(stem, in_chans, num_init_features, stem_stride)
        reduction = info[-1]["reduction"] * (2 if stem == "imagenet" else 1)
        for i, (num_layers, k) in enumerate(zip(block_config, rates)):
            block = DenseBlock(c, k, num_layers, bn_size, drop_rate, memory_efficient, spatial_dims, fused)
            layers.append((f"denseblock{i + 1}", block))
            c = block.out_channels
            if i != len(block_config) - 1:
                info.append(dict(num_chs=c, reduction=reduction, module=f"features.denseblock{i + 1}"))
                transition = Transition(c, max(1, int(c * compression)), spatial_dims, fused)
                layers.append((f"transition{i + 1}", transition))
                c = transition.out_channels
                reduction *= 2
        layers.append((f"norm{len(block_config) + 1}", norm_nd(spatial_dims, c)))
        info.append(dict(num_chs=c, reduction=reduction, module=f"features.norm{len(block_config) + 1}"))
        self.features = Features(OrderedDict(layers), fused)
        self.num_features = self.head_hidden_size = c
        self._all_feature_info = FeatureInfo(info)
        self._feature_names = [d["module"].split(".", 1)[1] for d in info]
        self.features_only = features_only
        self.out_indices = tuple(range(len(info))) if out_indices is None else tuple(out_indices)
        for i in self.out_indices:
            if not -len(info) <= i < len(info):
                raise checks.ArgumentError(f"{{out_indices}} must index feature_info (0..{len(info) - 1}), "
                                           f"got {checks.quote(out_indices)}")
        self.feature_info = FeatureInfo(info[i] for i in self.out_indices) if features_only else \
            self._all_feature_info
        self.num_classes = num_classes
        self.classifier = nn.Linear(c, num_classes) if num_classes and not features_only else nn.Identity()
        self._min_size = self._smallest_input()
        self._reduction = reduction
        self._init_weights()

    def _stem(self, stem: str, in_chans: int, c: int, stride: int) -> tuple[list, list, int]:
        """The stem's modules, its feature_info entry and its output channels."""
        dims = self.spatial_dims
        if stem == "imagenet":
            layers = [("conv0", conv_nd(dims, in_chans, c, 7, stride=2, padding=3)),
                      ("norm0", norm_nd(dims, c)), ("relu0", nn.ReLU(inplace=True)),
                      ("pool0", max_pool_nd(dims, 3, 2, 1))]
            return layers, [dict(num_chs=c, reduction=2, module="features.relu0")], c
        if stem == "resnet":
            layers = [("conv0", conv_nd(dims, in_chans, c, 3, stride=stride, padding=1)),
                      ("norm0", norm_nd(dims, c)), ("relu0", nn.ReLU(inplace=True))]
            return layers, [dict(num_chs=c, reduction=stride, module="features.relu0")], c
        # The paper's CIFAR networks go straight from a 3x3 conv into the first block, whose
        # layers begin with their own BN-ReLU.
        layers = [("conv0", conv_nd(dims, in_chans, c, 3, stride=stride, padding=1))]
        return layers, [dict(num_chs=c, reduction=stride, module="features.conv0")], c

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    # -- sizes ------------------------------------------------------------------------

    def _windows(self):
        """(kernel, stride, padding) of every downsampling step in order; a transition's
        pooling is (2, 2, 0). The dense blocks keep the size (3x3 convolutions, padding 1)."""
        for module in self.features:
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
                yield tuple(v[0] if isinstance(v, tuple) else v
                            for v in (module.kernel_size, module.stride, module.padding))
            elif isinstance(module, Transition):
                yield 2, 2, 0

    def output_size(self, size: int) -> int:
        """Spatial size of the final maps for an input side of ``size``; 0 if it vanishes."""
        for k, s, p in self._windows():
            size = (size + 2 * p - k) // s + 1
            if size < 1:
                return 0
        return size

    def _smallest_input(self) -> int:
        # Each step's output, floor((n + 2p - k) / s) + 1, grows with n, so the smallest n
        # that leaves `need` after it is (need - 1) * s + k - 2p: undo the steps from the end.
        need = 1
        for k, s, p in reversed(list(self._windows())):
            need = max(1, (need - 1) * s + k - 2 * p)
        return need

    @property
    def min_input_size(self) -> int:
        """The smallest side length this network can take (the downsampling must leave >= 1)."""
        return self._min_size

    # -- configuration, as timm has it ----------------------------------------------------

    def default_pretrained_cfg(self, spatial: Sequence[int] | None = None) -> dict:
        """timm's ``pretrained_cfg`` for these (untrained) weights at input sides ``spatial``
        (default: 224 for the ImageNet stem, 32 for the others)."""
        if spatial is None:
            spatial = (224 if self.stem == "imagenet" else 32,) * self.spatial_dims
        c = self.in_chans
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else \
            ((round(sum(IMAGENET_MEAN) / 3, 3),) * c, (round(sum(IMAGENET_STD) / 3, 3),) * c)
        return dict(input_size=(c, *spatial), min_input_size=(c, *(self._min_size,) * self.spatial_dims),
                    pool_size=tuple(self.output_size(s) for s in spatial), crop_pct=0.875,
                    interpolation="bilinear", mean=mean, std=std, num_classes=self.num_classes,
                    first_conv="features.conv0", classifier="classifier")

    @property
    def pretrained_cfg(self) -> dict:
        """What the weights expect (input size, mean, std, ...), as timm's ``pretrained_cfg``;
        a model loaded from a run directory adds its classes and dataset."""
        cfg = self.__dict__.get("_pretrained_cfg")
        return self.default_pretrained_cfg() if cfg is None else cfg

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: dict) -> None:
        self.__dict__["_pretrained_cfg"] = dict(cfg)

    @property
    def default_cfg(self) -> dict:
        """timm's older name of :attr:`pretrained_cfg`."""
        return self.pretrained_cfg

    # -- forward --------------------------------------------------------------------

    def forward_features(self, x: Tensor) -> Tensor:
        """The final feature map, after the last BN-ReLU."""
        if not torch.jit.is_scripting():
            _check_input(x, self.spatial_dims, self.in_chans, self._min_size, self._reduction)
        return F.relu(self.features(x), inplace=True)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global pooling (``global_pool``) and the classifier; ``pre_logits``: pooling only."""
        if self.global_pool == "avg":
            x = self._global_mean(x) if not torch.jit.is_scripting() else x.mean(self._pool_dims)
        elif self.global_pool == "max":
            x = x.amax(self._pool_dims)
        return x if pre_logits else self.classifier(x)

    @torch.jit.unused
    def _global_mean(self, x: Tensor) -> Tensor:
        if _channels_last_grad(x):
            return _GlobalMean.apply(x, self._pool_dims)
        return x.mean(self._pool_dims)

    def _feature_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        n = len(self._all_feature_info)
        if indices is None:
            return list(range(n))
        if isinstance(indices, int):
            if not 0 < indices <= n:
                raise ValueError(f"indices: asked for the last {indices} feature maps of {n}")
            return list(range(n - indices, n))
        picked = [i % n if -n <= i < n else None for i in indices]
        if None in picked:
            raise ValueError(f"indices must index feature_info (0..{n - 1}), got {list(indices)}")
        return sorted(set(picked))

    @torch.jit.unused
    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's ``forward_intermediates``: the feature maps of ``feature_info`` (all, the
        last ``indices`` if an int, or those listed) and, unless ``intermediates_only``,
        the final features first: ``(forward_features(x), [maps])``. ``norm`` is accepted
        for timm's signature: the last map already is the final BN-ReLU's output, the others
        feed a transition's own BN. ``stop_early`` stops after the last map asked for."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt: only 'NCHW' (channels first), got {output_fmt!r}")
        wanted = self._feature_indices(indices)
        take = {self._feature_names[i] for i in wanted}
        last = self._feature_names[wanted[-1]] if wanted else None
        _check_input(x, self.spatial_dims, self.in_chans, self._min_size, self._reduction)
        out = []
        final = len(self.features) - 1
        for i, (name, module) in enumerate(self.features.named_children()):
            x = module(x)
            if i == final:
                x = F.relu(x, inplace=True)
            if name in take:
                out.append(x)
            if name == last and (stop_early or intermediates_only) and i != final:
                break
        if intermediates_only:
            return out
        return x, out

    @torch.jit.unused
    def _forward_feature_list(self, x: Tensor) -> List[Tensor]:
        return self.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)

    def forward(self, x: Tensor) -> Union[Tensor, List[Tensor]]:
        return self._forward(x)

    def _forward(self, x: Tensor) -> Union[Tensor, List[Tensor]]:
        if self.features_only:
            return self._forward_feature_list(x)
        if not torch.jit.is_scripting():
            if self._relu_mean_operator():
                return self._forward_relu_mean(x)
        return self.forward_head(self.forward_features(x))

    @torch.jit.unused
    def _relu_mean_operator(self) -> bool:
        """Under torch.compile, while a gradient may flow: do the final ReLU and the global mean
        run as one custom operator (``fused_op.relu_mean``), where the compiler's code for them
        was 10-20x slower than torch's kernels on the CPU?"""
        own = type(self).forward_features is DenseNet.forward_features and \
            type(self).forward_head is DenseNet.forward_head  # a subclass's own head runs as it is
        return (own and torch.compiler.is_compiling() and not _plain_only() and torch.is_grad_enabled()
                and not torch._C._are_functorch_transforms_active()
                and self.global_pool == "avg" and self.features.fused
                and next(self.parameters()).device.type == "cpu")

    @torch.jit.unused
    def _forward_relu_mean(self, x: Tensor) -> Tensor:
        _check_input(x, self.spatial_dims, self.in_chans, self._min_size, self._reduction)
        maps = self.features(x)
        return self.classifier(_fused_op.relu_mean(maps, self._pool_dims))

    # -- changing the model -------------------------------------------------------------

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier for ``num_classes`` (0: identity); ``global_pool`` as in the
        constructor, unchanged if None (timm's ``reset_classifier(0, '')`` leaves the model
        returning its unpooled final maps)."""
        pool = self.global_pool if global_pool is None else global_pool
        _check_head(num_classes, pool)
        self.global_pool = pool
        self.num_classes = self.init_kwargs["num_classes"] = num_classes
        self.init_kwargs["global_pool"] = pool
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        if num_classes:
            nn.init.zeros_(self.classifier.bias)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def block_outputs_pruned_(self, block: str, head: torch.Tensor | None = None) -> None:
        """Keep ``feature_info`` and the head in step when pruning narrows what the dense block
        ``block`` (a child of ``features``) returns (``layers.prune_block_outputs_`` calls it);
        ``head``: for the last block, the final norm's kept channels, which the classifier's
        inputs follow."""
        channels = self.features._modules[block].output_channels
        final = f"features.{list(self.features._modules)[-1]}"
        for info in self._all_feature_info:
            if info["module"] == f"features.{block}" or (head is not None and info["module"] == final):
                info["num_chs"] = channels
        if head is None:
            return
        if isinstance(self.classifier, nn.Linear):
            w = self.classifier.weight
            self.classifier.weight = nn.Parameter(w.detach().index_select(1, head.to(w.device)).clone(),
                                                  requires_grad=w.requires_grad)
            self.classifier.in_features = head.numel()
        self.num_features = self.head_hidden_size = channels

    def set_grad_checkpointing(self, enable: bool = True) -> "DenseNet":
        """timm's switch for gradient checkpointing: every dense layer's ``memory_efficient``."""
        for m in self.modules():
            if isinstance(m, DenseBlock):
                m.set_grad_checkpointing(enable)
        return self

    @property
    def grad_checkpointing(self) -> bool:
        layers = [m for m in self.modules() if isinstance(m, DenseLayer)]
        return bool(layers) and all(m.memory_efficient for m in layers)

    def set_fused(self, enabled: bool = True) -> "DenseNet":
        """Switch every dense block, transition and the stem between the fused path and the reference
        path (:func:`densekit.models.set_fused` on this model)."""
        set_fused(self, enabled)
        return self
