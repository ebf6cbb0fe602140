"""An inference-only copy of a model whose dense blocks run from constants computed once.

In eval mode a fused dense block recomputes, at every call, what depends only on its
weights: each layer's batch-norm scale and shift, the second batch norm folded into the 1x1
convolution, the checked channel indices; and oneDNN reorders every convolution's weight into
its blocked layout before each call. Keeping those between calls in the block itself is not
safe (an edit through ``.data`` or buffers passed to ``torch.func.functional_call`` change
them unseen), so it is an explicit step, like ``torch.jit.optimize_for_inference``:
:func:`optimize_for_inference` returns a copy whose blocks hold their constants, with the
convolution weights prepacked by oneDNN per input shape on the CPU and the ReLU after the
folded 1x1 convolution done by the convolution itself. On the ``make run`` model on 2 CPU
cores (AMD EPYC) this takes a forward at batch 64 from about 17 to 15 ms, 40% pruned from 12.6
to 10.7 ms, and at batch 1 from 3.2 to 2.0 ms (docs/performance.md#pruning). The copy does not
follow later changes to the original; ``load_state_dict`` on the copy makes its constants anew.
``densekit eval`` and ``predict`` run it on the CPU.

Where the weights are prepacked, two of a layer's convolutions run as oneDNN matrix products
instead, which cost about 10 us less per call than its convolution primitive on the same
data (on a Zen 5 EPYC, 2 cores, float32 and bf16; ad hoc): a 1x1 convolution, which on the
block's channels-last rows is one, and a convolution over a grid of at most
``_UNROLL_POSITIONS`` positions (the ``make run`` model's last block, at 3x3), as one product
of each image's positions with the convolution unrolled over them (each tap's weights placed
where it reaches; a matrix made once per input shape). At 3x3 positions oneDNN's 3x3 convolution costs 25-45 us
whatever its channels; the unrolled product, 1.65x its multiplications, 10-20 us. Together a
forward of the ``make run`` model at batch 64 is about 4% faster, pruned or not. Transitions
are copied as :class:`FrozenTransition`s: BN-ReLU and pooling from a kept scale and shift, the
1x1 convolution on the pooled rows as a prepacked matrix product (another 4%). Each layer's
input pass (BN-ReLU of the buffer's first channels, or a pruned layer's gather with it) is a
``native.ColumnReader`` made once per dtype, whose call checks only its two matrices: 5-10 us
of Python less per layer than the wrappers that check everything, which made the pruned
``make run`` model's forward about 5% faster and its parent's 2% (docs/performance.md#pruning).

A layer's last convolution, where it is 2D and 3x3 with at most 16 outputs (every DenseNet-BC
layer with k <= 16) and this machine's build has the kernel (``native.Conv3x3``: AVX-512, and
AVX512-BF16 for bf16), runs as that native kernel at any batch size, writing straight into
the block's buffer. oneDNN's convolution has a large fixed cost on these shapes (about 250 us
at 14x14 in a batch of 64, even from one input channel) and its output is then copied into
the buffer; the kernel was 1.2-1.5x as fast at 14x14, 1.9-2.5x at 7x7 and 2.1-2.9x at batch 1,
and the ``make run`` model's forward at batch 64 1.18x as fast, 1.23x pruned
(docs/performance.md#pruning). Elsewhere the convolution op runs, as above.

A bottleneck's 1x1 convolution (its second batch norm folded in, then the ReLU) and a frozen
transition's run as the native ``native.Pointwise`` where it measured faster than oneDNN's
product (bf16 up to 64 outputs, float32 up to ``_POINTWISE_F32_OUT``; figures below): its call
costs a few microseconds where oneDNN's costs 15-20, and on the narrow inputs of a pruned layer
oneDNN's bf16 product ran at a fifth of the machine's rate.

Where every layer of a block runs both native kernels (its bottleneck as a ``Pointwise`` with
the BN-ReLU prologue, its last convolution as a ``Conv3x3``), the block runs them all in one
``native.DenseLayers`` call: from Python each of the two calls a layer makes costs 10-20 us of
checks and ctypes, the same for a pruned layer as for its parent, and at batch 1 more than its
arithmetic. On the ``make run`` model (Zen 5 EPYC, 2 threads, 101 alternating rounds of the
same frozen model with and without, ad hoc): bf16 1.08x as fast at batch 64 and 1.74x at batch
1; its 40% pruned child 1.15x and 1.74x in bf16, 1.15x and 1.62x in float32 (the parent's
bottlenecks, 48 wide, stay oneDNN's in float32, so its blocks run layer by layer there).

A convolution that feeds a frozen block directly (a DenseNet-BC stem) is copied as a
:class:`FrozenStemConv`, which writes its output channels-last through ``native.StemConv``:
the block then copies whole rows into its buffer instead of transposing oneDNN's NCHW output.
On the ``make run`` model's stem (1 to 24 channels, stride 2, batch 64; Zen 4 EPYC, ad hoc) the
kernel took 91 us in float32 and 114 in bf16, against 254-314 us for oneDNN's convolution and
the layout change, and the block's copy of it went from 248 to 83 us in bf16.

A DenseNet itself is copied as a :class:`FrozenDenseNet`, whose head (final norm, ReLU, global
mean, classifier) runs as one float32 pass from kept constants: on the ``make run`` model at
batch 64 in bf16 the forward was 1.015x as fast, its 40% pruned child 1.034x (same process,
alternating, ad hoc; docs/performance.md#pruning).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections import OrderedDict
from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused as _fused, native
from .densenet import DenseNet, _check_input
from .fused_stem import bn_scale_shift, unhooked
from .layers import DenseBlock, Transition, _plain_only

# A convolution feeding a frozen dense block runs as the native stem kernel when each of its
# outputs reads at most this many input values (an RGB 7x7 stem's 147): the kernel multiplies
# one tap at a time, where oneDNN's convolution is the faster for wider inputs.
_STEM_TAPS = 160

# A 1x1 convolution (a bottleneck with its second batch norm folded in, or a transition's) runs
# as the native kernel in bf16 up to _POINTWISE_BF16_OUT outputs (below), in float32 up to this
# many. Timed against oneDNN's prepacked product on a Zen 4 EPYC, 2 threads (ad hoc): bf16
# 44 against 61 us (12,544 rows, 16 to 24 channels), 75/100 (32 to 24), 110/142 (48 to 32),
# 239/265 (84 to 48), 147/166 (33 to 64); float32 75/91, 136/150, 199/240, but 654/498 from 84
# to 48 and 310/296 from 33 to 64: its float32 groups of 4 rows with 3-4 accumulators a row
# lose to oneDNN's blocking there.
_POINTWISE_F32_OUT = 32
# In bf16 the kernel takes up to native.POINTWISE_MAX_OUT (128) outputs, but on its own it ran
# at 0.92-0.95x oneDNN's rate from 128 to 992 channels into 128 (Zen 5 EPYC, ad hoc): a
# bottleneck runs it there with its first batch norm and ReLU (and a pruned layer's gather)
# formed in the kernel's tile (``Pointwise`` with scale, shift and the layer's index), which
# saves the pass that wrote that input and oneDNN's read of it (1.10-1.52x on densenet121's
# shapes, the same measurement); a 1x1 convolution that reads a formed input (a transition's,
# after its pooling) runs natively up to this many outputs.
_POINTWISE_BF16_OUT = 64

# Prepacked weights are kept for this many input shapes (batch size, spatial size, dtype) per block.
_SHAPES = 4

# A layer's last convolution over at most this many positions runs as one matrix product (see
# the module docstring). At 7x7 the unrolled matrix would multiply 6.65x as much as the
# convolution (2,401 position pairs against the 361 a 3x3 kernel reaches) and is slower.
_UNROLL_POSITIONS = 9
# ... and holds at most this many weights (16 MiB in float32), 81 C_out x C_in at 3x3: a
# bottleneck's 3x3 convolution (48 or 128 inputs) is far under it.
_UNROLL_ELEMENTS = 1 << 22


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode, for inference only, whose dense blocks that run fused
    (``DenseBlock.fused_status()`` None) are :class:`FrozenDenseBlock`s and whose transitions
    that pool first (``Transition.pools_first``) :class:`FrozenTransition`s: the same function,
    the same state-dict keys, their constants computed at their first call in each dtype and
    device. Everything else is copied as it is. ``model`` is unchanged; the copy does not
    follow later changes to it, and its frozen modules refuse ``train()``."""
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    swaps = [(name, FrozenDenseBlock) for name, m in frozen.named_modules()
             if isinstance(m, DenseBlock) and not isinstance(m, FrozenDenseBlock) and m.fused_status() is None]
    swaps += [(name, FrozenTransition) for name, m in frozen.named_modules()
              if type(m) is Transition and m.pools_first]
    for name, frozen_type in swaps:
        if not name:
            return frozen_type(frozen)
        parent_name, _, child = name.rpartition(".")
        parent = frozen.get_submodule(parent_name)
        setattr(parent, child, frozen_type(getattr(parent, child)))
    for seq in [m for m in frozen.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for name, after in zip(names, names[1:]):
            if isinstance(seq._modules[after], FrozenDenseBlock) and FrozenStemConv.takes(seq._modules[name]):
                setattr(seq, name, FrozenStemConv(seq._modules[name]))
    if type(frozen) is DenseNet:
        frozen.__class__ = FrozenDenseNet
        frozen._head = OrderedDict()
    return frozen


def for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """What ``densekit eval`` and ``predict`` run: on the CPU, :func:`optimize_for_inference` of
    ``model``; elsewhere ``model`` itself (the CUDA path keeps to stock PyTorch ops)."""
    return optimize_for_inference(model) if device.type == "cpu" else model


class _InferenceOnly:
    """What the frozen modules share: their kept constants (the dicts named in ``_CACHES``) are
    left behind by copies and pickles (oneDNN's packed weights have no storage to copy; the
    copy computes its own at its first call) and dropped by ``load_state_dict`` (new weights,
    new constants; it visits a module before its children); they refuse ``train()`` and
    ``prune_()``."""

    _CACHES: tuple[str, ...] = ()

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in self._CACHES:
            state[name] = type(state[name])()
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        for name in self._CACHES:  # a copy pickled by a version that kept fewer constants
            if name not in self.__dict__:
                setattr(self, name, OrderedDict())

    def _load_from_state_dict(self, *args, **kwargs):
        for name in self._CACHES:
            getattr(self, name).clear()
        super()._load_from_state_dict(*args, **kwargs)

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(f"a {type(self).__name__} is for inference only: train the model it was made from")
        return super().train(False)

    def prune_(self, *args, **kwargs):
        raise RuntimeError(f"a {type(self).__name__} is for inference only: prune the model it was made from")


class FrozenDenseNet(_InferenceOnly, DenseNet):
    """A :class:`DenseNet` for inference whose head runs as one pass (the class of
    :func:`optimize_for_inference`'s copy of a DenseNet). After the last dense block the
    network's own head is four ops and four passes (the final batch norm, the ReLU, the global
    mean, the classifier), each costing about as much in fixed overhead as in arithmetic on the
    small final maps: at batch 64 on the ``make run`` model 67, 23, 73 and 121 us in bf16 in a
    forward of 4.3 ms (2 threads, Zen 5 EPYC, ad hoc; docs/performance.md#pruning), the same in
    a pruned model, whose forward is shorter. Here the final norm's scale and shift and the
    classifier are kept in float32 and the head is ``linear(mean(relu(x * scale + shift)))``
    in float32, rounded to the dtype the modules would return (bf16 under bf16 autocast, as the
    classifier's product there). Where it does not apply (maps or pooled features asked for, a
    pooling other than the mean, a hook on the modules it skips, a classifier other than a Linear,
    maps that need a gradient, off the CPU, under torch.compile and in traces and exports) the
    modules run as in a DenseNet. The kept constants are those of the head's tensors as they are:
    a classifier replaced or reset, a dtype changed, an in-place edit make them anew."""

    _CACHES = ("_head",)
    __jit_ignored_attributes__ = ["_head"]  # the kept constants, which TorchScript's code never reads

    def train(self, mode: bool = True):
        # a copy with nothing frozen in it (no block ran fused) trains as the DenseNet it is
        if mode and not any(isinstance(m, _InferenceOnly) for m in self.modules() if m is not self):
            return DenseNet.train(self, mode)
        return super().train(mode)

    def forward(self, x: Tensor) -> Union[Tensor, List[Tensor]]:
        if not torch.jit.is_scripting():
            name = self._fused_head(x)
            if name is not None:
                return self._forward_fused_head(x, name)
        return self._forward(x)  # DenseNet's (TorchScript compiles no super() call)

    @torch.jit.unused
    def _fused_head(self, x: Tensor) -> Optional[str]:
        """The final norm's name in ``features`` where the head runs as one pass on ``x``, else None."""
        features, classifier = self.features, self.classifier
        if self.features_only or self.global_pool != "avg" or not getattr(features, "fused", False) \
                or _plain_only() or torch.compiler.is_compiling() or x.device.type != "cpu" or not features._modules:
            return None
        name, norm = next(reversed(features._modules.items()))
        if type(norm) not in _fused._BN or not _fused._plain_bn(norm) or norm.training \
                or type(classifier) is not nn.Linear or not unhooked(features, norm, classifier):
            return None
        if x.dtype not in (torch.float32, torch.bfloat16) or classifier.weight.dtype not in (torch.float32, torch.bfloat16):
            return None
        if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return None
        return name

    @torch.jit.unused
    def _forward_fused_head(self, x: Tensor, name: str) -> Tensor:
        _check_input(x, self.spatial_dims, self.in_chans, self._min_size, self._reduction)
        maps = self.features._forward_fused(x, stop=name)
        norm, classifier = self.features._modules[name], self.classifier
        if maps.requires_grad:  # a gradient asked for (modules left unfrozen): the modules, which autograd records
            return self.forward_head(F.relu(norm(maps), inplace=True))
        # the dtype the modules would return: the classifier's product runs in bf16 under autocast
        autocast = torch.is_autocast_enabled("cpu")
        out_dtype = torch.bfloat16 if autocast else torch.promote_types(maps.dtype, classifier.weight.dtype)
        # the constants of these very tensors as they are now: a classifier replaced or reset, a
        # dtype or device changed, an in-place edit (a new version) make them anew
        sources = [t for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var, classifier.weight,
                               classifier.bias) if t is not None]
        key = (maps.device, float(norm.eps),  # (inference tensors have no version counter)
               *[(id(t), t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype) for t in sources])
        constants = self._head.get(key)
        if constants is None:
            self._head.clear()
            constants = self._head[key] = self._head_constants(norm, classifier)
        scale, shift, weight, bias = constants
        n, c = maps.shape[:2]
        rows = maps.movedim(1, -1).reshape(n, math.prod(maps.shape[2:]), c)  # channels-last maps: a view
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            pooled = torch.addcmul(shift, rows, scale).relu_().mean(1)
            return F.linear(pooled, weight, bias).to(out_dtype)

    @staticmethod
    def _head_constants(norm: nn.Module, classifier: nn.Linear) -> tuple:
        with torch.no_grad():
            scale, shift = bn_scale_shift(norm.weight, norm.bias, norm.running_mean.float(), norm.running_var.float(),
                                          norm.eps)
            # copies: a later .to() of the module changes its parameters' data in place
            bias = None if classifier.bias is None else classifier.bias.to(torch.float32, copy=True)
            return scale.contiguous(), shift.contiguous(), classifier.weight.to(torch.float32, copy=True), bias


class FrozenDenseBlock(_InferenceOnly, DenseBlock):
    """A dense block for inference: the eval-mode function of the :class:`DenseBlock` it is made
    from, holding the same layers, from constants computed at its first call in each dtype and
    device (see the module docstring). Where that path does not apply it runs as a DenseBlock:
    under torch.compile, on the reference path (``fused`` off, as ``reference_path`` sets it)
    and in traces and exports."""

    def __init__(self, block: DenseBlock) -> None:
        if block.fused_status() is not None:
            raise ValueError(f"FrozenDenseBlock needs a block that runs fused: {block.fused_status()}")
        nn.ModuleDict.__init__(self, block.items())  # the same layers: the same state-dict keys
        self.in_channels, self.out_channels = block.in_channels, block.out_channels
        self.growth_rate, self.spatial_dims, self.fused = block.growth_rate, block.spatial_dims, True
        self.register_buffer("output_index", block.output_index)
        self.training = False
        self._constants: dict[tuple, list] = {}
        self._packed: OrderedDict = OrderedDict()
        self._readers: dict[torch.dtype, list] = {}

    _CACHES = ("_constants", "_packed", "_readers")

    @torch.jit.unused
    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return super()._forward_fused(x)
        with torch.no_grad():
            return _fused._in_autocast_dtype(FrozenDenseBlock._run, self, x)

    def _layers(self, dtype: torch.dtype) -> list:
        """Per layer: (first unit, its scale and shift, the 1x1 weight and bias with the second
        batch norm folded in or None, the last convolution's unit)."""
        key = (dtype, next(self.parameters()).device)
        layers = self._constants.get(key)
        if layers is None:
            with torch.no_grad():
                units = _fused._units(self, dtype)
                first = _fused._running_scale_shifts([us[0] for us in units])
                bottleneck = len(units[0]) == 2
                second = _fused._running_scale_shifts([us[1] for us in units]) if bottleneck else None
                layers = []
                for i, us in enumerate(units):
                    scale, shift = (t.contiguous() for t in first[i])
                    folded = us[0]._folded(second[i], dtype) if bottleneck else None
                    layers.append((us[0], scale, shift, folded, us[-1]))
            self._constants[key] = layers
        return layers

    def _column_readers(self, dtype: torch.dtype, layers: list) -> list:
        """Per layer the native pass that reads its input from the buffer (BN-ReLU of the first
        channels, or a pruned layer's gather with it), then for a pruned block the gather of
        its kept outputs (else None): their constants checked once (``native.ColumnReader``)."""
        readers = self._readers.get(dtype)
        if readers is None:
            k, index = self.growth_rate, self.output_index
            readers = [native.ColumnReader(self.in_channels + i * k, first.index, scale, shift, dtype)
                       for i, (first, scale, shift, _, _) in enumerate(layers)]
            readers.append(None if index is None else native.ColumnReader(self.out_channels, index, None, None, dtype))
            self._readers[dtype] = readers
        return readers

    def _weights(self, x: torch.Tensor, layers: list) -> tuple[bool, list, "native.DenseLayers | None"]:
        """Whether the convolutions run oneDNN-prepacked for ``x`` (:func:`_prepacks`), per layer
        the two convolutions' weights as the convolution op then takes them, and where every
        layer runs both native kernels, all of them as one :class:`native.DenseLayers`."""
        return _kept(self._packed, x, lambda: self._pack(x, layers))

    def _pack(self, x: torch.Tensor, layers: list) -> tuple[bool, list, "native.DenseLayers | None"]:
        n, _, *spatial = x.shape
        packed, weights = _prepacks(x), []
        for i, (first, _, _, folded, last) in enumerate(layers):
            w1 = folded[0] if folded is not None else first.weight
            w2 = last.weight if folded is not None else None
            # the bottleneck and the layer's last convolution as the native kernels run them, where they
            # do: the bottleneck with its BN-ReLU (and a pruned layer's gather) formed in the kernel's tile
            point = None if folded is None else _pointwise(w1, folded[1], x.dtype, relu=True, prologue=True,
                                                           index=first.index,
                                                           width=self.in_channels + i * self.growth_rate)
            direct = _direct(w2 if w2 is not None else w1, last.padding, spatial, x.dtype)
            if packed:
                c1 = first.index.numel() if first.index is not None else first.weight.shape[1]
                width = w1.shape[0]
                w1 = _Packed(w1, first.padding, [n, c1, *spatial])
                w2 = None if w2 is None else _Packed(w2, last.padding, [n, width, *spatial])
            weights.append((w1, w2, direct, point))
        chain = None
        if all(point is not None and direct is not None for _, _, direct, point in weights):
            chain = native.DenseLayers([point for *_, point in weights], [scale for _, scale, *_ in layers],
                                       [shift for _, _, shift, *_ in layers], [direct for *_, direct, _ in weights],
                                       self.in_channels, self.growth_rate, x.dtype)
        return packed, weights, chain

    @staticmethod
    def _run(self: "FrozenDenseBlock", x: torch.Tensor) -> torch.Tensor:
        n, c0, *spatial = x.shape
        spatial = tuple(spatial)
        k, c = self.growth_rate, self.out_channels
        layers = self._layers(x.dtype)
        packed, weights, chain = self._weights(x, layers)
        store, rows = _fused._buffer(x, c)
        index = self.output_index
        kept = 0 if index is None else index.numel()
        scratch = _fused._Scratch(rows.shape[0], {"a": max(c - k, k, kept), "g": c,
                                                  "m": chain.width if chain is not None else 0}, x)
        readers = self._column_readers(x.dtype, layers) if native.usable(rows) else None
        chained = chain is not None and readers is not None
        if chained:  # every layer in one native call
            chain(rows, spatial, scratch("m", chain.width))
        for i, ((first, scale, shift, folded, last), (w1, w2, direct, point)) in \
                enumerate(zip(layers, () if chained else weights)):
            ci = c0 + i * k
            # the bottleneck's BN-ReLU (a pruned layer's gather too) is formed inside the native 1x1 convolution
            prologue = point is not None and readers is not None
            if prologue:
                a = rows[:, :ci]
            elif readers is not None:
                a = readers[i](rows, scratch("a", readers[i].cols))
            else:
                a = first.read_act(rows[:, :ci], scale, shift, scratch)
            if folded is not None:
                if prologue:
                    a = point(a, scale=scale, shift=shift)
                else:
                    a = _apply(w1, a, folded[1], first.padding, spatial, packed, relu=True)
                w, padding = w2, last.padding
            else:
                w, padding = w1, first.padding
            if direct is not None and readers is not None:  # straight into the buffer
                direct(a if a.stride(1) == 1 else a.contiguous(), spatial, rows[:, ci:ci + k])
            else:
                rows[:, ci:ci + k].copy_(_apply(w, a, None, padding, spatial, packed))
        if index is None:
            return store.movedim(-1, 1)
        # A pruned block's kept outputs: one gather, without select_channels' autograd node
        # (about 7 us a call, half the gather itself at 3x3 positions), into the workspace
        # the last layer's BN-ReLU has just written, which is still in the CPU's caches: into
        # a new tensor the gather took twice as long (docs/performance.md#pruning). Where the
        # layers ran in one native call, nothing wrote it yet and it is new. The workspace is
        # this call's own; the returned view keeps it.
        out = scratch("a", kept)
        return _fused._grid(readers[-1](rows, out) if readers is not None else _fused._gather_cols(rows, index, out),
                            spatial)


class FrozenStemConv(_InferenceOnly, nn.Conv2d):
    """A network's first convolution where a frozen dense block reads its output (a DenseNet-BC
    stem), for inference: on the CPU where this machine's build has the kernel
    (``native.StemConv``) it writes its output channels-last, which the block copies into its
    buffer as whole rows, instead of oneDNN's NCHW output that the block had to transpose;
    elsewhere, under torch.compile, in traces and where a gradient is asked for it runs as the
    Conv2d it was made from (the same parameters and state-dict keys), and on the reference path
    (``fused`` off: ``set_fused``, ``reference_path``)."""

    _CACHES = ("_kept",)
    follows_fused = True  # set_fused switches it: off, it runs the Conv2d (counters, exports)

    @staticmethod
    def takes(conv: nn.Module) -> bool:
        """Is ``conv`` a plain Conv2d the native kernel runs: no hooks (which would be lost), no bias,
        groups and dilation 1, zero
        padding given as numbers, at most ``native.STEM_MAX_OUT`` outputs, and a stem's few taps
        (at most ``_STEM_TAPS`` input values per output)?"""
        return (type(conv) is nn.Conv2d and unhooked(conv) and conv.bias is None and conv.groups == 1
                and tuple(conv.dilation) == (1, 1)
                and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
                and conv.out_channels <= native.STEM_MAX_OUT
                and conv.in_channels * math.prod(conv.kernel_size) <= _STEM_TAPS)

    def __init__(self, conv: nn.Conv2d) -> None:
        nn.Module.__init__(self)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, name, getattr(conv, name))
        self.weight = conv.weight
        self.register_parameter("bias", None)
        self.training, self.fused = False, True
        self._kept: OrderedDict = OrderedDict()

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # a branch TorchScript leaves out
            if self._native_takes(x):
                return self._forward_native(x)
        # the Conv2d's own call, which also says what is wrong with an input that does not fit
        return self._conv_forward(x, self.weight, self.bias)

    @torch.jit.unused
    def _native_takes(self, x: Tensor) -> bool:
        """Does the native kernel compute what the Conv2d would on ``x``: the fast path on (not
        the reference path, a trace or the compiler), no gradient asked for, an input that fits,
        float32 weights on the CPU, a float32 input (cast by bf16 autocast as the Conv2d's would
        be) or a bf16 one with autocast on, in a dtype this build's kernel takes?"""
        if not self.fused or _plain_only() or torch.compiler.is_compiling() or x.device.type != "cpu" \
                or x.dim() != 4 or x.shape[1] != self.in_channels or self.weight.device.type != "cpu" \
                or self.weight.dtype != torch.float32 \
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)) \
                or min(native.window_grid(x.shape[2:], self.kernel_size, self.stride, self.padding)) < 1:
            return False
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            return x.dtype in (torch.float32, dtype) and native.conv3x3_supported(dtype)
        return x.dtype == torch.float32 and native.conv3x3_supported(x.dtype)

    @torch.jit.unused
    def _forward_native(self, x: Tensor) -> Tensor:
        return _fused._in_autocast_dtype(FrozenStemConv._run, self, x)

    @staticmethod
    def _run(self: "FrozenStemConv", x: torch.Tensor) -> torch.Tensor:
        conv = self._kept.get(x.dtype)
        if conv is None:
            conv = self._kept[x.dtype] = native.StemConv(self.weight, self.stride, self.padding, x.dtype)
        return conv(x.contiguous())


def _pointwise(weight: torch.Tensor, bias, dtype: torch.dtype, relu: bool, prologue: bool = False,
               index: torch.Tensor | None = None, width: int | None = None):
    """A 1x1 convolution as a :class:`native.Pointwise` where that kernel takes it and measured
    faster than oneDNN's product (bf16 up to ``_POINTWISE_BF16_OUT`` outputs, or up to
    ``native.POINTWISE_MAX_OUT`` where it forms its input's BN-ReLU itself, ``prologue``;
    float32 up to ``_POINTWISE_F32_OUT``), else None. ``index``: a pruned layer's columns of
    its ``width``-column input, gathered by the kernel."""
    c_out = weight.shape[0]
    limit = _POINTWISE_F32_OUT if dtype == torch.float32 else \
        native.POINTWISE_MAX_OUT if prologue else _POINTWISE_BF16_OUT
    if any(k != 1 for k in weight.shape[2:]) or c_out > limit or not native.conv3x3_supported(dtype):
        return None
    return native.Pointwise(weight, bias, dtype, relu, index=index, width=width)


def _direct(weight: torch.Tensor, padding: list[int], spatial: list[int], dtype: torch.dtype):
    """A layer's last convolution as a :class:`native.Conv3x3` where that kernel takes it (2D, 3x3,
    padding 1, few enough outputs, a dtype this machine's build runs it in), else None."""
    if len(spatial) != 2 or list(padding) != [1, 1] or tuple(weight.shape[2:]) != (3, 3) \
            or weight.shape[0] > native.CONV3X3_MAX_OUT or not native.conv3x3_supported(dtype):
        return None
    return native.Conv3x3(weight, dtype)


class FrozenTransition(_InferenceOnly, Transition):
    """A transition for inference: the eval-mode function of the :class:`Transition` it is made
    from (one that pools first), holding the same layers. On the CPU where the native kernels
    run it (``fused.supports_fused_transition``) BN-ReLU and pooling are one pass from a scale
    and shift kept per dtype and input shape, and the 1x1 convolution on the pooled rows runs
    from a prepacked weight (:class:`_Packed`); elsewhere, under torch.compile and in traces it
    runs as a Transition."""

    def __init__(self, transition: Transition) -> None:
        if not transition.pools_first:
            raise ValueError("FrozenTransition needs a transition that pools before its convolution")
        nn.Sequential.__init__(self, OrderedDict(transition.named_children()))  # the same layers and keys
        self.in_channels, self.out_channels, self.fused = transition.in_channels, transition.out_channels, True
        self.training = False
        self._kept: OrderedDict = OrderedDict()

    _CACHES = ("_kept",)

    @torch.jit.unused
    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        # a layer swapped or a norm put in training mode since the copy: the Transition's own way
        if torch.compiler.is_compiling() or not self.pools_first or self.norm.training \
                or not _fused.supports_fused_transition(self, x):
            return super()._forward_fused(x)
        with torch.no_grad():
            return _fused._in_autocast_dtype(FrozenTransition._run, self, x)

    @staticmethod
    def _run(self: "FrozenTransition", x: torch.Tensor) -> torch.Tensor:
        spatial = tuple(x.shape[2:])
        pooled_spatial = tuple(s // 2 for s in spatial)
        padding = [0] * len(spatial)
        scale, shift, packed, weight, point = _kept(self._kept, x, lambda: self._constants(x, pooled_spatial))
        pooled = native.bn_relu_pool(_fused._rows(x), spatial, scale, shift)
        out = point(pooled) if point is not None else _apply(weight, pooled, None, padding, pooled_spatial, packed)
        return _fused._grid(out, pooled_spatial)

    def _constants(self, x: torch.Tensor, pooled_spatial: tuple[int, ...]) -> tuple:
        unit = _fused._Unit(self.norm, self.conv, x.dtype)
        scale, shift = (t.contiguous() for t in unit.running_scale_shift())
        packed = _prepacks(x)
        weight = unit.weight
        point = _pointwise(weight, None, x.dtype, relu=False)
        if packed:
            weight = _Packed(weight, [0] * len(pooled_spatial), [x.shape[0], x.shape[1], *pooled_spatial])
        return scale, shift, packed, weight, point


def _kept(store: OrderedDict, x: torch.Tensor, make):
    """``store``'s entry for ``x``'s shape, dtype and device, made by ``make()`` at its first
    use; the ``_SHAPES`` most recently used are kept."""
    key = (tuple(x.shape), x.dtype, x.device)
    value = store.pop(key, None)  # then put back last: the most recently used
    if value is None:
        value = make()
    store[key] = value
    if len(store) > _SHAPES:
        store.popitem(last=False)
    return value


# Below this batch size torch.convolution's own choice (not oneDNN for small inputs) is faster
# than a prepacked oneDNN convolution: on the ``make run`` model at batch 1 and 4, 3.2 and 5.5-5.9 ms
# prepacked against 2.0 and 4.8 without; at 16 the same; at 64, 15.0 against 15.2-17.5 ms (ad hoc,
# same process, AMD EPYC).
_PACK_MIN_BATCH = 16


def _prepacks(x: torch.Tensor) -> bool:
    """Do oneDNN's prepacked convolutions take ``x`` (a batch of at least ``_PACK_MIN_BATCH`` on
    the CPU, float32 or bfloat16, 2D or 3D)?"""
    if x.shape[0] < _PACK_MIN_BATCH or x.device.type != "cpu" or x.dim() not in (4, 5) \
            or not torch.backends.mkldnn.is_available():
        return False
    # oneDNN's bf16 weights need AVX-512 (BW, VL, DQ) or better; torch.convolution falls back without
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _prepack(weight: torch.Tensor, padding: list[int], input_size: list[int]) -> torch.Tensor:
    n = weight.dim() - 2
    return torch.ops.mkldnn._reorder_convolution_weight(weight, padding, [1] * n, [1] * n, 1, input_size)


class _Packed:
    """A convolution's weight as oneDNN runs it on a batch of ``input_size`` (N, C, *spatial):
    for a 1x1 convolution, or one over at most ``_UNROLL_POSITIONS`` positions unrolled over
    them, a matrix product's weight (``self.positions`` the positions each product row holds:
    1, or all of an image's); else the convolution's weight, reordered."""

    def __init__(self, weight: torch.Tensor, padding: list[int], input_size: list[int]) -> None:
        spatial = input_size[2:]
        self.out_channels = weight.shape[0]
        self.positions = 0
        if all(k == 1 for k in weight.shape[2:]) and not any(padding):
            self.positions, matrix = 1, weight.reshape(weight.shape[0], -1)
        elif math.prod(spatial) <= _UNROLL_POSITIONS and _keeps_size(weight, padding) \
                and math.prod(spatial) ** 2 * weight.shape[0] * weight.shape[1] <= _UNROLL_ELEMENTS:
            self.positions, matrix = math.prod(spatial), _unrolled(weight, padding, spatial)
        if self.positions:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(matrix, input_size[0] * math.prod(spatial)
                                                                  // self.positions)
        else:
            self.weight = _prepack(weight, padding, input_size)


def _keeps_size(weight: torch.Tensor, padding: list[int]) -> bool:
    return all(2 * p == k - 1 for p, k in zip(padding, weight.shape[2:]))


def _unrolled(weight: torch.Tensor, padding: list[int], spatial: list[int]) -> torch.Tensor:
    """The (P * C_out, P * C_in) matrix of a stride-1 convolution that keeps the size of a grid
    of P positions, rows and columns in channels-last order: each output position's rows hold,
    in the columns of each input position one of its taps reaches, that tap's (C_out, C_in)
    weights."""
    c_out, c_in = weight.shape[:2]
    positions = list(itertools.product(*(range(s) for s in spatial)))
    where = {q: i for i, q in enumerate(positions)}
    matrix = weight.new_zeros(len(positions) * c_out, len(positions) * c_in)
    for o, q in enumerate(positions):
        for tap in itertools.product(*(range(k) for k in weight.shape[2:])):
            i = where.get(tuple(a + t - pad for a, t, pad in zip(q, tap, padding)))
            if i is not None:
                matrix[o * c_out:(o + 1) * c_out, i * c_in:(i + 1) * c_in] = weight[(slice(None), slice(None), *tap)]
    return matrix


def _apply(weight, rows: torch.Tensor, bias, padding: list[int], spatial: tuple[int, ...], packed: bool,
           relu: bool = False) -> torch.Tensor:
    """A layer's convolution of the channels-last ``rows`` of a grid of ``spatial`` positions,
    as (rows, C_out): with ``packed`` ``weight`` is a :class:`_Packed`."""
    if packed and weight.positions:
        attr = "relu" if relu else "none"
        if weight.positions == 1:
            return torch.ops.mkldnn._linear_pointwise(rows, weight.weight, bias, attr, [], "")
        if bias is not None:
            bias = bias.repeat(weight.positions)
        out = torch.ops.mkldnn._linear_pointwise(rows.view(-1, weight.positions * rows.shape[1]), weight.weight,
                                                 bias, attr, [], "")
        return out.view(-1, weight.out_channels)
    w = weight.weight if packed else weight
    return _fused._rows(_conv(_fused._grid(rows, spatial), w, bias, padding, packed, relu))


def _conv(x: torch.Tensor, weight: torch.Tensor, bias, padding: list[int], packed: bool, relu: bool = False):
    n = x.dim() - 2
    if packed:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, [1] * n, [1] * n, 1,
                                                       "relu" if relu else "none", [], "")
    out = torch.convolution(x, weight, bias, [1] * n, padding, [1] * n, False, [0] * n, 1)
    return out.relu_() if relu else out
