"""A dense block as one fused operation: one feature buffer, no concatenations, lean backward.

The reference block concatenates every earlier map for each layer, so a block of L layers
copies O(L^2) channels and autograd keeps each layer's concatenation and its normalized,
rectified copy: memory quadratic in depth. torchvision's ``memory_efficient`` fix recomputes
the whole concatenate-BN-ReLU-Conv1x1 in backward and pays for it in speed.

Here each block allocates one buffer of ``in_channels + L*k`` channels; layer i reads the
first ``c_i`` channels of it (a view) and writes its k new channels once. Three facts make
the lean backward cheap:

- the batch statistics of a channel are the same for every layer that normalizes it, so
  they are computed once, when the channel is written (O(L) reductions instead of O(L^2));
- BN1-ReLU of the buffer is elementwise, so backward recomputes it from the buffer and the
  cached statistics instead of storing L copies of it;
- only the buffer and each layer's bottleneck output (``bn_size*k`` channels) are stored,
  so memory is linear in depth, and no convolution is ever run twice.

``supports_fused`` says when a block can take this path; other blocks take the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _plain_bn(bn: nn.Module) -> bool:
    return isinstance(bn, _BN) and bn.affine and bn.track_running_stats


def supports_fused(block) -> bool:
    """True when every layer of ``block`` is a stock dense layer the fused op can run."""
    for layer in block.values():
        if layer.input_index is not None or not _plain_bn(layer.norm1):
            return False
        if layer.has_bottleneck and not _plain_bn(layer.norm2):
            return False
    return True


class _Unit:
    """BN-ReLU-Conv, one half of a dense layer, as the tensors the fused op was given."""

    __slots__ = ("bn", "gamma", "beta", "weight", "padding")

    def __init__(self, bn: nn.Module, conv: nn.Module, dtype: torch.dtype):
        self.bn = bn
        self.gamma, self.beta = bn.weight, bn.bias
        # Under autocast the convolutions run in the autocast dtype; the cast happens
        # outside the op, so autograd carries the gradient back to the fp32 weight.
        self.weight = conv.weight if conv.weight.dtype == dtype else conv.weight.to(dtype)
        self.padding = list(conv.padding)

    def params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gamma, self.beta, self.weight

    def update_running(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        # nn.BatchNorm's rule: a fixed momentum, or a cumulative average when it is None.
        bn = self.bn
        bn.num_batches_tracked.add_(1)
        m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.mul_(1 - m).add_(mean, alpha=m)
        bn.running_var.mul_(1 - m).add_(var, alpha=m * count / max(count - 1, 1))

    def act(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """ReLU(BN(x)) with given statistics: the same op in forward and in the recompute."""
        return torch.relu_(F.batch_norm(x, mean, var, self.gamma, self.beta, False, 0.0, self.bn.eps))

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        n = x.dim() - 2
        return torch.convolution(x, self.weight, None, [1] * n, self.padding, [1] * n, False, [0] * n, 1)

    def conv_backward(self, grad: torch.Tensor, x: torch.Tensor, need_weight: bool):
        n = x.dim() - 2
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, self.weight, None, [1] * n, self.padding, [1] * n, False, [0] * n, 1,
            [True, need_weight, False])
        return grad_x, grad_w

    def bn_backward(self, grad: torch.Tensor, x: torch.Tensor, mean, var, training: bool, need):
        bn = self.bn
        if training:
            return torch.ops.aten.native_batch_norm_backward(
                grad, x, self.gamma, None, None, mean, torch.rsqrt(var + bn.eps), True, bn.eps, need)
        return torch.ops.aten.native_batch_norm_backward(
            grad, x, self.gamma, bn.running_mean, bn.running_var, None, None, False, bn.eps, need)


def _units(block, dtype: torch.dtype) -> list[list[_Unit]]:
    out = []
    for layer in block.values():
        units = [_Unit(layer.norm1, layer.conv1, dtype)]
        if layer.has_bottleneck:
            units.append(_Unit(layer.norm2, layer.conv2, dtype))
        out.append(units)
    return out


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance, in fp32."""
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
    return mean, var


def _forward(block, units, x: torch.Tensor, save: bool):
    """Run the block into one buffer; with ``save``, also return what backward needs."""
    layers = list(block.values())
    training = block.training
    n, c0 = x.shape[:2]
    k = block.growth_rate
    fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format
    buf = torch.empty((n, block.out_channels, *x.shape[2:]), dtype=x.dtype, device=x.device, memory_format=fmt)
    buf[:, :c0].copy_(x)
    count = x.numel() // c0
    saved: list[torch.Tensor] = []
    if training:
        mean = x.new_empty(block.out_channels, dtype=torch.float32)
        var = torch.empty_like(mean)
        mean[:c0], var[:c0] = _stats(x)
    with torch.no_grad():
        for i, (layer, us) in enumerate(zip(layers, units)):
            ci = c0 + i * k
            inp = buf[:, :ci]
            if training:
                us[0].update_running(mean[:ci], var[:ci], count)
                h = us[0].conv(us[0].act(inp, mean[:ci], var[:ci]))
            else:
                h = us[0].conv(us[0].act(inp, us[0].bn.running_mean, us[0].bn.running_var))
            if len(us) == 2:
                if training:
                    m2, v2 = _stats(h)
                    us[1].update_running(m2, v2, count)
                    out = us[1].conv(us[1].act(h, m2, v2))
                    if save:
                        saved += [h, m2, v2]
                else:
                    out = us[1].conv(us[1].act(h, us[1].bn.running_mean, us[1].bn.running_var))
                    if save:
                        saved.append(h)
            else:
                out = h
            if training and layer.drop_rate > 0:
                keep = 1.0 - layer.drop_rate
                mask = torch.empty_like(out).bernoulli_(keep).div_(keep)
                out.mul_(mask)
                if save:
                    saved.append(mask)
            buf[:, ci:ci + k].copy_(out)
            if training:
                mean[ci:ci + k], var[ci:ci + k] = _stats(out)
    stats = [mean, var] if training else []
    return buf, stats, saved


class _FusedDenseBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block, units, x, *params):
        buf, stats, saved = _forward(block, units, x, save=True)
        ctx.block, ctx.units, ctx.c0 = block, units, x.shape[1]
        ctx.training = block.training
        ctx.save_for_backward(buf, *stats, *saved)
        return buf

    @staticmethod
    def backward(ctx, grad_out):
        block, units, training = ctx.block, ctx.units, ctx.training
        buf, *rest = ctx.saved_tensors
        mean, var = (rest[0], rest[1]) if training else (None, None)
        saved = rest[2:] if training else rest
        layers = list(block.values())
        k = block.growth_rate
        grads: list[list] = [[None] * (3 * len(us)) for us in units]
        # The output is the buffer itself: its gradient accumulates what every later layer
        # sends back to the channels it read.
        grad_buf = grad_out.clone(memory_format=torch.preserve_format)
        pos = len(saved)
        for i in reversed(range(len(layers))):
            us, gl = units[i], grads[i]
            ci = ctx.c0 + i * k
            g = grad_buf[:, ci:ci + k]
            if training and layers[i].drop_rate > 0:
                pos -= 1
                g = g * saved[pos]
            if len(us) == 2:
                u2 = us[1]
                if training:
                    pos -= 3
                    h, m2, v2 = saved[pos:pos + 3]
                else:
                    pos -= 1
                    h, m2, v2 = saved[pos], u2.bn.running_mean, u2.bn.running_var
                a = u2.act(h, m2, v2)
                g, gl[5] = u2.conv_backward(g, a, u2.weight.requires_grad)
                g = torch.ops.aten.threshold_backward(g, a, 0)
                del a
                g, gl[3], gl[4] = u2.bn_backward(g, h, m2, v2, training,
                                                 [True, u2.gamma.requires_grad, u2.beta.requires_grad])
            u1 = us[0]
            inp = buf[:, :ci]
            m1, v1 = (mean[:ci], var[:ci]) if training else (u1.bn.running_mean, u1.bn.running_var)
            a = u1.act(inp, m1, v1)
            g, gl[2] = u1.conv_backward(g, a, u1.weight.requires_grad)
            g = torch.ops.aten.threshold_backward(g, a, 0)
            del a
            g, gl[0], gl[1] = u1.bn_backward(g, inp, m1, v1, training,
                                             [True, u1.gamma.requires_grad, u1.beta.requires_grad])
            grad_buf[:, :ci] += g
        return (None, None, grad_buf[:, :ctx.c0], *[g for gl in grads for g in gl])


def fused_dense_block(block, x: torch.Tensor) -> torch.Tensor:
    """Run ``block`` (a :class:`DenseBlock`) on ``x`` as one fused op; same function as
    ``block.forward_plain(x)``, gradients included."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return _run(block, x.to(dtype))
    return _run(block, x)


def _run(block, x: torch.Tensor) -> torch.Tensor:
    units = _units(block, x.dtype)
    params = [p for us in units for u in us for p in u.params()]
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return _FusedDenseBlock.apply(block, units, x, *params)
    with torch.no_grad():
        return _forward(block, units, x, save=False)[0]
