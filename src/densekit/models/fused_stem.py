"""The ImageNet stem's BN-ReLU-MaxPool in training, keeping only its input for backward.

torchvision's stem (conv0, norm0, relu0, pool0: Huang et al., CVPR 2017, table 1) runs at a
quarter of the input's resolution before the pooling and at the largest resolution of the
network. Autograd keeps three full-size tensors of it for backward: the batch norm's input,
the ReLU's output (read by the ReLU's and the pooling's backward) and the pooling's argmax
indices (int64: four times the size of a bf16 map). For densenet121 at 224 px, batch 16, in
bf16 that is 73.5 MiB, all held until the very end of backward, when the first dense block's
backward, the largest, has already run. :func:`stem_pool` keeps the batch norm's input (the
convolution's output, 24.5 MiB there; on the CPU one byte more per pooled value, below) and
computes the gradients from it in backward.

The forward calls the batch norm module itself, so running statistics update exactly as the
module updates them, once. Off the CPU (or for a pooling the native pass does not take),
backward recomputes the same function with torch's ops from the saved input with the batch's
statistics (training) or the running ones as they were at the forward (an eval-mode norm;
kept, one value per channel), without touching the running statistics, and differentiates it
with autograd: about a tenth of the stem's convolution in arithmetic, and the same kernels on
the same input pick the same maxima. Only torch's own modules, without hooks, take this op: a
subclass may compute something else, and a hook would miss the calls the one op does not
make.

On the CPU (float32 or bf16, a max pooling without dilation or ceil mode) the ReLU and the
pooling after the batch norm module run as one native pass (``native.relu_maxpool``) that
also keeps one byte per pooled value: where in its window the maximum was (an eighth of
torch's int64 indices, 3 MiB for densenet121 at 224 px, batch 16). Backward then recomputes
only the batch's statistics: two native passes over the input, its gradient and those
offsets give the batch norm's input gradient, dgamma and dbeta, summed in float32 and rounded
once, where torch's ops run six passes (batch norm, ReLU, pooling with indices, and the three
backwards) rounding to bf16 at each. On densenet121's stem at 224 px, batch 16, bf16
channels-last (AMD EPYC Zen 5, 2 cores; an ad-hoc script alternating the two in one process,
medians of 10): forward and backward 19.7-21.1 ms against 32.0-34.0 ms; the whole training
step 0.567 against 0.581 s (1.015x). In float32 the gradients equal the modules' to float32
rounding; in bf16 they are closer to the float64 ones than the modules' (the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _ntuple

from . import native
from .fused import _grid, _plain_bn, _rows, _stats, bn_coefficients

_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_MAX_POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def supports_stem_pool(norm: nn.Module, relu: nn.Module, pool: nn.Module, x: torch.Tensor) -> bool:
    """Does :func:`stem_pool` run ``pool(relu(norm(x)))``: torch's own affine batch norm with
    running statistics, ReLU and max pooling without indices (not subclasses, which may compute
    something else), none of them hooked (a hook sees each module's call, which the one op does
    not make), while autograd records a gradient that flows through them?"""
    return torch.is_grad_enabled() and _plain_stem(norm, relu, pool) and _gradient_flows(norm, x)


def _plain_stem(norm: nn.Module, relu: nn.Module, pool: nn.Module) -> bool:
    return (type(norm) in _NORM and _plain_bn(norm) and type(relu) is nn.ReLU
            and type(pool) in _MAX_POOL and not pool.return_indices and unhooked(norm, relu, pool))


def unhooked(*modules: nn.Module) -> bool:
    """Are ``modules`` free of hooks, and no global module hook set? A hook sees each module's
    call, which one operation in their place does not make."""
    return (not any(getattr(m, h) for m in modules for h in _HOOKS)
            and not any(getattr(nn.modules.module, h, None) for h in _GLOBAL_HOOKS))


def _gradient_flows(norm: nn.Module, x: torch.Tensor) -> bool:
    return x.requires_grad or norm.weight.requires_grad or norm.bias.requires_grad


def inference_geometry(norm: nn.Module, relu: nn.Module, pool: nn.Module, x: torch.Tensor) -> tuple | None:
    """Where no gradient flows through the stem (inference, or fine-tuning with it frozen) and
    norm0 is in eval mode: the pooling's (kernel, stride, padding) if :func:`inference_pool`
    runs ``pool(relu(norm(x)))`` in one native pass, else None (the modules run)."""
    if norm.training or (torch.is_grad_enabled() and _gradient_flows(norm, x)) or not _plain_stem(norm, relu, pool):
        return None
    return native_geometry(pool, x)


def inference_pool(norm: nn.Module, geometry: tuple, x: torch.Tensor) -> torch.Tensor:
    """``pool(relu(norm(x)))`` for an eval-mode ``norm`` in one native pass (no batch norm
    output in memory): 6.5 ms against 12.3 ms for the modules on densenet121's stem at 224 px,
    batch 16, bf16 channels-last; the optimized model's forward 1.034-1.035x as fast in two
    same-process A/Bs, 1.17x in a third (AMD EPYC Zen 5, 2 cores, ad hoc)."""
    with torch.no_grad():
        scale_shift = bn_scale_shift(norm.weight, norm.bias, norm.running_mean.float(), norm.running_var.float(),
                                     norm.eps)
        return relu_maxpool(x, geometry, *scale_shift, arg=False)[0]


def bn_scale_shift(weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """BN(x) = x * scale + shift per channel for float32 statistics, in float32."""
    scale = weight.float() * torch.rsqrt(var + eps)
    return scale, bias.float() - mean * scale


def stem_pool(norm: nn.Module, pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``pool(relu(norm(x)))`` with the same gradients, keeping only ``x`` for backward (see the
    module docstring and :func:`supports_stem_pool`)."""
    return _StemPool.apply(norm, pool, x, norm.weight, norm.bias)


def _recompute(norm: nn.Module, pool: nn.Module, x: torch.Tensor, weight, bias, running) -> torch.Tensor:
    if running is None:
        # training: the batch's statistics, as the forward used them. Copies of the running ones,
        # which momentum 0 leaves as they are, make it the same call as the forward's on every
        # backend; the module's own stay untouched.
        y = F.batch_norm(x, norm.running_mean.clone(), norm.running_var.clone(), weight, bias, True, 0.0, norm.eps)
    else:  # eval mode: the running statistics as they were at the forward
        y = F.batch_norm(x, running[0], running[1], weight, bias, False, 0.0, norm.eps)
    return pool(F.relu(y, inplace=True))  # the batch norm's backward reads its input, not its output


def native_geometry(pool: nn.Module, x: torch.Tensor) -> tuple | None:
    """(kernel, stride, padding) of ``pool`` where the native passes run it on ``x`` (the
    batch norm's input): a batched input of the pooling's own dims (a MaxPool2d on 4D, say:
    torch reads another rank as an unbatched sample, or refuses it), float32 or bf16 on the
    CPU, under autocast's dtype or none, a max pooling without dilation or ceil mode whose
    settings torch accepts; else None, and the modules run (raising torch's own errors)."""
    dims = x.dim() - 2
    if type(pool) not in _MAX_POOL or dims != _MAX_POOL.index(type(pool)) + 1 or pool.ceil_mode \
            or not native.available() or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) \
            or not x.numel():
        return None
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") not in (torch.float32, torch.bfloat16):
        return None
    tup = _ntuple(dims)
    stride = pool.stride if pool.stride not in (None, [], ()) else pool.kernel_size  # empty: the kernel, as torch
    try:
        kernel, stride, padding, dilation = tup(pool.kernel_size), tup(stride), tup(pool.padding), tup(pool.dilation)
    except TypeError:
        return None
    if len(dilation) != dims or any(d != 1 for d in dilation) \
            or native.maxpool_misfit(tuple(x.shape[2:]), kernel, stride, padding) is not None:
        return None
    return kernel, stride, padding


class _StemPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, norm, pool, x, weight, bias):
        ctx.norm, ctx.pool = norm, pool
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        # in eval mode the running statistics as they are now: the model may train on another
        # batch, updating them, before this backward runs
        running = [] if norm.training else [norm.running_mean.clone(), norm.running_var.clone()]
        geometry = native_geometry(pool, x)  # before norm(x): its running statistics update
        with torch.no_grad():
            y = norm(x)
            ctx.geometry = geometry if y.dtype == x.dtype else None
            if ctx.geometry is None:
                ctx.save_for_backward(x, weight, bias, *running)
                return pool(F.relu(y, inplace=True))
            out, offsets = relu_maxpool(y, ctx.geometry)
            ctx.save_for_backward(x, weight, bias, offsets, *running)
            return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if ctx.geometry is not None:
            x, weight, bias, offsets, *running = ctx.saved_tensors
            # the batch's statistics again (training: None), or the running ones of the forward
            stats = (running[0].float(), running[1].float()) if running else (None, None)
            dx, dgamma, dbeta = native_backward(grad, x, weight, offsets, *stats, ctx.norm.eps, ctx.geometry,
                                                not running, ctx.needs_input_grad[2])
            return None, None, dx, dgamma.to(weight.dtype), dbeta.to(bias.dtype)
        x, weight, bias, *running = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            inputs = [t.detach().requires_grad_(need) for t, need in zip((x, weight, bias), needs)]
            out = _recompute(ctx.norm, ctx.pool, *inputs, running or None)
            wanted = [t for t, need in zip(inputs, needs) if need]
            grads = iter(torch.autograd.grad(out, wanted, grad))
        return None, None, *[next(grads) if need else None for need in needs]


def _matrix(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> the (rows, C) matrix the native passes read: a view where ``t`` is
    channels-last, else a copy (a batch of one in NCHW layout gives a view with strided columns)."""
    rows = _rows(t)
    return rows if rows.stride(1) == 1 or rows.shape[1] == 1 else rows.contiguous()


def relu_maxpool(y: torch.Tensor, geometry: tuple, scale: torch.Tensor | None = None,
                 shift: torch.Tensor | None = None, arg: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """max_pool(relu(y * scale + shift)) (relu(y) without them) as a channels-last (N, C,
    *pooled) tensor, and with ``arg`` each maximum's offset in its window
    (:func:`native.relu_maxpool`)."""
    spatial = tuple(y.shape[2:])
    out, offsets = native.relu_maxpool(_matrix(y), spatial, *geometry, scale, shift, arg=arg)
    return _grid(out, native.window_grid(spatial, *geometry)), offsets


def native_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                    mean: torch.Tensor | None, var: torch.Tensor | None, eps: float, geometry: tuple,
                    training: bool, need_x: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(gradient of x or None, dgamma, dbeta) of max_pool(relu(batch_norm(x))) from the input,
    the maxima's offsets the native forward kept and the statistics it normalized with (None:
    the batch's, computed here again): the batch norm's backward in two native passes (dgamma
    and dbeta in float32)."""
    spatial = tuple(x.shape[2:])
    rows = _matrix(x)
    if mean is None:
        mean, var = _stats(rows)
    invstd = torch.rsqrt(var + eps)
    g = _matrix(grad.to(x.dtype))
    sum_d, sum_dx = native.maxpool_bn_sums(g, offsets, rows, spatial, *geometry, mean)
    dgamma = sum_dx * invstd
    grad_x = None
    if need_x:
        k, b, c = bn_coefficients(weight.float(), invstd, dgamma, sum_d, rows.shape[0], training)
        grad_x = _grid(native.unmaxpool_bn_grad(g, offsets, rows, spatial, *geometry, k, mean, b, c), spatial)
    return grad_x, dgamma, sum_d
