"""The fused dense block and transition as custom operators (``torch.library``), for ``torch.compile``.

The fused block and transition (``fused.py``) run native kernels, read data pointers and keep
host-side bookkeeping that TorchDynamo cannot trace. Traced as the reference path, a compiled
DenseNet loses the block's speed and its memory linear in depth: on 2 CPU cores
``torch.compile`` of a densekit model trained slower than the same model in eager mode
(docs/performance.md). As opaque operators (``densekit::dense_block``,
``densekit::transition``, the ImageNet stem's ``densekit::stem_pool``, the final norm's
``densekit::batch_norm`` in training on the CPU, the final ReLU and global mean's
``densekit::relu_mean`` where a gradient may flow on the CPU, and their backwards),
each stays one call in the compiled graph,
``fullgraph=True`` included, and the compiler fuses what lies between them.

An operator's arguments can only be tensors and plain values, so each is a pure function of
them: the module's structure (growth rate, which layers have a bottleneck, dropout rates,
batch-norm eps and momentum, paddings, a pruned layer's input channels) and the tensors it
reads and updates (batch-norm scales and shifts, convolution weights, running statistics),
so that the compiler's functionalization sees the running statistics' update.
"""

from __future__ import annotations

import math
import types

import torch
from torch import Tensor

from . import fused, native
from . import fused_stem as _fused_stem

_CUMULATIVE = -1.0  # stands for a batch norm's momentum None (a cumulative moving average)


def _momentum(unit) -> float:
    return _CUMULATIVE if unit.momentum is None else float(unit.momentum)


def _from_momentum(momentum: float) -> float | None:
    return None if momentum == _CUMULATIVE else momentum


def arguments(block, units: list[list]) -> dict:
    """The operator's arguments for ``block`` (a DenseBlock) and its ``fused._units``, but its
    input and ``save``."""
    halves = [u for us in units for u in us]
    layers = list(block.values())
    return dict(params=[t for u in halves for t in (u.gamma, u.beta, u.master)],
                buffers=[t for u in halves for t in (u.running_mean, u.running_var, u.batches)],
                indices=[us[0].index for us in units], bottleneck=[len(us) == 2 for us in units],
                drop_rates=[float(layer.drop_rate) for layer in layers],
                recompute=[bool(getattr(layer, "memory_efficient", False)) for layer in layers],
                eps=[float(u.eps) for u in halves],
                momentum=[_momentum(u) for u in halves], paddings=[p for u in halves for p in u.padding],
                growth_rate=block.growth_rate, training=block.training)


def _structure(x: Tensor, drop_rates: list[float], recompute: list[bool], growth_rate: int, training: bool):
    """What ``fused._forward`` and ``fused._backward`` read of a DenseBlock module."""
    layers = [types.SimpleNamespace(drop_rate=r, memory_efficient=m) for r, m in zip(drop_rates, recompute)]
    return types.SimpleNamespace(values=lambda: layers, growth_rate=growth_rate, training=training,
                                 out_channels=x.shape[1] + len(layers) * growth_rate)


def _units(dtype, params, buffers, indices, bottleneck, eps, momentum, paddings) -> list[list]:
    out, u, dims = [], 0, len(paddings) // len(eps)
    for index, has_bottleneck in zip(indices, bottleneck):
        units = []
        for half in range(1 + has_bottleneck):
            units.append(fused._Unit.of(eps[u], _from_momentum(momentum[u]), paddings[u * dims:(u + 1) * dims],
                                        params[3 * u:3 * u + 3],
                                        buffers[3 * u:3 * u + 3] or (None,) * 3, dtype, index if half == 0 else None))
            u += 1
        out.append(units)
    return out


@torch.library.custom_op("densekit::dense_block", mutates_args=())
def dense_block(x: Tensor, params: list[Tensor], buffers: list[Tensor], indices: list[Tensor | None],
                bottleneck: list[bool], drop_rates: list[float], recompute: list[bool], eps: list[float],
                momentum: list[float], paddings: list[int], growth_rate: int, training: bool,
                save: bool) -> list[Tensor]:
    """The block's output buffer, then its batch statistics (empty in eval mode) and what
    backward reads (with ``save``, and always in training mode: the bottlenecks' batch
    statistics are among them; an empty tensor for the bottleneck of a layer that
    ``recompute``s it). The running statistics are the caller's to update
    (:func:`update_running`): an operator with an autograd formula mutates none of its inputs."""
    block = _structure(x, drop_rates, recompute, growth_rate, training)
    units = _units(x.dtype, params, buffers, indices, bottleneck, eps, momentum, paddings)
    with torch.no_grad():
        buf, (mean, var), saved = fused._forward(block, units, x, save=save or training, update=False)
    if mean is None:
        mean, var = x.new_empty(0, dtype=fused._acc(x.dtype)), x.new_empty(0, dtype=fused._acc(x.dtype))
    return [buf, mean, var, *[x.new_empty(0) if t is None else t.contiguous() for t in saved]]


@dense_block.register_fake
def _(x, params, buffers, indices, bottleneck, drop_rates, recompute, eps, momentum, paddings, growth_rate, training,
      save):
    n, c0, *spatial = x.shape
    acc = fused._acc(x.dtype)
    c = c0 + len(bottleneck) * growth_rate
    stats = c if training else 0
    out = [x.new_empty((n, *spatial, c)).movedim(-1, 1), x.new_empty(stats, dtype=acc), x.new_empty(stats, dtype=acc)]
    if save or training:
        rows, u = n * math.prod(spatial), 0
        for has_bottleneck, rate, again in zip(bottleneck, drop_rates, recompute):
            if has_bottleneck:
                width = params[3 * u + 2].shape[0]  # conv1's output channels
                out.append(x.new_empty(0) if again else x.new_empty((rows, width)))
                if training:
                    out += [x.new_empty(width, dtype=acc), x.new_empty(width, dtype=acc)]
            if training and rate > 0:
                out.append(x.new_empty((n, growth_rate, *spatial)))
            u += 1 + has_bottleneck
    return out


@torch.library.custom_op("densekit::dense_block_backward", mutates_args=())
def dense_block_backward(grad: Tensor, outputs: list[Tensor], params: list[Tensor], buffers: list[Tensor],
                         indices: list[Tensor | None], bottleneck: list[bool], drop_rates: list[float],
                         recompute: list[bool], eps: list[float], momentum: list[float], paddings: list[int],
                         growth_rate: int, training: bool, in_channels: int) -> list[Tensor]:
    """The gradient of the block's input (of ``in_channels`` channels), then of every
    parameter, from :func:`dense_block`'s ``outputs``."""
    buf, mean, var, *saved = outputs
    saved = _with_recomputed(saved, bottleneck, drop_rates, recompute, training)
    block = _structure(buf[:, :in_channels], drop_rates, recompute, growth_rate, training)
    units = _units(buf.dtype, params, buffers, indices, bottleneck, eps, momentum, paddings)
    stats = (mean, var) if training else (None, None)
    grad_x, grads = fused._backward(block, units, training, in_channels, buf, *stats, saved, grad, all_weights=True)
    return [grad_x, *[fused._laid_out_as(g, p).to(p.dtype) for g, p in zip(grads, params)]]


def _with_recomputed(saved: list[Tensor], bottleneck: list[bool], drop_rates: list[float], recompute: list[bool],
                     training: bool) -> list[Tensor | None]:
    """:func:`dense_block`'s saved tensors as ``fused._backward`` reads them: None for the
    bottleneck each ``recompute`` layer left out (an empty tensor here)."""
    out, pos = list(saved), 0
    for has_bottleneck, rate, again in zip(bottleneck, drop_rates, recompute):
        if has_bottleneck:
            if again:
                out[pos] = None
            pos += 3 if training else 1
        pos += training and rate > 0
    return out


@dense_block_backward.register_fake
def _(grad, outputs, params, buffers, indices, bottleneck, drop_rates, recompute, eps, momentum, paddings,
      growth_rate, training, in_channels):
    n, c, *spatial = outputs[0].shape
    grad_x = grad.new_empty((n, *spatial, c))[..., :in_channels].movedim(-1, 1)
    return [grad_x, *[torch.empty_like(p) for p in params]]


def _setup_context(ctx, inputs, output):
    x, params, buffers, *structure, save = inputs
    ctx.structure, ctx.in_channels = structure, x.shape[1]
    # torch.library matches the gradients to the inputs as a tree: a list all of tensors is a
    # list of gradients, anything else one (here None)
    ctx.tree = [len(v) if isinstance(v, list) and all(isinstance(e, Tensor) for e in v) else None
                for v in inputs[2:]]
    ctx.counts = len(output), len(params)
    # the running statistics only in eval mode, where backward reads them and nothing updates them
    ctx.save_for_backward(*output, *params, *([] if structure[-1] else buffers))


def _backward(ctx, grads):
    saved = ctx.saved_tensors
    n_out, n_params = ctx.counts
    outputs, params, buffers = saved[:n_out], saved[n_out:n_out + n_params], saved[n_out + n_params:]
    result = dense_block_backward(grads[0], list(outputs), list(params), list(buffers), *ctx.structure,
                                  ctx.in_channels)
    return (result[0], list(result[1:]), *[None if n is None else [None] * n for n in ctx.tree])


dense_block.register_autograd(_backward, setup_context=_setup_context)


def update_running(block, units: list[list], x: Tensor, outputs: list[Tensor]) -> None:
    """Update the running statistics of ``block`` (its ``fused._units``) in training mode from
    :func:`dense_block`'s ``outputs`` on ``x``, as the fused block does (nn.BatchNorm's rule):
    in-place ops on the module's buffers, which the compiler traces."""
    _, mean, var, *saved = outputs
    count, k, pos = x.numel() // x.shape[1], block.growth_rate, 0
    for i, (layer, us) in enumerate(zip(block.values(), units)):
        ci = x.shape[1] + i * k
        us[0].update_running(us[0].select(mean[:ci]), us[0].select(var[:ci]), count)
        if len(us) == 2:
            us[1].update_running(saved[pos + 1], saved[pos + 2], count)
            pos += 3
        pos += layer.drop_rate > 0


def run(block, x: Tensor) -> Tensor:
    """``fused.fused_dense_block(block, x)`` through the operators (under torch.compile)."""
    units = fused._units(block, x.dtype)
    args = arguments(block, units)
    save = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in args["params"]))
    outputs = dense_block(x, **args, save=save)
    if block.training:
        with torch.no_grad():
            update_running(block, units, x, outputs)
    return outputs[0]


# -- the transition ----------------------------------------------------------------------

def _transition_unit(x: Tensor, params, buffers, eps: float, momentum: float) -> "fused._Unit":
    return fused._Unit.of(eps, _from_momentum(momentum), [0] * (x.dim() - 2), params,
                          buffers or (None,) * 3, x.dtype, None)


@torch.library.custom_op("densekit::transition", mutates_args=())
def transition(x: Tensor, params: list[Tensor], buffers: list[Tensor], eps: float, momentum: float,
               training: bool) -> list[Tensor]:
    """The transition's output, its batch statistics (empty in eval mode) and the pooled
    BN-ReLU, which backward reads; the running statistics are the caller's to update."""
    unit = _transition_unit(x, params, buffers, eps, momentum)
    with torch.no_grad():
        out, _, mean, var, pooled = fused._transition_forward(unit, x, training, update=False)
    if not training:  # the running statistics: inputs, which an output may not be
        mean, var = x.new_empty(0, dtype=fused._acc(x.dtype)), x.new_empty(0, dtype=fused._acc(x.dtype))
    return [fused._grid(fused._rows(out).contiguous(), tuple(out.shape[2:])), mean, var, pooled]


def _pooled_spatial(x: Tensor) -> list[int]:
    return [s // 2 for s in x.shape[2:]]


@transition.register_fake
def _(x, params, buffers, eps, momentum, training):
    n, c, *spatial = x.shape
    half = _pooled_spatial(x)
    acc, stats = fused._acc(x.dtype), c if training else 0
    return [x.new_empty((n, *half, params[2].shape[0])).movedim(-1, 1), x.new_empty(stats, dtype=acc),
            x.new_empty(stats, dtype=acc), x.new_empty((n * math.prod(half), c))]


@torch.library.custom_op("densekit::transition_backward", mutates_args=())
def transition_backward(grad: Tensor, x: Tensor, stats: list[Tensor], params: list[Tensor], buffers: list[Tensor],
                        eps: float, momentum: float, training: bool) -> list[Tensor]:
    """The gradients of the transition's input and of (gamma, beta, conv weight), from its
    input, :func:`transition`'s batch statistics (the running ones in eval mode) and pooled
    BN-ReLU."""
    mean, var, pooled = stats
    unit = _transition_unit(x, params, buffers, eps, momentum)
    if not training:
        mean, var = unit.running_mean, unit.running_var
    grads = fused._transition_backward(unit, training, tuple(x.shape[2:]), fused._rows(x), mean, var, pooled, grad,
                                       True, True)
    return [g.to(p.dtype) for g, p in zip(grads, [x, *params])]


@transition_backward.register_fake
def _(grad, x, stats, params, buffers, eps, momentum, training):
    n, c, *spatial = x.shape
    return [x.new_empty((n, *spatial, c)).movedim(-1, 1), *[torch.empty_like(p) for p in params]]


def _setup_transition(ctx, inputs, output):
    x, params, buffers, eps, momentum, training = inputs
    ctx.structure = eps, momentum, training
    ctx.save_for_backward(x, *output[1:], *params, *([] if training else buffers))


def _transition_grads(ctx, grads):
    x, mean, var, pooled, *rest = ctx.saved_tensors
    result = transition_backward(grads[0], x, [mean, var, pooled], rest[:3], rest[3:], *ctx.structure)
    return result[0], result[1:], [None] * 3, None, None, None


transition.register_autograd(_transition_grads, setup_context=_setup_transition)


def run_transition(module, x: Tensor) -> Tensor:
    """``fused.fused_transition(module, x)`` through the operators (under torch.compile)."""
    unit = fused._Unit(module.norm, module.conv, x.dtype)
    training = module.norm.training  # its own mode, as in the fused transition
    outputs = transition(x, [unit.gamma, unit.beta, unit.master], [unit.running_mean, unit.running_var, unit.batches],
                         float(unit.eps), _momentum(unit), training)
    if training:
        with torch.no_grad():
            unit.update_running(outputs[1], outputs[2], x.numel() // x.shape[1])
    return outputs[0]


# -- the ImageNet stem's BN-ReLU-MaxPool ------------------------------------------------------

@torch.library.custom_op("densekit::stem_pool", mutates_args=())
def stem_pool(x: Tensor, weight: Tensor, bias: Tensor, running: list[Tensor], eps: float, kernel: list[int],
              stride: list[int], padding: list[int], training: bool) -> list[Tensor]:
    """max_pool(relu(batch_norm(x))) with the native passes (``fused_stem.py``), the batch
    statistics it normalized with (the running ones, ``running``, in eval mode) and each
    maximum's offset in its window, which backward reads; the running statistics are the
    caller's to update."""
    with torch.no_grad():
        if training:
            mean, var = fused._stats(_fused_stem._matrix(x))
        else:  # copies: an operator's output may not be one of its inputs
            mean, var = running[0].to(torch.float32, copy=True), running[1].to(torch.float32, copy=True)
        scale_shift = _fused_stem.bn_scale_shift(weight, bias, mean, var, eps)
        out, offsets = _fused_stem.relu_maxpool(x, (kernel, stride, padding), *scale_shift)
    return [out, mean, var, offsets]


@stem_pool.register_fake
def _(x, weight, bias, running, eps, kernel, stride, padding, training):
    n, c, *spatial = x.shape
    pooled = native.window_grid(spatial, kernel, stride, padding)
    return [x.new_empty((n, *pooled, c)).movedim(-1, 1), x.new_empty(c, dtype=torch.float32),
            x.new_empty(c, dtype=torch.float32), x.new_empty((n * math.prod(pooled), c), dtype=torch.uint8)]


@torch.library.custom_op("densekit::stem_pool_backward", mutates_args=())
def stem_pool_backward(grad: Tensor, x: Tensor, weight: Tensor, offsets: Tensor, mean: Tensor, var: Tensor,
                       eps: float, kernel: list[int], stride: list[int], padding: list[int],
                       training: bool, need_x: bool) -> list[Tensor]:
    """The gradients of :func:`stem_pool`'s x (empty without ``need_x``: a frozen conv0 and
    an input that needs none), weight and bias."""
    dx, dgamma, dbeta = _fused_stem.native_backward(grad, x, weight, offsets, mean, var, eps,
                                                    (kernel, stride, padding), training, need_x)
    return [dx if dx is not None else x.new_empty(0), dgamma.to(weight.dtype), dbeta.to(weight.dtype)]


@stem_pool_backward.register_fake
def _(grad, x, weight, offsets, mean, var, eps, kernel, stride, padding, training, need_x):
    n, c, *spatial = x.shape
    dx = x.new_empty((n, *spatial, c)).movedim(-1, 1) if need_x else x.new_empty(0)
    return [dx, torch.empty_like(weight), torch.empty_like(weight)]


def _setup_stem(ctx, inputs, output):
    x, weight, bias, running, eps, kernel, stride, padding, training = inputs
    ctx.structure, ctx.running = (eps, kernel, stride, padding, training), len(running)
    ctx.save_for_backward(x, weight, output[3], output[1], output[2])


def _stem_grads(ctx, grads):
    x, weight, offsets, mean, var = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    dx, dgamma, dbeta = stem_pool_backward(grads[0], x, weight, offsets, mean, var, *ctx.structure, need_x)
    return dx if need_x else None, dgamma, dbeta, [None] * ctx.running, None, None, None, None, None


stem_pool.register_autograd(_stem_grads, setup_context=_setup_stem)


def run_stem(norm, geometry: tuple, x: Tensor) -> Tensor:
    """``pool(relu(norm(x)))`` through the operators (under torch.compile), ``geometry`` the
    pooling's (kernel, stride, padding) as ``fused_stem.native_geometry`` gives them."""
    kernel, stride, padding = (list(v) for v in geometry)
    running = [] if norm.training else [norm.running_mean, norm.running_var]
    outputs = stem_pool(x, norm.weight, norm.bias, running, float(norm.eps), kernel, stride, padding,
                        norm.training)
    if norm.training:
        with torch.no_grad():
            fused.update_running_stats(norm.running_mean, norm.running_var, norm.num_batches_tracked,
                                       norm.momentum, outputs[1], outputs[2], x.numel() // x.shape[1])
    return outputs[0]


# -- the final norm in training ---------------------------------------------------------------

@torch.library.custom_op("densekit::batch_norm", mutates_args=())
def batch_norm(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
               momentum: float, eps: float) -> list[Tensor]:
    """Training-mode batch norm with torch's own CPU kernel
    (``aten._native_batch_norm_legit_functional``): the output, the batch mean and 1/std it
    normalized with (what backward reads) and the running statistics the update leaves, which
    the caller copies in. Inductor's code for the final norm of a compiled DenseNet-BC-100
    (64 x 49 x 342 values) took about 6 ms forward and 5 ms backward a step on a 2-core Zen 5
    EPYC, against 0.3 ms for the kernel (docs/performance.md)."""
    with torch.no_grad():
        out, mean, rstd, new_mean, new_var = torch.ops.aten._native_batch_norm_legit_functional(
            x, weight, bias, running_mean, running_var, True, momentum, eps)
    return [out, mean, rstd, new_mean, new_var]


@batch_norm.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps):
    # the statistics in the running statistics' dtype, as torch's CPU kernel returns them:
    # float32 beside a bf16 input under autocast, bf16 in a bf16 model (the aten op's own meta
    # function says float32 for both)
    stats = [x.new_empty(x.shape[1], dtype=running_mean.dtype) for _ in range(2)]
    return [torch.empty_like(x), *stats, torch.empty_like(running_mean), torch.empty_like(running_var)]


@torch.library.custom_op("densekit::batch_norm_backward", mutates_args=())
def batch_norm_backward(grad: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                        eps: float) -> list[Tensor]:
    """The gradients of :func:`batch_norm`'s x, weight and bias (``aten.native_batch_norm_backward``)."""
    dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(grad, x, weight, None, None, mean, rstd, True, eps,
                                                                   [True, True, True])
    return [dx, dweight, dbias]


@batch_norm_backward.register_fake
def _(grad, x, weight, mean, rstd, eps):
    return [torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)]


def _setup_norm(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, momentum, eps = inputs
    ctx.eps = eps
    ctx.save_for_backward(x, weight, output[1], output[2])


def _norm_grads(ctx, grads):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = batch_norm_backward(grads[0], x, weight, mean, rstd, ctx.eps)
    return dx, dweight, dbias, None, None, None, None


batch_norm.register_autograd(_norm_grads, setup_context=_setup_norm)


def takes_norm(norm, x: Tensor) -> bool:
    """Does :func:`run_norm` take ``norm`` on ``x``: a training-mode ``nn.BatchNorm`` (not a
    subclass) with affine parameters, running statistics and a momentum, unhooked (a hook sees
    the module's call, which the operator does not make), on the CPU, more than one value per
    channel? (In eval mode the compiler's code is one multiply-add; elsewhere it is its own.)"""
    return (type(norm) in fused._BN and fused._plain_bn(norm) and norm.training and norm.momentum is not None
            and _fused_stem.unhooked(norm) and x.device.type == "cpu" and x.dim() >= 2
            and x.numel() > x.shape[1])


def run_norm(norm, x: Tensor) -> Tensor:
    """``norm(x)`` through :func:`batch_norm` (under torch.compile), the running statistics
    and the count of batches updated as ``nn.BatchNorm`` updates them."""
    norm._check_input_dim(x)  # as the module's forward does
    outputs = batch_norm(x, norm.weight, norm.bias, norm.running_mean, norm.running_var, float(norm.momentum),
                         float(norm.eps))
    with torch.no_grad():
        norm.running_mean.copy_(outputs[3])
        norm.running_var.copy_(outputs[4])
        norm.num_batches_tracked.add_(1)
    return outputs[0]


# -- the final ReLU and global mean in training -------------------------------------------------

@torch.library.custom_op("densekit::relu_mean", mutates_args=())
def relu_mean(x: Tensor, dims: list[int]) -> Tensor:
    """``relu(x).mean(dims)`` with torch's own kernels. Inductor's code for the final ReLU where
    a gradient flows (its forward keeps a mask for backward) took 4.1-4.5 ms for BC-100's final
    maps (64 x 342 x 7 x 7 bf16, channels-last) against 0.2-0.35 ms for torch's kernels, and its
    backward with the mean's another 2.4 ms, on a 2-core Zen 5 EPYC (docs/performance.md)."""
    with torch.no_grad():
        return torch.relu(x).mean(_dims(x, dims))


def _dims(x: Tensor, dims: list[int]) -> list[int]:
    """``dims`` as non-negative dims of ``x``; at least one (``mean`` over none would reduce all)."""
    if not dims:
        raise ValueError("densekit::relu_mean needs at least one dim to average over")
    return [d % x.dim() for d in dims]


@relu_mean.register_fake
def _(x, dims):
    dims = _dims(x, dims)
    return x.new_empty([s for d, s in enumerate(x.shape) if d not in dims])


@torch.library.custom_op("densekit::relu_mean_backward", mutates_args=())
def relu_mean_backward(grad: Tensor, x: Tensor, dims: list[int]) -> Tensor:
    """The gradient of :func:`relu_mean`'s x, in x's memory layout (a channels-last gradient
    beside a channels-last input: see ``densenet._GlobalMean``)."""
    dims = _dims(x, dims)
    count = math.prod(x.shape[d] for d in dims)
    shape = [1 if d in dims else s for d, s in enumerate(x.shape)]
    spread = (grad / count).reshape(shape).expand(x.shape)
    return torch.ops.aten.threshold_backward.grad_input(spread, x, 0, grad_input=torch.empty_like(x))


@relu_mean_backward.register_fake
def _(grad, x, dims):
    return torch.empty_like(x)


def _setup_relu_mean(ctx, inputs, output):
    x, dims = inputs
    ctx.dims = dims
    ctx.save_for_backward(x)


def _relu_mean_grads(ctx, grad):
    x, = ctx.saved_tensors
    return relu_mean_backward(grad, x, ctx.dims), None


relu_mean.register_autograd(_relu_mean_grads, setup_context=_setup_relu_mean)
