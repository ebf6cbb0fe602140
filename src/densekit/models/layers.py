"""The parts of a densely connected network, named as in the paper.

Huang, Liu, van der Maaten, Weinberger, "Densely Connected Convolutional Networks",
CVPR 2017 (arXiv:1608.06993): a *dense layer* (BN-ReLU-Conv, with an optional 1x1
"bottleneck" in front), a *dense block* whose every layer sees the concatenation of the
block input and all earlier layers' outputs, and a *transition* (BN-ReLU-Conv1x1-AvgPool)
between blocks. One code path serves 1D, 2D and 3D inputs: ``spatial_dims`` picks the
convolution, batch norm and pooling classes.
"""

import contextlib
import itertools
import re
import warnings
from collections.abc import Iterator
from typing import List, Sequence, Union

import torch
import torch.fx
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn

from .. import checks
from . import fused as _fused
from . import fused_op as _fused_op
from . import fused_stem as _fused_stem

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_AVG_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_MAX_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}

# torchvision before 0.3 saved dense layers as "norm.1", "conv.2", ... (nn.Sequential
# children with dotted names); this matches one such key relative to its layer.
LEGACY_LAYER_KEY = re.compile(
    r"^(norm|relu|conv)\.([12])\.(weight|bias|running_mean|running_var|num_batches_tracked)$"
)


def check_spatial_dims(spatial_dims: int) -> int:
    return checks.one_of("spatial_dims", spatial_dims, (1, 2, 3))


_is_fx_symbolic_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None) or \
    torch.fx._symbolic_trace.is_fx_tracing  # the older name, before torch.export shared the flag


def is_fx_tracing() -> bool:
    """Is torch.fx symbolically tracing the caller? A traced graph records the reference path
    (the fused ops run native kernels and host-side bookkeeping that a graph cannot hold)."""
    return _is_fx_symbolic_tracing()


def _plain_only() -> bool:
    """Must the fast paths stand aside? An exported program (torch.export) is meant to run
    without densekit, and a torch.jit trace or an fx trace cannot see native kernels. Under
    torch.compile the fused block runs as a custom operator (``fused_op.py``)."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing() or is_fx_tracing()


@torch.jit.unused
def _reads_parts() -> bool:
    """Does a pruned selection read the block's maps one by one (:func:`_select_from_parts`)?
    Only in the TorchScript-based ONNX export of a model traced with its own widths (the
    export's ``align=0``, or a model ``export_aligned`` does not take; its aligned copy reads
    whole maps instead), whose graph holds the index as a constant anyway. Everywhere else
    the reference path concatenates and then selects, with the index a tensor of the graph:
    eager (which follows any later change to the index), torch.jit's own traces (which
    ``load_state_dict`` may give another index), torch.compile, torch.export and fx
    (TorchScript's compiler skips the call itself)."""
    return torch.jit.is_tracing() and torch.onnx.is_in_onnx_export()


@torch.jit.unused
def _select_from_parts(parts: List[Tensor], index: Tensor) -> Tensor:
    """``torch.cat(parts, 1).index_select(1, index)``, without the whole concatenation where
    ``index`` increases and the parts share a dtype: each part gives its selected channels
    (all of it, a slice, or a gather) and only those are concatenated. A pruned layer reads a
    subset of a concatenation that grows with depth; in onnxruntime the concatenate-then-
    gather graph of a 40%-pruned DenseNet ran 1.02-1.03x slower than this one
    (docs/performance.md#pruning)."""
    with warnings.catch_warnings():  # in the export's trace the index is a constant of the model
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        wanted = index.tolist()
    if not wanted or any(b <= a for a, b in zip(wanted, wanted[1:])) or len({p.dtype for p in parts}) > 1:
        return torch.cat(parts, 1).index_select(1, index)
    pieces, start = [], 0
    for part in parts:
        size = part.shape[1]
        sel = [i - start for i in wanted if start <= i < start + size]
        start += size
        if not sel:
            continue
        if sel == list(range(sel[0], sel[0] + len(sel))):
            pieces.append(part if len(sel) == size else part.narrow(1, sel[0], len(sel)))
        else:
            pieces.append(part.index_select(1, torch.tensor(sel, dtype=index.dtype, device=index.device)))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)


def _each(value, n: int) -> bool:
    """``value`` (an int or a tuple of ints, as module arguments come) is n in every dim."""
    return all(v == n for v in (value if isinstance(value, tuple) else (value,)))


def conv_nd(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int,
            stride: int = 1, padding: int = 0) -> nn.Module:
    # Every convolution here feeds a batch norm, which has its own shift: a bias is dead weight.
    return _CONV[check_spatial_dims(spatial_dims)](
        in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)


def norm_nd(spatial_dims: int, num_features: int) -> nn.Module:
    return _NORM[check_spatial_dims(spatial_dims)](num_features)


def avg_pool_nd(spatial_dims: int, kernel_size: int, stride: int) -> nn.Module:
    return _AVG_POOL[check_spatial_dims(spatial_dims)](kernel_size, stride)


def max_pool_nd(spatial_dims: int, kernel_size: int, stride: int, padding: int) -> nn.Module:
    return _MAX_POOL[check_spatial_dims(spatial_dims)](kernel_size, stride, padding)


def check_channel_index(name: str, keep: torch.Tensor, n: int) -> torch.Tensor:
    """Indices to keep of ``n`` channels: increasing, in range, at least one (an empty layer
    would break every shape after it). Also checks an ``input_index`` read from a file."""
    if isinstance(keep, torch.Tensor) and keep.is_floating_point():
        raise ValueError(f"{name} must hold integer channel indices, got {keep.dtype}")
    keep = torch.as_tensor(keep, dtype=torch.int64)
    if keep.dim() != 1 or keep.numel() == 0 or keep.numel() > n:
        raise ValueError(f"{name} must list 1 to {n} channel indices, got {keep.numel()}")
    if keep[0] < 0 or keep[-1] >= n or (keep.numel() > 1 and not bool((keep[1:] > keep[:-1]).all())):
        raise ValueError(f"{name} must be increasing channel indices in [0, {n})")
    return keep


def _composed(index: torch.Tensor | None, keep: torch.Tensor, width: int, device: torch.device) -> torch.Tensor:
    """The ``keep`` entries of a channel index into ``width`` channels (None: all of them, then
    made on ``device``, the module's, wherever ``keep`` was ranked): pruning twice equals
    pruning once."""
    if index is None:
        index = torch.arange(width, device=device)
    return index[keep.to(index.device)].clone()


def _keep_bn(bn: nn.Module, keep: torch.Tensor) -> None:
    """Shrink a batch norm to the ``keep`` channels, with their affine parameters and statistics."""
    keep = keep.to(bn.weight.device)
    bn.weight = nn.Parameter(bn.weight.detach()[keep].clone(), requires_grad=bn.weight.requires_grad)
    bn.bias = nn.Parameter(bn.bias.detach()[keep].clone(), requires_grad=bn.bias.requires_grad)
    if bn.running_mean is not None:
        bn.running_mean = bn.running_mean[keep].clone()
        bn.running_var = bn.running_var[keep].clone()
    bn.num_features = keep.numel()


def _keep_conv(conv: nn.Module, keep: torch.Tensor, dim: int) -> None:
    """Shrink a convolution to the ``keep`` output (dim 0) or input (dim 1) channels."""
    w = conv.weight
    conv.weight = nn.Parameter(w.detach().index_select(dim, keep.to(w.device)).clone(), requires_grad=w.requires_grad)
    if dim == 0:
        conv.out_channels = keep.numel()
    else:
        conv.in_channels = keep.numel()


class DenseLayer(nn.Module):
    """One layer of a dense block: it adds ``growth_rate`` (k) new feature maps.

    With ``bn_size`` (the paper's "B" variant) it is BN-ReLU-Conv1x1(bn_size*k)-BN-ReLU-
    Conv3x3(k); with ``bn_size`` None or 0 it is the plain BN-ReLU-Conv3x3(k). Its input is
    the concatenation of every earlier feature map, given as one tensor or as a list.

    ``memory_efficient`` has torchvision's meaning: where a gradient is needed, recompute the
    concatenated BN-ReLU-Conv1x1 in backward instead of storing it (gradient checkpointing, Pleiss et al.,
    "Memory-Efficient Implementation of DenseNets", 2017). A fused block
    (``DenseBlock(fused=True)``), which never keeps the concatenation or its BN-ReLU, honours
    it by not keeping the layer's bottleneck either: backward runs the 1x1 convolution again.

    ``input_index`` (a buffer, None by default) names the input channels the layer reads;
    pruning sets it so that a layer can drop inputs without touching the block around it.
    """

    __constants__ = ["has_bottleneck"]

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int | None = 4,
                 drop_rate: float = 0.0, memory_efficient: bool = False,
                 spatial_dims: int = 2) -> None:
        super().__init__()
        checks.positive_int("in_channels", in_channels)
        checks.positive_int("growth_rate", growth_rate)
        if bn_size:
            checks.positive_int("bn_size", bn_size)
        self.in_channels = in_channels
        self.growth_rate = growth_rate
        self.bn_size = bn_size or 0
        self.drop_rate = checks.fraction("drop_rate", drop_rate)
        self.memory_efficient = bool(memory_efficient)
        self.spatial_dims = check_spatial_dims(spatial_dims)
        # a constant to TorchScript, which then compiles only the branch this layer has
        self.has_bottleneck = self.bn_size > 0
        if self.bn_size:
            width = self.bn_size * growth_rate
            self.norm1 = norm_nd(spatial_dims, in_channels)
            self.relu1 = nn.ReLU(inplace=True)
            self.conv1 = conv_nd(spatial_dims, in_channels, width, 1)
            self.norm2 = norm_nd(spatial_dims, width)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = conv_nd(spatial_dims, width, growth_rate, 3, padding=1)
        else:
            self.norm1 = norm_nd(spatial_dims, in_channels)
            self.relu1 = nn.ReLU(inplace=True)
            self.conv1 = conv_nd(spatial_dims, in_channels, growth_rate, 3, padding=1)
        self.register_buffer("input_index", None)


    def bottleneck(self, x: Tensor) -> Tensor:
        """BN-ReLU-Conv of the concatenated input: the part that sees every earlier map."""
        if self.input_index is not None:
            x = x.index_select(1, self.input_index)
        return self.conv1(self.relu1(self.norm1(x)))

    @torch.jit.unused
    def _checkpointed_bottleneck(self, inputs: List[Tensor]) -> Tensor:
        """The bottleneck of the concatenated ``inputs``, recomputed in backward: only the
        inputs (which the block keeps anyway) are saved, not their concatenation."""
        calls = []

        def run(*parts):
            calls.append(None)
            x = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
            if len(calls) == 1:
                return self.bottleneck(x)
            # The recompute in backward must run the same ops as the forward without moving
            # the running statistics a second time (checkpoint stops it early: no restoring).
            if self.input_index is not None:
                x = x.index_select(1, self.input_index)
            n = self.norm1
            if n.training and n.track_running_stats:
                x = F.batch_norm(x, n.running_mean.clone(), n.running_var.clone(), n.weight, n.bias, True, 0.0, n.eps)
            else:
                x = n(x)
            return self.conv1(self.relu1(x))

        return cp.checkpoint(run, *inputs, use_reentrant=False)

    @torch.jit.unused
    def _checkpoints(self, x: Union[Tensor, List[Tensor]]) -> bool:
        parts = [x] if isinstance(x, Tensor) else x
        # not under torch.compile either, whose compiled graph frees what it can by itself
        return not (_plain_only() or torch.compiler.is_compiling()) and torch.is_grad_enabled() \
            and any(p.requires_grad for p in parts)

    def forward(self, x: Union[Tensor, List[Tensor]]) -> Tensor:
        checkpoint = False
        if self.memory_efficient and not torch.jit.is_scripting():
            checkpoint = self._checkpoints(x)
        if checkpoint:
            out = self._checkpointed_bottleneck([x] if isinstance(x, Tensor) else x)
        elif not isinstance(x, Tensor) and self.input_index is not None and not torch.jit.is_scripting() \
                and _reads_parts():
            out = self.conv1(self.relu1(self.norm1(_select_from_parts(x, self.input_index))))
        else:
            out = self.bottleneck(x if isinstance(x, Tensor) else torch.cat(x, 1))
        return self._after_first(out)

    def _after_first(self, out: Tensor) -> Tensor:
        """The layer after its first convolution: the 3x3 part of a bottleneck layer, dropout."""
        if self.has_bottleneck:
            out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out

    @torch.jit.unused
    def forward_read(self, x: Tensor) -> Tensor:
        """The layer on the channels it reads, already selected (``input_index`` applied)."""
        return self._after_first(self.conv1(self.relu1(self.norm1(x))))

    def prune_(self, inputs: torch.Tensor | None = None, width: torch.Tensor | None = None) -> "DenseLayer":
        """Keep only the ``inputs`` channels that norm1 normalizes now and, in a bottleneck
        layer, the ``width`` channels between its two convolutions; in place, weights and
        statistics kept (network slimming; ``densekit.prune``). The block around the layer
        is untouched: ``input_index`` selects from its concatenation, composed with any
        earlier selection, so pruning twice equals pruning once."""
        if inputs is not None:
            inputs = check_channel_index("inputs", inputs, self.norm1.num_features)
            self.input_index = _composed(self.input_index, inputs, self.in_channels, self.norm1.weight.device)
            _keep_bn(self.norm1, inputs)
            _keep_conv(self.conv1, inputs, dim=1)
        if width is not None:
            if not self.has_bottleneck:
                raise ValueError("width can only be pruned in a bottleneck layer (bn_size > 0)")
            width = check_channel_index("width", width, self.norm2.num_features)
            _keep_conv(self.conv1, width, dim=0)
            _keep_bn(self.norm2, width)
            _keep_conv(self.conv2, width, dim=1)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Remap legacy "norm.1.weight"-style keys so that old checkpoints load through
        # the ordinary load_state_dict, strictly, with no key dropped.
        for key in [k for k in state_dict if k.startswith(prefix)]:
            match = LEGACY_LAYER_KEY.match(key[len(prefix):])
            if match:
                name, index, tensor = match.groups()
                state_dict[f"{prefix}{name}{index}.{tensor}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, growth_rate={self.growth_rate}, bn_size={self.bn_size}"


def prunable_norms(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(module name, kind, batch norm) for every group of channels that network slimming may
    remove, in module order: each dense layer's inputs (norm1) and bottleneck width (norm2),
    and each dense block's output as the module after it reads it (``"outputs"``: the
    transition's norm, or the final norm), where the block is followed by one."""
    groups = []
    for name, m in model.named_modules():
        if isinstance(m, DenseLayer):
            groups.append((name, "inputs", m.norm1))
            if m.has_bottleneck:
                groups.append((name, "width", m.norm2))
        elif isinstance(m, DenseBlock):
            reader = block_reader(model, name)
            if reader is not None:
                groups.append((name, "outputs", reader.norm if isinstance(reader, Transition) else reader))
    return groups


def _next_module(model: nn.Module, name: str) -> tuple[nn.Module | None, nn.Module | None]:
    """The module that holds ``name`` and the child registered right after it (None: none)."""
    if not name:
        return None, None
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    names = list(parent._modules)
    i = names.index(child)
    return parent, parent._modules[names[i + 1]] if i + 1 < len(names) else None


def _network(model: nn.Module, name: str) -> nn.Module | None:
    """The network whose ``features`` hold the block ``name`` directly and which keeps its head
    in step with pruning (a module with ``block_outputs_pruned_``, a DenseNet); else None."""
    parent_name = name.rpartition(".")[0]
    if not parent_name:
        return None
    owner_name, _, attr = parent_name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if hasattr(owner, "block_outputs_pruned_") and getattr(owner, attr, None) is model.get_submodule(parent_name):
        return owner
    return None


def block_reader(model: nn.Module, name: str) -> nn.Module | None:
    """The module that reads the whole output of the dense block ``name`` in ``model`` and can
    shrink with it: the :class:`Transition` registered right after the block, or a DenseNet's
    final norm (whose classifier :func:`prune_block_outputs_` shrinks too); else None."""
    parent, after = _next_module(model, name)
    if isinstance(after, Transition):
        return after
    if isinstance(after, nn.modules.batchnorm._BatchNorm) and list(parent._modules.values())[-1] is after \
            and _network(model, name) is not None:
        return after
    return None


def prune_block_outputs_(model: nn.Module, name: str, keep: torch.Tensor) -> nn.Module:
    """Keep only the ``keep`` channels of what the dense block ``name`` returns, and shrink
    the module that reads them (:func:`block_reader`) to match: a transition's norm and
    convolution, or a DenseNet's final norm and its classifier. Returns the reader. In place;
    pruning twice equals pruning once."""
    block = model.get_submodule(name)
    reader = block_reader(model, name)
    if not isinstance(block, DenseBlock) or reader is None:
        raise ValueError(f"{name} is not a dense block followed by a transition or a final norm")
    keep = block.prune_(keep)
    if isinstance(reader, Transition):
        reader.prune_(keep)
    else:
        _keep_bn(reader, keep)
    network = _network(model, name)
    if network is not None:
        network.block_outputs_pruned_(name.rpartition(".")[2], None if isinstance(reader, Transition) else keep)
    return reader


def _check_block_input(x: Tensor, in_channels: int) -> None:
    if x.shape[1] != in_channels:
        raise ValueError(f"DenseBlock expected {in_channels} input channels, got {x.shape[1]}")


# A traced graph records this check as a call (it runs on every input) instead of failing on
# its branch over a traced shape.
torch.fx.wrap("_check_block_input")


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; layer i sees the block input and layers 0..i-1.

    The output is the concatenation of the input and every layer's ``growth_rate`` new
    maps: ``out_channels = in_channels + num_layers * growth_rate``.

    With ``fused=True`` (the default of :func:`densekit.create_model`) the block runs as one
    fused operation that writes each layer's output once into a shared feature buffer and
    recomputes the cheap BN-ReLU in backward, so training memory grows linearly with depth
    without recomputing convolutions (``fused.py``): the same function and gradients as the
    concatenating reference path, :meth:`forward_plain`. A layer's ``memory_efficient`` makes
    the fused op recompute its bottleneck too (one more 1x1 convolution in backward, its
    output not kept). A block whose layers the fused op cannot run (:meth:`fused_status` says
    why) takes the reference path, where ``memory_efficient`` is gradient checkpointing.
    """

    def __init__(self, in_channels: int, growth_rate: int, num_layers: int,
                 bn_size: int | None = 4, drop_rate: float = 0.0,
                 memory_efficient: bool = False, spatial_dims: int = 2, fused: bool = False) -> None:
        super().__init__()
        checks.positive_int("in_channels", in_channels)
        checks.positive_int("growth_rate", growth_rate)
        checks.positive_int("num_layers", num_layers)
        self.in_channels = in_channels
        self.growth_rate = growth_rate
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.fused = bool(fused)
        channels = in_channels
        for i in range(num_layers):
            layer = DenseLayer(channels, growth_rate, bn_size, drop_rate, memory_efficient, spatial_dims)
            self.add_module(f"denselayer{i + 1}", layer)
            channels += growth_rate
        self.out_channels = channels
        self.register_buffer("output_index", None)

    @property
    def output_channels(self) -> int:
        """Channels the block returns: ``out_channels``, fewer where pruning dropped some."""
        return self.out_channels if self.output_index is None else self.output_index.numel()

    def prune_(self, outputs: torch.Tensor) -> torch.Tensor:
        """Return only the ``outputs`` channels of those the block returns now, composed with
        any earlier selection (``output_index``, a buffer, None by default, names them among
        the concatenation); the layers and the block's feature buffer stay as they are. The
        module reading the block must shrink with it: :func:`prune_block_outputs_`. Returns the
        checked ``outputs``."""
        outputs = check_channel_index("outputs", outputs, self.output_channels)
        self.output_index = _composed(self.output_index, outputs, self.out_channels, next(self.parameters()).device)
        return outputs

    def set_grad_checkpointing(self, enable: bool = True) -> "DenseBlock":
        """Set every layer's ``memory_efficient`` (``DenseLayer``): its bottleneck recomputed in backward."""
        for layer in self.values():
            layer.memory_efficient = bool(enable)
        return self

    def fused_status(self) -> str | None:
        """None when the block runs fused (``fused`` set and every layer one the fused op
        takes); else why it takes the reference path."""
        if not self.fused:
            return "fused is off"
        return _fused.unsupported_reason(self)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            _check_block_input(x, self.in_channels)
            if self.fused and not _plain_only():
                return self._forward_fused(x)
        return self.forward_plain(x)

    @torch.jit.unused
    def _forward_fused(self, x: Tensor) -> Tensor:
        if _fused.unsupported_reason(self) is None:
            if torch.compiler.is_compiling():
                out = _fused._in_autocast_dtype(_fused_op.run, self, x)
            else:
                out = _fused.fused_dense_block(self, x)
            return out if self.output_index is None else _fused.select_channels(out, self.output_index)
        return self.forward_plain(x)

    def forward_plain(self, x: Tensor) -> Tensor:
        """The reference path: concatenate, as torchvision does; fast paths are tested against it."""
        if not torch.jit.is_scripting() and _reads_parts():
            plan = _read_plan(self, x)
            if plan is not None:
                return self._forward_parts(x, plan)
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        index = self.output_index
        if index is not None and not torch.jit.is_scripting() and _reads_parts():
            return _select_from_parts(features, index)
        out = torch.cat(features, 1)
        if index is not None:
            out = out.index_select(1, index)
        return out

    @torch.jit.unused
    def _forward_parts(self, x: Tensor, plan: "_ReadPlan") -> Tensor:
        """:meth:`forward_plain` in the ONNX export of a pruned block: each map is split once
        into the runs of channels that the same readers read, and each reader concatenates the
        runs it reads (see :class:`_ReadPlan`)."""
        features: List[Tensor] = []
        runs: List[List[Tensor]] = []

        def add(t: Tensor) -> None:
            sizes = plan.splits[len(features)]
            features.append(t)
            runs.append([t] if len(sizes) == 1 else list(torch.split(t, sizes, 1)))

        def read(reader: int) -> Tensor:
            pieces = [features[p] if j is None else runs[p][j] for p, j in plan.pieces[reader]]
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)

        add(x)
        for i, layer in enumerate(self.values()):
            add(layer.forward_read(read(i)))
        return read(len(features) - 1)


class _ReadPlan:
    """How a pruned block's readers (each layer, then the block's output) take their channels
    in the ONNX export with its own widths (see :func:`_reads_parts`), where every map is a
    tensor of its own: ``splits[p]``, the sizes of the runs map p is split into (one: not
    split), runs of consecutive channels that the same readers read; ``pieces[r]``, reader
    r's input as (map, run) pairs, run None for a whole map.

    A gather per reader and map (the graph before) copied each map's channels once per
    reader that took a subset, then again into the reader's concatenation; a split copies
    each map once for all of them (docs/performance.md#pruning)."""

    def __init__(self, sizes: List[int], readers: List[List[int] | None]):
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        # members[p][c]: the readers of channel c of map p (reader r reads maps 0..r)
        members: List[List[set]] = [[set() for _ in range(size)] for size in sizes]
        for r, wanted in enumerate(readers):
            p = 0
            for ch in (range(offsets[r + 1]) if wanted is None else wanted):
                while ch >= offsets[p + 1]:
                    p += 1
                members[p][ch - offsets[p]].add(r)
        counts = [[sum(r in m for m in ms) for r in range(len(readers))] for ms in members]
        self.splits: List[List[int]] = []
        runs: List[List[set]] = []
        for p, size in enumerate(sizes):
            sizes_p, runs_p = [size], [members[p][0]]
            if any(0 < n < size for n in counts[p]):  # some reader takes part of it: split
                sizes_p = [1]
                for m in members[p][1:]:
                    if m == runs_p[-1]:
                        sizes_p[-1] += 1
                    else:
                        sizes_p.append(1)
                        runs_p.append(m)
            self.splits.append(sizes_p)
            runs.append(runs_p)
        self.pieces: List[List[tuple]] = []
        for r in range(len(readers)):
            pieces = []
            for p in range(r + 1):
                if counts[p][r] == sizes[p]:
                    pieces.append((p, None))
                elif counts[p][r]:
                    pieces += [(p, j) for j, m in enumerate(runs[p]) if r in m]
            self.pieces.append(pieces)


@torch.jit.unused
def _read_plan(block: "DenseBlock", x: Tensor) -> "_ReadPlan | None":
    """The :class:`_ReadPlan` of ``block`` on input ``x``, or None where the plain loop runs:
    no index at all, a layer that is not a :class:`DenseLayer`, or an index that does not
    increase or reads past its reader's input."""
    layers = list(block.values())
    indices = [getattr(layer, "input_index", None) for layer in layers] + [block.output_index]
    if all(i is None for i in indices) or not all(type(layer) is DenseLayer for layer in layers):
        return None
    with warnings.catch_warnings():  # in the export's trace these are constants of the model
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        readers = [None if i is None else i.tolist() for i in indices]
        sizes = [int(x.shape[1])] + [layer.growth_rate for layer in layers]
    ends = list(itertools.accumulate(sizes))
    if any(w is not None and (not w or w[0] < 0 or w[-1] >= end or any(b <= a for a, b in zip(w, w[1:])))
           for w, end in zip(readers, ends)):
        return None
    return _ReadPlan(sizes, readers)


class Transition(nn.Sequential):

    """BN-ReLU-Conv1x1-AvgPool(2) between two dense blocks: compresses and halves the size.

    With ``fused=True`` (the default of :func:`densekit.create_model`) the pooling runs
    before the convolution: both are linear and act on different axes, so they commute, and
    the 1x1 convolution then costs a quarter (an eighth in 3D). On the CPU in float32 BN-ReLU
    and pooling are one native pass that keeps no full-size activation (``fused.py``).
    """

    __jit_unused_properties__ = ["pools_first", "commutes"]

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2, fused: bool = False) -> None:
        checks.positive_int("in_channels", in_channels)
        checks.positive_int("out_channels", out_channels)
        super().__init__()
        self.add_module("norm", norm_nd(spatial_dims, in_channels))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", conv_nd(spatial_dims, in_channels, out_channels, 1))
        self.add_module("pool", avg_pool_nd(spatial_dims, 2, 2))
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.fused = bool(fused)

    def prune_(self, inputs: torch.Tensor) -> "Transition":
        """Keep only the ``inputs`` channels that its norm normalizes now: the norm and the
        convolution's input shrink, in place. The dense block before it must return only
        those channels (:func:`prune_block_outputs_` does both)."""
        inputs = check_channel_index("inputs", inputs, self.norm.num_features)
        _keep_bn(self.norm, inputs)
        _keep_conv(self.conv, inputs, dim=1)
        self.in_channels = inputs.numel()
        return self

    @property
    def pools_first(self) -> bool:
        """Does the fast path pool before the convolution? With ``fused`` where they commute."""
        return self.fused and self.commutes

    @property
    def commutes(self) -> bool:
        """Can the pooling run before the convolution, the same function? With the stock
        layers: a 1x1 stride-1 convolution and a 2x average pool without padding (a layer
        swapped for another, a max pool say, may not commute: the reference order runs)."""
        pool, conv = self.pool, self.conv
        return (isinstance(pool, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d))
                and _each(pool.kernel_size, 2) and _each(pool.stride, 2) and _each(pool.padding, 0)
                and not pool.ceil_mode and getattr(pool, "divisor_override", None) is None
                and isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and _each(conv.kernel_size, 1)
                and _each(conv.stride, 1) and _each(conv.padding, 0))

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            if self.fused and not _plain_only():
                return self._forward_fused(x)
        return self.forward_plain(x)

    @torch.jit.unused
    def _forward_fused(self, x: Tensor) -> Tensor:
        if not self.pools_first:
            return self.forward_plain(x)
        if _fused.supports_fused_transition(self, x):
            if torch.compiler.is_compiling():
                return _fused._in_autocast_dtype(_fused_op.run_transition, self, x)
            return _fused.fused_transition(self, x)
        return _fused.conv_keeping_layout(self.conv, self.pool(self.relu(self.norm(x))))

    def forward_plain(self, x: Tensor) -> Tensor:
        """The reference order, as torchvision runs it; the fast paths are tested against it."""
        return self.pool(self.conv(self.relu(self.norm(x))))


class Features(nn.Sequential):
    """torchvision's ``features``: the stem, the dense blocks with their transitions, and the
    final norm, run in order as an ``nn.Sequential``.

    With ``fused=True`` (the default of :func:`densekit.create_model`), while autograd records,
    the ImageNet stem's ``norm0``, ``relu0`` and ``pool0`` run as one operation that keeps its
    input for backward (and on the CPU one byte per pooled value) and computes the gradients
    from it there (``fused_stem.py``): the same function and gradients, without three full-size
    tensors held through the whole of backward. Where no
    gradient flows through an eval-mode stem (inference, or fine-tuning with the stem frozen),
    they run as one native pass on the CPU. Under torch.compile on the CPU, a training-mode
    batch norm of its own here (the final norm, or norm0 where the stem's operator does not
    apply) runs torch's kernel as a custom operator (``fused_op.run_norm``), where the
    compiler's code for the final norm was 20x slower.
    """

    def __init__(self, layers: "dict[str, nn.Module]", fused: bool = False) -> None:
        super().__init__(layers)
        self.fused = bool(fused)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            if self.fused and not _plain_only():
                return self._forward_fused(x)
        for module in self:
            x = module(x)
        return x

    @torch.jit.unused
    def _forward_fused(self, x: Tensor, stop: str | None = None) -> Tensor:
        """The modules in order, fused where they fuse; with ``stop``, up to the module of that
        name, which does not run (an inference copy's fused head runs the final norm itself)."""
        skip: tuple[str, ...] = ()
        for name, module in self._modules.items():
            if name == stop:
                break
            if name in skip:
                continue
            if name == "norm0":
                pooled = self._fused_stem(x)
                if pooled is not None:
                    x, skip = pooled, ("relu0", "pool0")
                    continue
            if torch.compiler.is_compiling() and _fused_op.takes_norm(module, x):
                x = _fused_op.run_norm(module, x)  # a batch norm of its own: torch's kernel
                continue
            x = module(x)
        return x

    @torch.jit.unused
    def _fused_stem(self, x: Tensor) -> Tensor | None:
        """``pool0(relu0(norm0(x)))`` as one op where one applies, else None (the modules run):
        under torch.compile the native custom operator; while a gradient flows, the op that keeps
        only its input; without one, an eval-mode stem's single native pass."""
        if not self._stem_follows():
            return None
        if torch.compiler.is_compiling():
            geometry = self._stem_operator(x)
            return None if geometry is None else _fused_op.run_stem(self.norm0, geometry, x)
        if self._stem_fits(x):
            return _fused_stem.stem_pool(self.norm0, self.pool0, x)
        geometry = _fused_stem.inference_geometry(self.norm0, self.relu0, self.pool0, x)
        return None if geometry is None else _fused_stem.inference_pool(self.norm0, geometry, x)

    @torch.jit.unused
    def _stem_fits(self, x: Tensor) -> bool:
        """Do ``norm0``, ``relu0`` and ``pool0``, which follow each other here (the caller
        checked: :meth:`_stem_follows`), run as the one op that keeps its input on ``x``?"""
        return _fused_stem.supports_stem_pool(self.norm0, self.relu0, self.pool0, x)

    @torch.jit.unused
    def _stem_follows(self) -> bool:
        """Do ``norm0``, ``relu0`` and ``pool0`` follow each other here?"""
        names = list(self._modules)
        at = names.index("norm0")
        return names[at:at + 3] == ["norm0", "relu0", "pool0"]

    @torch.jit.unused
    def _stem_operator(self, x: Tensor) -> tuple | None:
        """Under torch.compile: the pooling's (kernel, stride, padding) where the stem runs as the
        native custom operator (``fused_op.run_stem``) on ``x``, else None (the compiler traces
        the modules). Without the native kernels (off the CPU, say) there is no operator: the
        compiled graph frees and recomputes as it sees fit."""
        if not self._stem_fits(x) or (self.norm0.training and x.numel() <= x.shape[1]):
            return None  # one value per channel in training: the module raises torch's error
        return _fused_stem.native_geometry(self.pool0, x)


def set_fused(module: nn.Module, enabled: bool) -> list[tuple[nn.Module, bool]]:
    """Switch every dense block, transition and stem (:class:`Features`) in ``module``, and any
    other module whose class says it ``follows_fused`` (an inference copy's stem convolution), to
    the fused path (True) or the reference path (False); returns each one's previous setting,
    for :func:`restore_fused`."""
    previous = [(m, m.fused) for m in module.modules()
                if isinstance(m, (DenseBlock, Transition, Features)) or getattr(type(m), "follows_fused", False)]
    for m, _ in previous:
        m.fused = bool(enabled)
    return previous


def restore_fused(previous: list[tuple[nn.Module, bool]]) -> None:
    for m, flag in previous:
        m.fused = flag


@contextlib.contextmanager
def reference_path(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` on its reference path (torchvision's concatenating blocks and transition
    order) inside the ``with``, as the paper publishes it and as exporters and counters read it."""
    previous = set_fused(module, False)
    try:
        yield module
    finally:
        restore_fused(previous)
