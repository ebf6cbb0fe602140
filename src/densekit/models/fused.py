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
  so memory is linear in depth, and no convolution is run twice; a layer with
  ``memory_efficient`` set (torchvision's flag) keeps not even its bottleneck, which
  backward recomputes with one more 1x1 convolution.

The buffer is laid out channels-last whatever the input's layout, and every per-channel
op works on it as an (N*spatial, C) matrix: layer i's input is then a plain column slice
that batch norm, its backward and the 1x1 convolution (a matrix product) read in place,
with no gather into a contiguous copy. On 2 CPU cores this is what makes the block faster
than the reference rather than only leaner (docs/performance.md).

``unsupported_reason`` says when a block cannot take this path; such blocks take the reference.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import native

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _plain_bn(bn: nn.Module) -> bool:
    return isinstance(bn, _BN) and bn.affine and bn.track_running_stats


_UNIT = {1: (1,), 2: (1, 1), 3: (1, 1, 1)}


def _plain_conv(conv: nn.Module) -> bool:
    """A convolution the fused ops run from its weight and padding alone."""
    return (isinstance(conv, _CONV) and conv.bias is None and conv.groups == 1 and conv.padding_mode == "zeros"
            and conv.stride == conv.dilation == _UNIT[len(conv.stride)])


def _stock_half(norm: nn.Module, relu: nn.Module, conv: nn.Module, training: bool) -> bool:
    return _plain_bn(norm) and norm.training == training and type(relu) is nn.ReLU and _plain_conv(conv)


def unsupported_reason(block) -> str | None:
    """None when every layer of ``block`` is a stock dense layer the fused op can run in the
    block's mode; else why not, naming the first layer that is not. Checked at every call,
    since a layer may be swapped or set to eval at any time (a batch norm set to eval inside a
    training block, as when fine-tuning with frozen statistics, takes the reference path)."""
    training = block.training
    for name, layer in block.items():
        m = layer._modules
        index = layer.input_index
        if index is not None and (index.dtype != torch.int64 or index.dim() != 1
                                  or index.numel() != m["norm1"].num_features):
            return f"{name}'s input_index does not list its norm1's {m['norm1'].num_features} channels"
        if layer.training != training:
            return f"{name} is in {'training' if layer.training else 'eval'} mode inside a block that is not"
        if not _stock_half(m["norm1"], m["relu1"], m["conv1"], training) or \
                (layer.bn_size and not _stock_half(m["norm2"], m["relu2"], m["conv2"], training)):
            return f"{name} holds a module other than the stock BatchNorm, ReLU and bias-free convolution"
    return None


def supports_fused(block) -> bool:
    return unsupported_reason(block) is None


class _Unit:
    """BN-ReLU-Conv, one half of a dense layer, on (rows, channels) matrices.

    Rows are the N*spatial positions. A 1x1 convolution is a matrix product on them; a
    larger one runs on the channels-last view of the same memory. Large temporaries go
    into workspaces the caller allocates once per block: on the CPU a fresh tensor of tens
    of MB costs more in page faults than the arithmetic done in it.
    """

    __slots__ = ("eps", "momentum", "gamma", "beta", "running_mean", "running_var", "batches", "weight",
                 "master", "padding", "index")

    def __init__(self, bn: nn.Module, conv: nn.Module, dtype: torch.dtype, index: torch.Tensor | None = None):
        self._set(bn.eps, bn.momentum, list(conv.padding), (bn.weight, bn.bias, conv.weight),
                  (bn.running_mean, bn.running_var, bn.num_batches_tracked), dtype, index)

    @classmethod
    def of(cls, eps: float, momentum: float | None, padding: list[int], params, buffers, dtype: torch.dtype,
           index: torch.Tensor | None) -> "_Unit":
        """A unit from the batch norm's eps and momentum, the convolution's padding, (gamma,
        beta, conv weight) and (running mean, running var, batches tracked): the custom
        operator's arguments (``fused_op.py``)."""
        unit = cls.__new__(cls)
        unit._set(eps, momentum, padding, params, buffers, dtype, index)
        return unit

    def _set(self, eps, momentum, padding, params, buffers, dtype, index) -> None:
        self.eps, self.momentum, self.padding = eps, momentum, padding
        self.index = index  # the buffer channels a pruned layer reads (None: all before it)
        (self.gamma, self.beta, master), (self.running_mean, self.running_var, self.batches) = params, buffers
        # Under autocast the convolutions run in the autocast dtype; the cast happens
        # outside the op, so autograd carries the gradient back to the fp32 weight.
        self.weight = master if master.dtype == dtype else master.to(dtype)
        self.master = master  # fp32, for folding a scale in before one rounding

    def select(self, t: torch.Tensor) -> torch.Tensor:
        """The entries of a per-channel vector of the buffer's first channels that this unit reads."""
        return t if self.index is None else t.index_select(0, self.index)

    def read(self, rows: torch.Tensor, scratch: "_Scratch") -> torch.Tensor:
        """The (rows, channels) input this unit reads from ``rows``, the buffer's first channels:
        a view of them, or for a pruned layer its channels gathered into the "g" workspace."""
        if self.index is None:
            return rows
        return _gather_cols(rows, self.index, scratch("g", self.index.numel()))

    def read_act(self, rows: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, scratch: "_Scratch"):
        """ReLU(x * scale + shift) of what :meth:`read` returns (:meth:`scale_shift` of this unit's
        statistics); a pruned layer's gather and BN-ReLU in one native pass where it can."""
        if self.index is not None:
            out = scratch("a", self.index.numel())
            if native.usable(rows, out):
                return native.gather_cols(rows, self.index, out, scale, shift)
        inp = self.read(rows, scratch)
        return _bn_relu(inp, scale, shift, scratch("a", inp.shape[1]))

    def running_scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`scale_shift` of the running statistics (eval mode)."""
        return self.scale_shift(*_running(self))

    def add_back(self, grad: torch.Tensor, rows_grad: torch.Tensor) -> None:
        """Adds ``grad``, the gradient of what :meth:`read` returned, to the buffer's ``rows_grad``."""
        _scatter_add_cols(grad, self.index, rows_grad)

    def params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gamma, self.beta, self.weight

    @property
    def pointwise(self) -> bool:
        return all(k == 1 for k in self.weight.shape[2:])

    def as_matrix(self, a: torch.Tensor) -> bool:
        """Run this 1x1 convolution's forward as a matrix product on (rows, C)? On CUDA and in
        1D, yes. On the CPU in 2D and 3D oneDNN's channels-last 1x1 convolution is several
        times faster than the GEMM on these tall, thin matrices, and the (rows, C) matrix
        already is its input. In backward the input gradient is a GEMM everywhere: oneDNN's
        returns it in a fresh tensor, and on the CPU one over glibc's 32 MiB mmap limit is
        page-faulted in anew at every call, which takes about twice as long as a GEMM that
        writes into a workspace (docs/performance.md, "Single operations")."""
        return self.pointwise and (a.is_cuda or self.weight.dim() == 3)

    def update_running(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        update_running_stats(self.running_mean, self.running_var, self.batches, self.momentum, mean, var, count)

    def scale_shift(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BN(x) = x * scale + shift per channel, for the given statistics."""
        scale = self.gamma * torch.rsqrt(var + self.eps)
        return scale, self.beta - mean * scale

    def act(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """ReLU(BN(x)) into ``out``: the same op in forward and in the recompute of backward."""
        return _bn_relu(x, *self.scale_shift(mean, var), out)

    def conv_act(self, rows: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor | None:
        """This 1x1 convolution of ReLU(rows * scale + shift) as (rows, c_out), by the native
        product with its BN-ReLU prologue (``native.Pointwise``), where it runs: bfloat16 on the
        CPU, at most ``native.POINTWISE_MAX_OUT`` outputs (a bottleneck's ``bn_size * k``); a
        pruned layer's columns of ``rows`` gathered in the same tile. The BN-ReLU output then
        never reaches memory; on BC-100's first block it took 1.9 ms against 3.1 ms for the
        native BN-ReLU and oneDNN's product (120 channels, batch 64, AMD EPYC Zen 4;
        docs/performance.md). Else None."""
        if not self.pointwise or rows.dtype != torch.bfloat16 or rows.stride(1) != 1 \
                or self.weight.shape[0] > native.POINTWISE_MAX_OUT or not native.usable(rows) \
                or not native.conv3x3_supported(rows.dtype):
            return None
        conv = native.Pointwise(self.weight, None, rows.dtype, relu=False, index=self.index, width=rows.shape[1])
        return conv(rows, scale=scale, shift=shift)

    def conv(self, a: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
        """(rows, c_in) -> the conv output as (N, c_out, *spatial), channels-last when 1x1 or
        run by the native 3x3 convolution (bfloat16 on the CPU, see :meth:`_direct`)."""
        direct = self._direct(a, spatial)
        if direct is not None:
            return _grid(direct(a, spatial, a.new_empty(a.shape[0], self.weight.shape[0])), spatial)
        if self.as_matrix(a):
            out = a @ self.weight.flatten(1).t()
            return out.view(-1, *spatial, out.shape[1]).movedim(-1, 1)
        n = len(spatial)
        return torch.convolution(_grid(a, spatial), self.weight, None, [1] * n, self.padding, [1] * n,
                                 False, [0] * n, 1)

    def _direct(self, a: torch.Tensor, spatial: tuple[int, ...]) -> "native.Conv3x3 | None":
        """A :class:`native.Conv3x3` of this weight where it runs this convolution: 2D, 3x3,
        padding 1, at most ``native.CONV3X3_MAX_OUT`` outputs, bfloat16 (a DenseNet-BC layer's
        last convolution under bf16 autocast: 1.49 against 1.61 ms for oneDNN's on BC-100's
        first block, 86 against 151 us on its last, AMD EPYC Zen 4), else None."""
        w = self.weight
        if a.dtype != torch.bfloat16 or w.dim() != 4 or tuple(w.shape[2:]) != (3, 3) or list(self.padding) != [1, 1] \
                or w.shape[0] > native.CONV3X3_MAX_OUT or a.stride(1) != 1 or not native.usable(a) \
                or not native.conv3x3_supported(a.dtype):
            return None
        return native.Conv3x3(w, a.dtype)

    def conv_folded_relu(self, a: torch.Tensor, following: "_Unit", spatial: tuple[int, ...],
                         scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """ReLU(BN(conv(a))) for a 1x1 conv whose output feeds ``following``'s batch norm in
        eval mode: the BN is an affine map per output channel, so it folds into the weight
        (scaled rows) and a bias, and the convolution's bias add (and on CUDA the GEMM's ReLU
        epilogue) replaces a separate pass over the bottleneck output. ``scale_shift``:
        ``following``'s :meth:`running_scale_shift`, where the caller has it.
        (rows, c_in) -> (rows, c_out)."""
        weight, bias = self._folded(scale_shift or following.running_scale_shift(), a.dtype)
        if not self.as_matrix(a):
            n = self.weight.dim() - 2
            out = torch.convolution(_grid(a, spatial), weight, bias, [1] * n, [0] * n, [1] * n, False, [0] * n, 1)
            return _rows(out).relu_()
        if a.is_cuda and hasattr(torch, "_addmm_activation"):
            return torch._addmm_activation(bias, a, weight.flatten(1).t())
        return torch.addmm(bias, a, weight.flatten(1).t()).relu_()

    def _folded(self, scale_shift, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This convolution's weight and a bias with an eval-mode batch norm after it folded in
        (its scale and shift)."""
        scale, shift = scale_shift
        weight = (self.master * scale.view(-1, *[1] * (self.master.dim() - 1))).to(dtype)
        return weight, shift.to(dtype)

    def conv_backward(self, grad: torch.Tensor, a: torch.Tensor, spatial: tuple[int, ...],
                      out: torch.Tensor, need_weight: bool):
        """``grad`` is (N, c_out, *spatial), any layout. Returns the gradient of ``a`` as (rows,
        c_in), written into ``out()``, a workspace allocated only where needed (a 3x3
        convolution's comes channels-last from oneDNN in 2D on the CPU: no copy), and the
        weight's gradient."""
        n = len(spatial)
        if self.pointwise:  # the input gradient is a GEMM into the workspace ``out``
            g = _rows(grad)
            grad_w = None
            if need_weight and self.as_matrix(a):
                grad_w = (g.t() @ a).view_as(self.weight)
            elif need_weight:  # oneDNN's, as fast and, summing over rows in blocks, more accurate
                grad_w = torch.ops.aten.convolution_backward(
                    _grid(g, spatial), _grid(a, spatial), self.weight, None, [1] * n, [0] * n, [1] * n, False,
                    [0] * n, 1, [False, True, False])[1]
            return torch.mm(g, self.weight.flatten(1), out=out()), grad_w
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, _grid(a, spatial), self.weight, None, [1] * n, self.padding, [1] * n, False,
            [0] * n, 1, [True, need_weight, False])
        if grad_x.is_contiguous(memory_format=_channels_last(n)):
            return _rows(grad_x), grad_w  # already (rows, c_in) in memory: no copy
        rows = out()
        _grid(rows, spatial).copy_(grad_x)
        return rows, grad_w

    def sum_grad_times_input(self, grad_w: torch.Tensor | None, a: torch.Tensor) -> torch.Tensor | None:
        """Sum over rows of (gradient of ``a``) * ``a`` per input channel, from the weights.

        The convolution is linear in its input, so for each input channel c
        sum_r dA[r, c] * a[r, c] = sum over c's weights of W * dW (the adjoint identity):
        O(weights) work instead of a pass over the (rows, c_in) activations. Used on the
        CPU in float32 from ``_SHORTCUT_MIN_ROWS`` rows on, where that pass is a tenth of a
        training step; under bf16 dW is rounded too coarsely for the cancellation in
        :meth:`bn_backward` (None: not used).
        """
        if grad_w is None or a.device.type != "cpu" or a.dtype != torch.float32 or a.shape[0] < _SHORTCUT_MIN_ROWS:
            return None
        return (self.weight * grad_w).transpose(0, 1).flatten(1).sum(1)

    def bn_backward(self, dy: torch.Tensor, x: torch.Tensor, mean, var, scratch: torch.Tensor,
                    training: bool, centered: bool = False, sum_dy_a: torch.Tensor | None = None):
        """Batch-norm backward on rows, ``dy`` already through the ReLU; ``x`` is the input,
        or the input less its mean when ``centered``; ``sum_dy_a`` is the optional result of
        :meth:`sum_grad_times_input` for the ReLU output a.

        Returns (k, b, c, dgamma, dbeta) with dx = dy*k + (x - mean)*b + c: a dense block
        sums the (x - mean)*b + c parts of every layer that read a channel and applies them
        once, so they cost O(L) passes over the buffer, not O(L^2). Written with x - mean
        rather than as x*b + c', which cancels to a small difference of large terms when a
        channel's mean is far larger than its spread.
        """
        invstd = torch.rsqrt(var + self.eps)
        sum_dy = dy.sum(0, dtype=_acc(dy.dtype))
        if sum_dy_a is None:
            sum_dy_x = torch.mul(dy, x, out=scratch).sum(0, dtype=_acc(dy.dtype))
            dgamma = (sum_dy_x if centered else sum_dy_x - mean * sum_dy) * invstd
        else:
            dgamma = self._dgamma_from_output(dy, x, mean, invstd, sum_dy, sum_dy_a, centered)
        return (*self._coefficients(invstd, dgamma, sum_dy, x.shape[0], training), dgamma, sum_dy)

    def _coefficients(self, invstd, dgamma, sum_dy, m: int, training: bool):
        """:func:`bn_coefficients` of this unit's batch norm."""
        return bn_coefficients(self.gamma, invstd, dgamma, sum_dy, m, training)

    def input_grad_(self, d, a, x, mean, var, training: bool, work, sum_dy_a=None):
        """Backward of a = ReLU(BN(x)) on rows: ``d``, the gradient of a, becomes the gradient
        of x, in place; ``a`` is overwritten. ``work()`` returns a workspace of x's shape, which
        only the path without native kernels needs (it is then allocated). Returns (dgamma, dbeta)."""
        if native.usable(d, a, x):
            invstd = torch.rsqrt(var + self.eps)
            sum_dy, sum_dyx = native.relu_bn_sums(d, a, dout=d, x=x if sum_dy_a is None else None, mean=mean)
            k, b, c, dgamma = self._native_coefficients(d, a, x, mean, invstd, training, sum_dy, sum_dyx, sum_dy_a)
            if training:
                native.bn_grad_apply(d, x, mean, b, c, k)
            else:
                d.mul_(k)
            return dgamma, sum_dy
        _relu_backward_(d, a)
        xc = torch.sub(x, mean, out=a)  # a is spent; see bn_backward on centering
        k, b, c, dgamma, dbeta = self.bn_backward(d, xc, mean, var, work(), training, True, sum_dy_a)
        d.mul_(k.to(d.dtype))
        if training:
            d.addcmul_(xc, b.to(d.dtype)).add_(c.to(d.dtype))
        return dgamma, dbeta

    def accumulate_input_grad(self, d, a, x, mean, var, training: bool, acc, sum_dy_a=None, src=None):
        """Backward of a = ReLU(BN(x)) on rows where x is a slice of the block's buffer: adds
        the dy*k part of x's gradient to ``acc`` (with ``src``: acc = src + that part; ``d``
        and ``a`` may be overwritten) and returns (b, c, dgamma, dbeta); the caller applies the
        (x - mean)*b + c part once per channel. Where :meth:`whole_backward` runs, it does this."""
        if native.usable(d, a, x, acc):
            invstd = torch.rsqrt(var + self.eps)
            sum_dy, sum_dyx = native.relu_bn_sums(d, a, x=x if sum_dy_a is None else None, mean=mean, acc=acc,
                                                  k=self.gamma * invstd, src=src)
            _, b, c, dgamma = self._native_coefficients(d, a, x, mean, invstd, training, sum_dy, sum_dyx, sum_dy_a)
            return b, c, dgamma, sum_dy
        if src is not None:
            acc.copy_(src)
        _relu_backward_(d, a)
        k, b, c, dgamma, dbeta = self.bn_backward(d, x, mean, var, a, training, sum_dy_a=sum_dy_a)
        acc.addcmul_(d, k.to(d.dtype))
        return b, c, dgamma, dbeta

    def whole_backward(self, g: torch.Tensor, x: torch.Tensor, scale_shift, mean: torch.Tensor, var: torch.Tensor,
                       training: bool, acc: torch.Tensor, src: torch.Tensor | None, need_weight: bool):
        """The whole backward of this 1x1 convolution of ReLU(x * scale + shift) and of that
        BN-ReLU, where one native pass runs it (``native.pointwise_backward``: float32 or bfloat16
        on a CPU with AVX-512, a layer that reads a prefix of the buffer): adds the dy*k part of
        x's gradient to ``acc`` (with ``src``: acc = src + that part) and returns (b, c, dgamma,
        dbeta, weight gradient), as :meth:`conv_backward` and :meth:`accumulate_input_grad`
        together. The input gradient of the convolution is then never in
        memory: on BC-100's first block, at batch 64, in bfloat16, that pass and the three that
        read it back took 5.3 ms on the widest layer against 4.4 for this one (AMD EPYC Zen 5).
        ``scale_shift``: :meth:`scale_shift` of ``mean`` and ``var``, or None to form it. Else None."""
        if self.index is not None or not self.pointwise or not native.conv3x3_supported(x.dtype):
            return None
        rows = _rows(g)
        if not native.usable(rows, x, acc) or (src is not None and not native.usable(src)):
            return None
        if scale_shift is None:
            scale_shift = self.scale_shift(mean, var)
        invstd = torch.rsqrt(var + self.eps)
        sum_dy, sum_dyx, grad_w = native.pointwise_backward(rows, x, self.weight, *scale_shift, mean,
                                                            self.gamma * invstd, acc, src, need_weight)
        _, b, c, dgamma = self._native_coefficients(None, None, x, mean, invstd, training, sum_dy, sum_dyx, None)
        if grad_w is not None:
            grad_w = grad_w.view(self.weight.shape).to(self.weight.dtype)
        return b, c, dgamma, sum_dy, grad_w

    def _native_coefficients(self, d, a, x, mean, invstd, training, sum_dy, sum_dyx, sum_dy_a):
        """(k, b, c, dgamma) from the sums of native.relu_bn_sums (``sum_dyx`` centred, or
        None where dgamma comes from ``sum_dy_a``; ``d`` may still lack the ReLU mask a > 0)."""
        if sum_dyx is not None:
            dgamma = sum_dyx * invstd
        else:
            dgamma = self._dgamma_from_output(d, x, mean, invstd, sum_dy, sum_dy_a, False, mask=a)
        return (*self._coefficients(invstd, dgamma, sum_dy, x.shape[0], training), dgamma)

    def _dgamma_from_output(self, dy, x, mean, invstd, sum_dy, sum_dy_a, centered, mask=None):
        """dgamma = sum(dy * xhat) from sum(dy * a), where a = gamma*xhat + beta wherever dy
        is nonzero: (sum(dy*a) - beta*sum(dy)) / gamma. Its rounding error grows with
        |beta/gamma|, so channels past ``_MAX_BETA_OVER_GAMMA`` (or with gamma 0) take
        the direct sum over rows; in trained networks they are a small minority. ``mask``:
        the ReLU output, where ``dy`` is the gradient before the ReLU."""
        gamma, beta = self.gamma.detach(), self.beta.detach()
        direct = (gamma.abs() * _MAX_BETA_OVER_GAMMA < beta.abs()) | (gamma == 0)
        dgamma = (sum_dy_a - beta * sum_dy) / torch.where(direct, 1.0, gamma)
        idx = direct.nonzero().squeeze(1)  # the CPU only: no device sync
        if idx.numel():
            xs, ds = x.index_select(1, idx), dy.index_select(1, idx)  # copies: free to change
            if mask is not None:
                ds.masked_fill_(mask.index_select(1, idx) <= 0, 0)
            if not centered:  # centre before the product: sum(dy*x) - mean*sum(dy) cancels
                xs.sub_(mean[idx].to(xs.dtype))
            dgamma[idx] = ds.mul_(xs).sum(0, dtype=_acc(ds.dtype)) * invstd[idx]
        return dgamma


# Below this many rows the pass the shortcut saves costs microseconds, and where batch norm
# sees a handful of values (ill-conditioned) the direct sum is the more accurate: its
# rounding does not pass through the weights (Hypothesis: 6.7x the plain path's error at 3 rows).
_SHORTCUT_MIN_ROWS = 1024

# Above this |beta/gamma| a channel's dgamma is summed directly (see _Unit._dgamma_from_output):
# the shortcut's rounding error grows with |beta/gamma|. Measured against float64
# (tests/models/test_parity.py): with this guard the fused dgamma is as close to the exact value
# as the plain path's (0.5-1.7x its error); with the shortcut on every channel, 50-280x.
_MAX_BETA_OVER_GAMMA = 16.0


def bn_coefficients(gamma: torch.Tensor, invstd: torch.Tensor, dgamma: torch.Tensor, sum_dy: torch.Tensor, m: int,
                    training: bool):
    """(k, b, c) of a batch norm's input gradient dx = dy*k + (x - mean)*b + c, from its scale
    ``gamma``, 1/std, dgamma = sum(dy * xhat) and sum(dy) over ``m`` values per channel; b and
    c None in eval mode."""
    k = gamma * invstd
    if not training:  # the statistics are constants: dx = gamma * invstd * dy
        return k, None, None
    # dx = k * (dy - mean(dy) - xhat * mean(dy * xhat)), regrouped
    return k, -k * invstd * dgamma / m, -k * sum_dy / m


def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, batches: torch.Tensor,
                         momentum: float | None, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """A batch norm's running statistics after a batch of ``count`` values per channel with
    (biased) ``mean`` and ``var``, in place, by nn.BatchNorm's rule: a fixed momentum, or a
    cumulative average when it is None."""
    batches.add_(1)
    unbiased = count / max(count - 1, 1)
    if momentum is None and torch.compiler.is_compiling():
        # in tensors: a host sync would break torch.compile's graph
        m = 1.0 / batches.to(running_mean.dtype)
        running_mean.mul_(1 - m).add_(mean * m)
        running_var.mul_(1 - m).add_(var * (m * unbiased))
        return
    m = momentum if momentum is not None else 1.0 / float(batches)
    running_mean.mul_(1 - m).add_(mean, alpha=m)
    running_var.mul_(1 - m).add_(var, alpha=m * unbiased)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype of statistics and reductions: float32, or float64 for a float64 block
    (which the tests use to check the algorithm without rounding in the way)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channels_last(spatial_dims: int) -> torch.memory_format:
    return {2: torch.channels_last, 3: torch.channels_last_3d}.get(spatial_dims, torch.contiguous_format)


def _bn_relu(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """ReLU(x * scale + shift) per column of a (rows, C) matrix, into ``out``."""
    if native.usable(x, out):
        return native.bn_relu(x, scale, shift, out)
    torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype), out=out)
    return out.relu_()


def _gather_cols(rows: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[:, j] = rows[:, index[j]] for a (rows, C) matrix and an increasing ``index``."""
    if native.usable(rows, out):
        return native.gather_cols(rows, index, out)
    # torch.gather with a broadcast index: several times faster than index_select on columns
    return torch.gather(rows, 1, index.expand(rows.shape[0], -1), out=out)


def _scatter_add_cols(grad: torch.Tensor, index: torch.Tensor, rows_grad: torch.Tensor) -> None:
    """rows_grad[:, index[j]] += grad[:, j]: the backward of :func:`_gather_cols`."""
    if native.usable(grad, rows_grad):
        native.scatter_add_cols(grad, index, rows_grad)
    else:
        rows_grad.index_add_(1, index, grad)


def _laid_out_as(grad: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor | None:
    """``grad`` with the strides of ``param``, as the gradient layout contract asks: oneDNN
    returns a convolution's weight gradient channels-last beside a channels-last input, and
    under DistributedDataParallel's bucket views a gradient laid out otherwise costs a copy and
    a warning at every step. A 1x1 weight's two layouts differ only in the strides of its
    size-1 dims: a view then, else a copy."""
    if grad is None or grad.stride() == param.stride():
        return grad
    if grad.is_contiguous() and param.is_contiguous():
        return grad.as_strided(param.shape, param.stride())
    return torch.empty_like(param, dtype=grad.dtype).copy_(grad)


def conv_keeping_layout(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, with the weight gradient laid out as the weight (:func:`_laid_out_as`) under
    autocast too, where the weight's cast copy is what the convolution sees."""
    device = x.device.type
    weight = conv.weight
    if not (torch.is_grad_enabled() and weight.requires_grad and torch.is_autocast_enabled(device)) \
            or weight.dtype == torch.get_autocast_dtype(device) or conv._forward_hooks or conv._forward_pre_hooks \
            or torch.compiler.is_compiling():
        # no cast copy to hook (a hook on the parameter would pile up), hooks to honour, or a
        # compiler, which lays the gradient out itself and cannot trace the hook
        return conv(x)
    cast = weight.to(torch.get_autocast_dtype(device))
    cast.register_hook(lambda grad: _laid_out_as(grad, weight))
    return conv._conv_forward(x, cast, conv.bias)


def _relu_backward_(grad: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.threshold_backward.grad_input(grad, a, 0, grad_input=grad)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N*spatial, C), copying only when not already channels-last."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _grid(rows: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """(N*spatial, C) -> its (N, C, *spatial) channels-last view."""
    return rows.view(-1, *spatial, rows.shape[1]).movedim(-1, 1)


def _units(block, dtype: torch.dtype) -> list[list[_Unit]]:
    out = []
    for layer in block.values():
        units = [_Unit(layer.norm1, layer.conv1, dtype, layer.input_index)]
        if layer.has_bottleneck:
            units.append(_Unit(layer.norm2, layer.conv2, dtype))
        out.append(units)
    return out


def _stats(x: torch.Tensor, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column batch mean and biased variance of a (rows, C) matrix, in fp32 (fp64 for fp64).

    On the CPU, ``var_mean`` over the rows of a row-major matrix runs a scalar loop per
    column; two vectorized passes (a column sum, then the sum of squared deviations, formed
    in ``scratch``, a workspace of x's shape) are several times faster on the tall, thin
    matrices of a dense block (docs/performance.md, "Single operations"). Two passes keep
    the textbook accuracy (no E[x^2] - E[x]^2 cancellation). From
    ``_NATIVE_STATS_MIN_COLS`` columns on (counted as native.c reads them: a dense matrix
    in rows of several of its rows, ``native.stats_width``), native.c makes the same two
    passes in one call each, with float64 sums. Without ``scratch``, one is allocated where
    needed.
    """
    acc = _acc(x.dtype)
    if native.usable(x) and native.stats_width(x) >= _NATIVE_STATS_MIN_COLS:
        return native.col_stats(x)
    if x.device.type != "cpu":
        var, mean = torch.var_mean(x.to(acc), dim=0, correction=0)
        return mean, var
    if scratch is None or scratch.dtype != acc:
        scratch = torch.empty(x.shape, dtype=acc)
    rows = x.shape[0]
    mean = x.sum(0, dtype=acc).div_(rows)
    dev = torch.sub(x, mean, out=scratch)
    return mean, dev.mul_(dev).sum(0).div_(rows)


# Narrower matrices are summed faster by torch's kernels, wider ones (a bottleneck's bn_size * k)
# by native.c's (docs/performance.md, "Single operations"). A layer's k new channels come as a
# dense matrix, which native.c sums as wider rows (native.stats_width): 3.3x faster than
# torch's kernels on 50,176 x 12 bfloat16 values and 3.0x in float32 (AMD EPYC, 2 threads).
_NATIVE_STATS_MIN_COLS = 32


def _bottleneck_width(units: list[list[_Unit]]) -> int:
    """The most channels between the two convolutions of a bottleneck layer (bn_size*k, fewer
    where pruning narrowed it), else 0."""
    return max(us[0].weight.shape[0] for us in units) if len(units[0]) == 2 else 0


def _gathered_width(units: list[list[_Unit]]) -> int:
    """The most buffer channels a pruned layer of the block gathers (0: none is pruned)."""
    return max((us[0].index.numel() for us in units if us[0].index is not None), default=0)


def _running(unit: _Unit):
    return unit.running_mean, unit.running_var


def _running_scale_shifts(units: list[_Unit]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[u.running_scale_shift() for u in units] as the same arithmetic in five list ops: a
    small batch's inference spends more in the dispatch of per-layer vector ops than in them."""
    scale = torch._foreach_add([u.running_var for u in units], [u.eps for u in units])
    torch._foreach_rsqrt_(scale)
    torch._foreach_mul_(scale, [u.gamma for u in units])
    shift = torch._foreach_sub([u.beta for u in units], torch._foreach_mul([u.running_mean for u in units], scale))
    return list(zip(scale, shift))


class _Scratch:
    """Workspaces for one block call, each a flat tensor viewed as (rows, cols) matrices,
    allocated at its first use (on the CPU in 2D the 3x3 convolutions' input gradients
    arrive channels-last, so the "d2" workspace they would be copied into is never needed)."""

    def __init__(self, rows: int, widths: dict[str, int], like: torch.Tensor):
        self._widths, self._flat = widths, {}
        self.rows, self._like = rows, like

    def __call__(self, name: str, cols: int) -> torch.Tensor:
        flat = self._flat.get(name)
        if flat is None:
            like = self._like
            flat = self._flat[name] = torch.empty(self.rows * self._widths[name], dtype=like.dtype,
                                                  device=like.device)
        return flat[: self.rows * cols].view(self.rows, cols)


def _buffer(x: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's feature buffer for input ``x`` (N, C0, *spatial): (N, *spatial, channels), the
    input copied into its first C0 channels, and the same memory as (rows, channels)."""
    store = torch.empty((x.shape[0], *x.shape[2:], channels), dtype=x.dtype, device=x.device)
    store[..., :x.shape[1]].copy_(x.movedim(1, -1))
    return store, store.view(-1, channels)


def _forward(block, units, x: torch.Tensor, save: bool, update: bool = True):
    """Run the block into one channels-last buffer; with ``save``, keep what backward needs.

    Returns the buffer as (N, C, *spatial), the statistics of every buffer channel
    (training only) and the per-layer tensors backward needs. In training mode the running
    statistics are updated unless ``update`` is False (the custom operator, which leaves
    it to its caller: ``fused_op.py``).
    """
    layers = list(block.values())
    training = block.training
    n, c0, *spatial = x.shape
    spatial = tuple(spatial)
    k, c = block.growth_rate, block.out_channels
    store, rows = _buffer(x, c)
    count = rows.shape[0]
    width = _bottleneck_width(units)
    scratch = _Scratch(count, {"a": max(c - k, k), "a2": width, "g": _gathered_width(units)}, x)
    saved: list[torch.Tensor] = []
    mean = var = None
    if training:
        mean = torch.empty(c, dtype=_acc(x.dtype), device=x.device)
        var = torch.empty_like(mean)
        mean[:c0], var[:c0] = _stats(rows[:, :c0], scratch("a", c0))
    with torch.no_grad():
        # eval mode: every batch norm's scale and shift at once (a few ops per block, not per layer)
        first = None if training else _running_scale_shifts([us[0] for us in units])
        second = _running_scale_shifts([us[1] for us in units if len(us) == 2]) \
            if not training and not save and len(units[0]) == 2 else None
        for i, (layer, us) in enumerate(zip(layers, units)):
            ci = c0 + i * k
            if training:
                m1, v1 = us[0].select(mean[:ci]), us[0].select(var[:ci])
                if update:
                    us[0].update_running(m1, v1, count)
                scale_shift = us[0].scale_shift(m1, v1)
            else:
                scale_shift = first[i]
            # a bottleneck's first convolution with its BN-ReLU in one native pass where it can
            h = us[0].conv_act(rows[:, :ci], *scale_shift) if len(us) == 2 and second is None else None
            a = us[0].read_act(rows[:, :ci], *scale_shift, scratch) if h is None else None
            if second is not None and us[0].pointwise:
                # inference: the second batch norm folds into the 1x1 convolution
                a2 = us[0].conv_folded_relu(a, us[1], spatial, second[i])
                out = us[1].conv(a2, spatial)
            elif len(us) == 2:
                if h is None:
                    h = _rows(us[0].conv(a, spatial))
                # a memory-efficient layer's bottleneck is recomputed in backward, not kept
                kept = None if getattr(layer, "memory_efficient", False) else h
                if training:
                    m2, v2 = _stats(h, scratch("a2", h.shape[1]))
                    if update:
                        us[1].update_running(m2, v2, count)
                    if save:
                        saved += [kept, m2, v2]
                else:
                    m2, v2 = _running(us[1])
                    if save:
                        saved.append(kept)
                out = us[1].conv(us[1].act(h, m2, v2, scratch("a2", h.shape[1])), spatial)
            else:
                out = us[0].conv(a, spatial)
            if training and layer.drop_rate > 0:
                keep = 1.0 - layer.drop_rate
                mask = torch.empty_like(out).bernoulli_(keep).div_(keep)
                out = out * mask
                if save:
                    saved.append(mask)
            out = _rows(out)
            rows[:, ci:ci + k].copy_(out)
            if training:  # from the dense copy: a narrow column slice of the buffer reads slowly
                mean[ci:ci + k], var[ci:ci + k] = _stats(out, scratch("a", k))
    return store.movedim(-1, 1), (mean, var), saved


class _FusedDenseBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block, units, x, *params):
        buf, (mean, var), saved = _forward(block, units, x, save=True)
        ctx.block, ctx.units, ctx.c0 = block, units, x.shape[1]
        ctx.training = block.training
        stats = [mean, var] if ctx.training else []
        ctx.save_for_backward(buf, *stats, *saved)
        return buf

    @staticmethod
    @once_differentiable  # backward runs in-place kernels autograd cannot differentiate
    def backward(ctx, grad_out):
        buf, *rest = ctx.saved_tensors
        mean, var = (rest[0], rest[1]) if ctx.training else (None, None)
        saved = rest[2:] if ctx.training else rest
        grad_x, grads = _backward(ctx.block, ctx.units, ctx.training, ctx.c0, buf, mean, var, saved, grad_out)
        params = [p for us in ctx.units for u in us for p in u.params()]
        return (None, None, grad_x, *[_laid_out_as(g, p) for g, p in zip(grads, params)])


def _backward(block, units, training: bool, c0: int, buf, mean, var, saved, grad_out, all_weights: bool = False):
    """The gradients of the block's input and of every unit's (gamma, beta, weight), from what
    :func:`_forward` saved in the mode ``training``; a weight's only where it requires grad,
    or every one with ``all_weights``."""
    spatial = tuple(buf.shape[2:])
    layers = list(block.values())
    k, c = block.growth_rate, block.out_channels
    rows = buf.movedim(1, -1).view(-1, c)
    width = _bottleneck_width(units)
    scratch = _Scratch(rows.shape[0], {"a": max(c - k, k), "d": c - k, "a2": width, "d2": width,
                                       "p": width, "g": _gathered_width(units), "acc": _gathered_width(units),
                                       "out": k}, rows)
    grads: list[list] = [[None] * (3 * len(us)) for us in units]
    # The output is the buffer itself: its gradient accumulates what every later layer
    # sends back to the channels it read. The BN terms linear in x are summed per
    # channel in b_sum, c_sum and applied once, when a channel's gradient is complete.
    incoming = grad_out.movedim(1, -1)
    last = len(layers) - 1
    if units[last][0].index is None and incoming.is_contiguous() and native.usable(incoming.view(-1, c), rows):
        # The last layer reads every channel before its own: its pass writes grad_out plus its
        # part into a fresh buffer (``src`` below), and its own channels are finished from
        # grad_out, which is then never copied (2.4 ms of BC-100's first block at batch 64).
        src_rows, top = incoming.view(-1, c), c0 + last * k
        grad_store = torch.empty_like(incoming)
    else:
        src_rows, top = None, c
        grad_store = incoming.clone(memory_format=torch.contiguous_format)
    grad_rows = grad_store.view(-1, c)
    b_sum = torch.zeros(c, dtype=_acc(buf.dtype), device=buf.device)
    c_sum = torch.zeros_like(b_sum)

    def complete(lo: int, hi: int, dense: bool = False) -> torch.Tensor:
        """The finished gradient of buffer channels lo:hi as (rows, hi - lo): in place, or with
        ``dense`` where the native kernels run, in the "out" workspace, as the convolution
        whose output they are takes it (its backward would copy the strided columns, which
        are not read again, into a dense matrix itself). Channels from ``top`` on are read
        from grad_out."""
        cols = grad_rows[:, lo:hi]
        src = src_rows[:, lo:hi] if lo >= top else cols
        if training and native.usable(grad_rows, rows):
            out = scratch("out", hi - lo) if dense else cols
            return native.bn_grad_apply(src, rows[:, lo:hi], mean[lo:hi], b_sum[lo:hi], c_sum[lo:hi], out=out)
        if src is not cols:
            cols.copy_(src)
        if training:
            dtype = rows.dtype
            # x - mean is formed in fp32 (mean stays fp32 under bf16) and rounded once to the
            # buffer's dtype, the scratch's
            centered = torch.sub(rows[:, lo:hi], mean[lo:hi], out=scratch("a", hi - lo))
            cols.addcmul_(centered, b_sum[lo:hi].to(dtype)).add_(c_sum[lo:hi].to(dtype))
        return cols

    pos = len(saved)
    for i in reversed(range(len(layers))):
        us, gl = units[i], grads[i]
        ci = c0 + i * k
        g = _grid(complete(ci, ci + k, dense=True), spatial)
        if training and layers[i].drop_rate > 0:
            pos -= 1
            g = g * saved[pos]
        u1 = us[0]
        inp = u1.read(rows[:, :ci], scratch)
        m1, v1 = (u1.select(mean[:ci]), u1.select(var[:ci])) if training else _running(u1)
        n1, a = inp.shape[1], None
        # the BN's (scale, shift) where the native kernels form its ReLU output themselves
        act = u1.scale_shift(m1, v1) if native.relu_mask_from_input(inp.dtype) else None
        if len(us) == 2:
            u2 = us[1]
            if training:
                pos -= 3
                h, m2, v2 = saved[pos:pos + 3]
            else:
                pos -= 1
                h, (m2, v2) = saved[pos], _running(u2)
            if h is None:  # memory-efficient: the bottleneck again, as forward formed it (from the
                # buffer's columns: a pruned layer's product gathers them itself, as in forward)
                h = None if act is None else u1.conv_act(rows[:, :ci], *act)
                if h is None:
                    a = u1.act(inp, m1, v1, scratch("a", n1))
                    h = _rows(u1.conv(a, spatial))
            a2 = u2.act(h, m2, v2, scratch("a2", h.shape[1]))
            d2, gl[5] = u2.conv_backward(g, a2, spatial, lambda: scratch("d2", h.shape[1]),
                                         all_weights or u2.weight.requires_grad)
            gl[3], gl[4] = u2.input_grad_(d2, a2, h, m2, v2, training, lambda: scratch("p", h.shape[1]),
                                          u2.sum_grad_times_input(gl[5], a2))
            g = _grid(d2, spatial)
        need_weight = all_weights or u1.weight.requires_grad
        src = src_rows[:, :ci] if i == last and top < c else None
        whole = u1.whole_backward(g, inp, act, m1, v1, training, grad_rows[:, :ci], src, need_weight)
        if whole is not None:
            b1, c1, gl[0], gl[1], gl[2] = whole
        else:
            if a is None:
                a = u1.act(inp, m1, v1, scratch("a", n1))
            d, gl[2] = u1.conv_backward(g, a, spatial, lambda: scratch("d", n1), need_weight)
            # a pruned layer's input gradient goes to a workspace, then to the channels it read
            acc = grad_rows[:, :ci] if u1.index is None else scratch("acc", n1).zero_()
            b1, c1, gl[0], gl[1] = u1.accumulate_input_grad(d, a, inp, m1, v1, training, acc,
                                                            u1.sum_grad_times_input(gl[2], a), src)
            if u1.index is not None:
                u1.add_back(acc, grad_rows[:, :ci])
        if training and u1.index is None:
            b_sum[:ci] += b1
            c_sum[:ci] += c1
        elif training:
            b_sum.index_add_(0, u1.index, b1.to(b_sum.dtype))
            c_sum.index_add_(0, u1.index, c1.to(c_sum.dtype))
    complete(0, c0)
    return grad_store[..., :c0].movedim(-1, 1), [g for gl in grads for g in gl]


def fused_dense_block(block, x: torch.Tensor) -> torch.Tensor:
    """Run ``block`` (a :class:`DenseBlock`) on ``x`` as one fused op: the same function as
    ``block.forward_plain(x)``, gradients included; the output is channels-last in memory."""
    return _in_autocast_dtype(_run, block, x)


def _in_autocast_dtype(run, module, x: torch.Tensor) -> torch.Tensor:
    """``run(module, x)``, under autocast with ``x`` in the autocast dtype and autocast off
    inside: the fused ops pick each op's dtype themselves (statistics and BN parameters in
    float32), and the cast happens outside them so that autograd carries it back."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return run(module, x.to(dtype))
    return run(module, x)


def _run(block, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in block.parameters())):
        units = _units(block, x.dtype)
        return _FusedDenseBlock.apply(block, units, x, *[p for us in units for u in us for p in u.params()])
    with torch.no_grad():
        return _forward(block, _units(block, x.dtype), x, save=False)[0]


def select_channels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(1, index)`` for the output of a dense block that pruning narrowed
    (``DenseBlock.output_index``, increasing): on the CPU one native gather of the channels-last
    rows into a channels-last result, as the transition after the block reads it, and in
    backward one scatter into zeros; elsewhere, and under a compiler, ``index_select``."""
    if torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) \
            or not _rows_have_columns(x) or not native.available():
        return x.index_select(1, index)
    return _SelectChannels.apply(x, index)


class _SelectChannels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index):
        rows = _rows(x)
        out = _gather_cols(rows, index, torch.empty(rows.shape[0], index.numel(), dtype=x.dtype, device=x.device))
        ctx.save_for_backward(index)
        ctx.width, ctx.spatial = x.shape[1], tuple(x.shape[2:])
        return _grid(out, ctx.spatial)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        g = _rows(grad)
        full = torch.zeros(g.shape[0], ctx.width, dtype=g.dtype, device=g.device)
        _scatter_add_cols(g, index, full)
        return _grid(full, ctx.spatial), None


# -- the transition ----------------------------------------------------------------------

def supports_fused_transition(transition, x: torch.Tensor) -> bool:
    """True when the native kernels can run ``transition`` (BN-ReLU-Conv1x1-AvgPool(2)), whose
    pooling commutes with its convolution (``Transition.pools_first``), on ``x``: on the CPU,
    float32 outside autocast or float32/bf16 under bf16 autocast, with a stock batch norm and
    ReLU, every spatial side >= 2."""
    if torch.is_autocast_enabled("cpu"):
        dtype_ok = torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
    else:
        dtype_ok = x.dtype == torch.float32
    return (x.device.type == "cpu" and dtype_ok
            and x.dim() == transition.conv.weight.dim() and x.numel() > 0 and min(x.shape[2:]) >= 2
            and _plain_bn(transition.norm) and type(transition.relu) is nn.ReLU and _plain_conv(transition.conv)
            and _rows_have_columns(x) and native.available())


def _rows_have_columns(x: torch.Tensor) -> bool:
    """Is ``_rows(x)`` a matrix the native kernels take: a copy, or a view with contiguous
    columns? A batch of one in NCHW layout (out of a block on the reference path, a pruned
    one say) gives a view with strided columns, which they refuse."""
    try:
        return x.movedim(1, -1).view(-1, x.shape[1]).stride(1) == 1 or x.shape[1] == 1
    except RuntimeError:  # no view: reshape copies into contiguous rows
        return True


def _transition_forward(unit: _Unit, x: torch.Tensor, training: bool, update: bool = True):
    """(output, rows of x, mean, var, pooled rows): BN-ReLU and pooling in one native pass,
    then the 1x1 convolution on a quarter of the positions. In training mode the running
    statistics are updated unless ``update`` is False (as in :func:`_forward`)."""
    spatial = tuple(x.shape[2:])
    rows = _rows(x)  # a view where x is channels-last, as a fused block's output is
    if training:
        mean, var = _stats(rows)
        if update:
            unit.update_running(mean, var, rows.shape[0])
    else:
        mean, var = _running(unit)
    pooled = native.bn_relu_pool(rows, spatial, *unit.scale_shift(mean, var))
    out = unit.conv(pooled, tuple(s // 2 for s in spatial))
    return out, rows, mean, var, pooled


class _FusedTransition(torch.autograd.Function):
    """Saves only the pooled activations (a quarter of the BN-ReLU output) beside the input,
    which the dense block before it keeps anyway; backward reads the input twice and writes
    its gradient once, with no full-size temporaries."""

    @staticmethod
    def forward(ctx, transition, unit, x, *params):
        training = transition.norm.training  # its own mode: frozen statistics inside a training model
        out, rows, mean, var, pooled = _transition_forward(unit, x, training)
        ctx.unit, ctx.training, ctx.spatial = unit, training, tuple(x.shape[2:])
        ctx.save_for_backward(rows, mean, var, pooled)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        rows, mean, var, pooled = ctx.saved_tensors
        grads = _transition_backward(ctx.unit, ctx.training, ctx.spatial, rows, mean, var, pooled, grad_out,
                                     ctx.needs_input_grad[2], ctx.unit.weight.requires_grad)
        return None, None, *grads


def _transition_backward(unit: _Unit, training: bool, spatial, rows, mean, var, pooled, grad_out,
                         need_x: bool, need_weight: bool):
    """(grad of x or None, dgamma, dbeta, grad of the weight or None) from what
    :func:`_transition_forward` returned."""
    grad_pooled, grad_w = unit.conv_backward(grad_out, pooled, tuple(s // 2 for s in spatial),
                                             lambda: torch.empty_like(pooled), need_weight)
    invstd = torch.rsqrt(var + unit.eps)
    scale, shift = unit.scale_shift(mean, var)
    sum_dy, sum_dyx = native.unpool_relu_bn_sums(grad_pooled, rows, spatial, scale, shift, mean)
    dgamma = sum_dyx * invstd
    k, b, c = unit._coefficients(invstd, dgamma, sum_dy, rows.shape[0], training)
    grad_x = None
    if need_x:
        grad_x = _grid(native.unpool_bn_grad(grad_pooled, rows, spatial, scale, shift, k, mean, b, c), spatial)
    return grad_x, dgamma, sum_dy, _laid_out_as(grad_w, unit.weight)


def fused_transition(transition, x: torch.Tensor) -> torch.Tensor:
    """Run ``transition`` on ``x`` with the native kernels (see :func:`supports_fused_transition`):
    the same function as ``transition.forward_plain(x)``, gradients included; under bf16
    autocast in bf16, as the dense block runs (statistics and BN parameters in float32)."""
    return _in_autocast_dtype(_run_transition, transition, x)


def _run_transition(transition, x: torch.Tensor) -> torch.Tensor:
    unit = _Unit(transition.norm, transition.conv, x.dtype)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in unit.params())):
        return _FusedTransition.apply(transition, unit, x, *unit.params())
    with torch.no_grad():
        return _transition_forward(unit, x, transition.norm.training)[0]
