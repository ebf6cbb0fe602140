"""The ImageNet stem's BN-ReLU-MaxPool in training, keeping only its input for backward.

torchvision's stem (conv0, norm0, relu0, pool0: Huang et al., CVPR 2017, table 1) runs at a
quarter of the input's resolution before the pooling and at the largest resolution of the
network. Autograd keeps three full-size tensors of it for backward: the batch norm's input,
the ReLU's output (read by the ReLU's and the pooling's backward) and the pooling's argmax
indices (int64: four times the size of a bf16 map). For densenet121 at 224 px, batch 16, in
bf16 that is 73.5 MiB, all held until the very end of backward, when the first dense block's
backward, the largest, has already run. :func:`stem_pool` keeps only the batch norm's input
(the convolution's output, 24.5 MiB there) and recomputes BN-ReLU-MaxPool from it in
backward: about a tenth of the stem's convolution in arithmetic, elementwise passes over one
map (docs/performance.md#cpu).

It is torch's own ops in both directions (any device, 1D to 3D): the forward is the modules'
own call, so running statistics update exactly as theirs do, once; backward recomputes the
same function from the saved input with the batch's statistics (training) or the running ones
as they were at the forward (an eval-mode norm; kept, one value per channel), without touching
the running statistics, and differentiates it with autograd. Only torch's own modules, without
hooks, take this path: a subclass may compute something else, and a hook would miss the calls
the one op does not make. The recomputed forward runs the same kernels on the same input, so the pooling picks
the same maxima.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .fused import _plain_bn

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
    modules = (norm, relu, pool)
    return (torch.is_grad_enabled() and type(norm) in _NORM and _plain_bn(norm) and type(relu) is nn.ReLU
            and type(pool) in _MAX_POOL and not pool.return_indices
            and not any(getattr(m, h) for m in modules for h in _HOOKS)
            and not any(getattr(nn.modules.module, h, None) for h in _GLOBAL_HOOKS)
            and (x.requires_grad or norm.weight.requires_grad or norm.bias.requires_grad))


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


class _StemPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, norm, pool, x, weight, bias):
        ctx.norm, ctx.pool = norm, pool
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        # in eval mode the running statistics as they are now: the model may train on another
        # batch, updating them, before this backward runs
        running = [] if norm.training else [norm.running_mean.clone(), norm.running_var.clone()]
        ctx.save_for_backward(x, weight, bias, *running)
        with torch.no_grad():
            return pool(F.relu(norm(x), inplace=True))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, bias, *running = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            inputs = [t.detach().requires_grad_(need) for t, need in zip((x, weight, bias), needs)]
            out = _recompute(ctx.norm, ctx.pool, *inputs, running or None)
            wanted = [t for t, need in zip(inputs, needs) if need]
            grads = iter(torch.autograd.grad(out, wanted, grad))
        return None, None, *[next(grads) if need else None for need in needs]
