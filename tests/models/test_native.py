"""The native CPU kernels (models/native.c) against the torch ops they replace."""

import contextlib
import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch

from densekit import DenseBlock
from densekit.models import native

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and not os.environ.get("CC"),
                                reason="no C compiler: the block runs torch ops instead")


def test_native_kernels_build_and_load_here():
    assert native.available()
    with native.disabled():
        assert not native.available()
        assert not native.usable(torch.zeros(2, 2))
    assert native.usable(torch.zeros(4, 6)[:, :3])
    assert not native.usable(torch.zeros(4, 6).t(), torch.zeros(4, 6))  # columns not contiguous
    assert not native.usable(torch.zeros(4, 6, dtype=torch.float64))
    assert not native.usable(torch.zeros(0, 6))


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86 instruction subsets")
@pytest.mark.parametrize("flags", [["-march=x86-64-v3"], ["-march=native", "-mno-avx512bf16"]])
def test_the_library_builds_and_loads_on_cpus_with_fewer_instructions(flags, tmp_path):
    """The source compiles for a CPU without AVX-512 and for one without AVX512-BF16 (an Intel
    Xeon before Cooper Lake), and the library loads there with every kernel native.py calls:
    a kernel defined under the wrong condition leaves an undefined symbol, and then the whole
    library fails to load and every block runs torch ops."""
    import ctypes

    cc = os.environ.get("CC", "").split() or ["cc"]
    target = tmp_path / "native.so"
    done = subprocess.run([*cc, *flags, *[f for f in native._FLAGS if not f.startswith("-march")],
                           str(native._SOURCE), "-o", str(target)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lib = ctypes.CDLL(str(target))
    assert all(hasattr(lib, name) for name in native._SIGNATURES)


# 50 x 7 runs on one thread; 12000 x 40 (> 32768 elements) on every thread torch has.
SHAPES = [(50, 7, 9), (12000, 40, 45), (12000, 1, 3)]


@pytest.mark.parametrize("rows,cols,ld", SHAPES)
def test_bn_relu_matches_addcmul_relu_on_a_column_slice(rows, cols, ld):
    torch.manual_seed(0)
    x = torch.randn(rows, ld)[:, :cols]
    scale, shift = torch.randn(cols), torch.randn(cols)
    x[0, 0] = float("nan")
    out = torch.empty(rows, cols)
    native.bn_relu(x, scale, shift, out)
    torch.testing.assert_close(out, torch.relu(x * scale + shift), rtol=1e-6, atol=1e-6, equal_nan=True)
    assert out[0, 0].isnan()  # NaN passes ReLU, as in torch


@pytest.mark.parametrize("rows,cols,ld", SHAPES)
def test_relu_bn_sums_match_the_separate_ops(rows, cols, ld):
    torch.manual_seed(1)
    g = torch.randn(rows, cols)
    a = torch.relu(torch.randn(rows, ld))[:, :cols]
    a[0, 0] = float("nan")  # threshold_backward lets the gradient through where a is NaN
    x = torch.randn(rows, ld)[:, 1:cols + 1] + 5.0
    mean, k = x.double().mean(0).float(), torch.randn(cols)
    acc = torch.randn(rows, ld)
    acc_ref = acc.clone()
    d = torch.ops.aten.threshold_backward(g, a, 0)
    sum_d, sum_dx = native.relu_bn_sums(g, a, x=x, mean=mean, acc=acc[:, 2:cols + 2], k=k)
    acc_ref[:, 2:cols + 2] += d * k
    torch.testing.assert_close(acc, acc_ref, rtol=1e-6, atol=1e-6)
    exact_d = d.double().sum(0)
    exact_dx = (d.double() * (x.double() - mean.double())).sum(0)
    scale = d.double().abs().sum(0)  # sums of mixed signs: bound against the sum of |terms|
    assert ((sum_d.double() - exact_d).abs() <= 1e-6 * scale + 1e-7).all()
    assert ((sum_dx.double() - exact_dx).abs() <= 1e-6 * (d.double() * (x.double() - mean)).abs().sum(0)).all()
    g2 = g.clone()
    only_d, none = native.relu_bn_sums(g2, a, dout=g2)
    assert none is None
    assert torch.equal(g2, d)
    assert torch.equal(only_d, sum_d)  # the same order of summation with or without x
    g3 = g.clone()
    again_d, again_dx = native.relu_bn_sums(g3, a, dout=g3, x=x, mean=mean)
    assert torch.equal(g3, d) and torch.equal(again_d, sum_d) and torch.equal(again_dx, sum_dx)
    # acc = src + d * k from another matrix: acc's own values are not read
    src = torch.randn(rows, ld)[:, 1:cols + 1]
    fresh = torch.full((rows, cols), float("nan"))
    from_src_d, _ = native.relu_bn_sums(g, a, x=x, mean=mean, acc=fresh, k=k, src=src)
    assert torch.equal(from_src_d, sum_d)
    torch.testing.assert_close(fresh, src + d * k, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="src needs acc"):
        native.relu_bn_sums(g, a, src=src)


@pytest.mark.parametrize("rows,cols,ld", SHAPES)
def test_column_gather_scatter_and_gathered_bn_relu_match_torch(rows, cols, ld):
    # a pruned layer reads a subset of a column slice of the block's buffer
    torch.manual_seed(4)
    buf = torch.randn(rows, ld + 3)
    x = buf[:, 2:ld + 2]
    index = torch.randperm(ld)[:cols].sort().values
    out = torch.full((rows, cols), 7.0)
    torch.testing.assert_close(native.gather_cols(x, index, out), x[:, index], rtol=0, atol=0)
    scale, shift = torch.randn(cols), torch.randn(cols)
    want = torch.relu(x[:, index] * scale + shift)
    torch.testing.assert_close(native.gather_cols(x, index, out, scale, shift), want, rtol=1e-6, atol=1e-6)
    src = torch.randn(rows, cols)
    before = buf.clone()
    native.scatter_add_cols(src, index, x)
    want = before.clone()
    want[:, 2:ld + 2].index_add_(1, index, src)
    torch.testing.assert_close(buf, want, rtol=0, atol=0)  # the columns outside the slice untouched
    # columns in no order, and far apart (a group of output columns ends where its sources
    # would span 32 columns or more); a NaN passes the ReLU as in torch
    for wide in (torch.arange(0, ld, 3).flip(0), torch.arange(0, ld, 37)):
        x[0, wide[0]] = float("nan")
        scale, shift = torch.randn(wide.numel()), torch.randn(wide.numel())
        got = native.gather_cols(x, wide, torch.empty(rows, wide.numel()), scale, shift)
        torch.testing.assert_close(got, torch.relu(x[:, wide] * scale + shift), rtol=1e-6, atol=1e-6,
                                   equal_nan=True)
        assert got[0, 0].isnan()
        torch.testing.assert_close(native.gather_cols(x, wide, torch.empty(rows, wide.numel())), x[:, wide],
                                   rtol=0, atol=0, equal_nan=True)
        src = torch.randn(rows, wide.numel())
        want = buf.clone()
        want[:, 2:ld + 2].index_add_(1, wide, src)
        native.scatter_add_cols(src, wide, x)
        torch.testing.assert_close(buf, want, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="column indices"):
        native.gather_cols(x, torch.tensor([0, ld]), torch.empty(rows, 2))
    with pytest.raises(ValueError, match="column indices"):  # out of range anywhere, not only at the ends
        native.gather_cols(x, torch.tensor([0, ld + 5, 1]), torch.empty(rows, 3))
    with pytest.raises(ValueError, match="column indices"):
        native.scatter_add_cols(torch.empty(rows, 1), torch.tensor([-1]), x)


@pytest.mark.parametrize("rows,cols,ld", SHAPES)
def test_bf16_kernels_compute_in_float32_and_round_once(rows, cols, ld):
    """bfloat16 matrices (a block's buffer under bf16 autocast): the same arithmetic in float32
    on the widened values, each stored value rounded once (within one bf16 step of the
    float32 result rounded, as fused multiply-adds may round the float32 differently)."""
    torch.manual_seed(5)
    one_step = dict(rtol=2 ** -8, atol=1e-5)  # atol: where x * scale + shift cancels to near 0

    def bf(*shape):
        return torch.randn(*shape).bfloat16()

    buf = bf(rows, ld + 2)
    x = buf[:, :ld]
    scale, shift = torch.randn(ld), torch.randn(ld)
    out = torch.empty(rows, ld, dtype=torch.bfloat16)
    native.bn_relu(x, scale, shift, out)
    torch.testing.assert_close(out.float(), torch.relu(x.float() * scale + shift).bfloat16().float(), **one_step)
    index = torch.randperm(ld)[:cols].sort().values
    got = native.gather_cols(x, index, torch.empty(rows, cols, dtype=torch.bfloat16), scale[:cols], shift[:cols])
    want = torch.relu(x.float()[:, index] * scale[:cols] + shift[:cols]).bfloat16()
    torch.testing.assert_close(got.float(), want.float(), **one_step)
    assert torch.equal(native.gather_cols(x, index, torch.empty(rows, cols, dtype=torch.bfloat16)), x[:, index])
    wide = torch.arange(0, ld, 37)  # one output column per group
    n = wide.numel()
    got = native.gather_cols(x, wide, torch.empty(rows, n, dtype=torch.bfloat16), scale[:n], shift[:n])
    torch.testing.assert_close(got.float(), torch.relu(x.float()[:, wide] * scale[:n] + shift[:n]).bfloat16().float(),
                               **one_step)
    # without BN-ReLU the gather copies bits: a signalling NaN stays one
    bits = x.view(torch.int16)
    kept, bits[0, index[0]] = bits[0, index[0]].item(), 0x7F81
    for idx in (index, wide):
        got = native.gather_cols(x, idx, torch.empty(rows, idx.numel(), dtype=torch.bfloat16))
        assert torch.equal(got.view(torch.int16), bits[:, idx])
    bits[0, index[0]] = kept
    # column statistics in float32 (float64 sums) of the bf16 values
    mean, var = native.col_stats(x)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), x.double().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), x.double().var(0, correction=0), rtol=1e-5, atol=1e-6)
    # the ReLU-BN backward sums and the accumulation into a bf16 gradient
    g, a = bf(rows, cols), torch.relu(bf(rows, cols))
    k, m = torch.randn(cols), x.float()[:, :cols].mean(0)
    acc = bf(rows, cols)
    acc_before = acc.float()
    sum_d, sum_dx = native.relu_bn_sums(g, a, x=x[:, :cols], mean=m, acc=acc, k=k)
    d = torch.where(a.float() > 0, g.float(), 0.0)
    torch.testing.assert_close(acc.float(), (acc_before + d * k).bfloat16().float(), **one_step)
    torch.testing.assert_close(sum_d.double(), d.double().sum(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sum_dx.double(), (d.double() * (x.double()[:, :cols] - m.double())).sum(0),
                               rtol=1e-5, atol=1e-3)
    grad = bf(rows, cols)
    b, c = torch.randn(cols), torch.randn(cols)
    want = (grad.float() * k + (x.float()[:, :cols] - m) * b + c).bfloat16()
    native.bn_grad_apply(grad, x[:, :cols], m, b, c, k)
    torch.testing.assert_close(grad.float(), want.float(), rtol=2 ** -7, atol=1e-6)
    before = buf.float()
    src = bf(rows, cols)
    native.scatter_add_cols(src, index, x)
    want = before.clone()
    want[:, index] += src.float()
    torch.testing.assert_close(buf.float(), want.bfloat16().float(), **one_step)
    assert torch.equal(buf[:, ld:].float(), before[:, ld:])  # the columns outside the slice untouched
    others = torch.ones(ld + 2, dtype=torch.bool)
    others[index] = False
    assert torch.equal(buf[:, others].float(), before[:, others])  # and those the index does not name
    with pytest.raises(ValueError, match="one dtype"):  # matrices of one call share a dtype
        native.bn_relu(x, scale, shift, torch.empty(rows, ld))
    with pytest.raises(ValueError, match="one dtype"):
        native.unpool_relu_bn_sums(torch.zeros(4, 3), torch.zeros(16, 3, dtype=torch.bfloat16), (2, 2),
                                   torch.ones(3), torch.zeros(3), torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols,ld", SHAPES)
def test_column_reader_is_the_checked_wrappers(rows, cols, ld, dtype):
    # what an inference copy's layers call: the first ld columns of a wider buffer, whole or
    # gathered, with BN-ReLU; and a plain gather (a pruned block's kept outputs)
    torch.manual_seed(5)
    buf = torch.randn(rows, ld + 4).to(dtype)
    index = torch.randperm(ld)[:cols].sort().values
    scale, shift = torch.randn(ld), torch.randn(ld)
    whole = native.ColumnReader(ld, None, scale, shift, dtype)
    got = whole(buf, torch.full((rows, ld), 7.0, dtype=dtype))
    assert torch.equal(got, native.bn_relu(buf[:, :ld], scale, shift, torch.empty(rows, ld, dtype=dtype)))
    gather = native.ColumnReader(ld, index, scale[:cols], shift[:cols], dtype)
    want = native.gather_cols(buf[:, :ld], index, torch.empty(rows, cols, dtype=dtype), scale[:cols], shift[:cols])
    assert torch.equal(gather(buf, torch.empty(rows, cols, dtype=dtype)), want)
    plain = native.ColumnReader(ld, index, None, None, dtype)
    assert torch.equal(plain(buf, torch.empty(rows, cols, dtype=dtype)), buf[:, index])
    # what the C code would misread is refused, not run
    out = torch.empty(rows, cols, dtype=dtype)
    for x, o in [(buf.float() if dtype == torch.bfloat16 else buf.bfloat16(), out),  # another dtype
                 (buf[:, :ld - 1], out),                       # fewer columns than it reads
                 (buf, torch.empty(rows, cols + 1, dtype=dtype)),  # another width out
                 (buf[: rows - 1], out),                       # other rows
                 (buf.t().contiguous().t(), out),              # columns not contiguous
                 (buf, torch.empty(cols, rows, dtype=dtype).t())]:
        with pytest.raises(ValueError, match="column reader"):
            gather(x, o)
    with pytest.raises(ValueError, match="column indices"):  # an index past the columns it reads
        native.ColumnReader(ld, torch.tensor([0, ld]), None, None, dtype)(buf, torch.empty(rows, 2, dtype=dtype))
    with pytest.raises(ValueError, match="go together"):
        native.ColumnReader(ld, None, None, None, dtype)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        native.ColumnReader(ld, None, scale, shift, torch.float64)


def test_wrappers_refuse_what_the_c_code_would_misread():
    g, a = torch.randn(40, 5), torch.relu(torch.randn(40, 5))
    with pytest.raises(ValueError, match="shape"):
        native.relu_bn_sums(g, a[:30])
    with pytest.raises(ValueError, match="acc needs k"):
        native.relu_bn_sums(g, a, acc=torch.zeros(40, 5))
    with pytest.raises(ValueError, match="5 values"):
        native.bn_relu(g, torch.ones(4), torch.zeros(5), torch.empty(40, 5))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        native.col_stats(g.double())


@pytest.mark.parametrize("rows,cols,ld", SHAPES)
def test_bn_grad_apply_with_and_without_scale(rows, cols, ld):
    torch.manual_seed(2)
    grad = torch.randn(rows, ld)
    x = torch.randn(rows, ld)[:, :cols]
    k, mean, b, c = (torch.randn(cols) for _ in range(4))
    want = grad.clone()
    want[:, 1:cols + 1] = want[:, 1:cols + 1] * k + (x - mean) * b + c
    native.bn_grad_apply(grad[:, 1:cols + 1], x, mean, b, c, k)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-5)
    want[:, :cols] += (x - mean) * b + c
    native.bn_grad_apply(grad[:, :cols], x, mean, b, c)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-5)
    # into another matrix, dense or strided, the gradient left as it was
    before = grad.clone()
    for out in (torch.full((rows, cols), float("nan")), torch.full((rows, ld + 2), float("nan"))[:, 2:cols + 2]):
        got = native.bn_grad_apply(grad[:, :cols], x, mean, b, c, k, out=out)
        assert got is out
        torch.testing.assert_close(out, before[:, :cols] * k + (x - mean) * b + c, rtol=1e-5, atol=1e-5)
        assert torch.equal(grad, before)


@pytest.mark.parametrize("rows,cols,ld", SHAPES)
def test_col_stats_two_pass_accuracy(rows, cols, ld):
    torch.manual_seed(3)
    x = (torch.randn(rows, ld) * 0.01 + 100.0)[:, :cols]  # mean 10^4 x the spread
    mean, var = native.col_stats(x)
    var_ref, mean_ref = torch.var_mean(x.double(), dim=0, correction=0)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-3, atol=0)  # E[x^2]-E[x]^2 would be ~100% off


# Dense narrow matrices, which col_stats sums as wider rows (several rows at a time): rows
# divisible by 32, by 2 only, by none, fewer rows than the widening would take, and a width
# that only divides the widened row once.
DENSE_SHAPES = [(50176, 12), (12000, 24), (1002, 12), (999, 12), (3, 7), (64, 200)]


@pytest.mark.parametrize("rows,cols", DENSE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_col_stats_of_dense_matrices(rows, cols, dtype):
    torch.manual_seed(4)
    # column means 100..200 apart and spreads 10^-2..1: a fold of the wrong rows or columns shows
    x = (torch.randn(rows, cols) * torch.logspace(-2, 0, cols) + torch.linspace(100, 200, cols)).to(dtype)
    assert x.stride(0) == cols
    mean, var = native.col_stats(x)
    var_ref, mean_ref = torch.var_mean(x.double(), dim=0, correction=0)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-3, atol=1e-12)
    assert native.stats_width(x) == {50176: 384, 12000: 384, 1002: 24, 999: 12, 3: 7, 64: 200}[rows]


# (N, spatial) grids with odd sides (a last row or column outside every 2x window), in 1D,
# 2D and 3D; the last has 8 x 30 x 30 x 40 elements, split between threads.
# Widths under 16, 16 and more with a tail (17, 40, 56) in 1D, 2D and 3D, one thread and two
# (over 32,768 elements): the native kernels take 16 columns at a time and mask a row's tail.
POOL_GRIDS = [((3, 9), 5), ((2, 7, 9), 6), ((2, 5, 6, 3), 4), ((8, 30, 30), 40), ((4, 12, 10), 56),
              ((2, 4, 6, 4), 17), ((4, 6, 8, 8), 24)]


def _pool_case(shape, cols, seed):
    torch.manual_seed(seed)
    n, *spatial = shape
    rows = n * torch.Size(spatial).numel()
    x = (torch.randn(rows, cols + 3) + 0.2)[:, 1:cols + 1]  # a column slice: row stride cols + 3
    scale, shift = torch.randn(cols), torch.randn(cols)
    return x, tuple(spatial), scale, shift


def _grid_of(rows, n, spatial):  # (rows, C) -> (N, C, *spatial)
    return rows.reshape(n, *spatial, rows.shape[1]).movedim(-1, 1)


def _avg_pool(t):
    return {3: torch.nn.functional.avg_pool1d, 4: torch.nn.functional.avg_pool2d,
            5: torch.nn.functional.avg_pool3d}[t.dim()](t, 2, 2)


@pytest.mark.parametrize("shape,cols", POOL_GRIDS)
def test_bn_relu_pool_matches_relu_then_avg_pool(shape, cols):
    x, spatial, scale, shift = _pool_case(shape, cols, 6)
    x[0, 0] = float("nan")
    out = native.bn_relu_pool(x, spatial, scale, shift)
    want = _avg_pool(_grid_of(torch.relu(x * scale + shift), shape[0], spatial))
    pooled = want.shape[2:]
    torch.testing.assert_close(_grid_of(out, shape[0], pooled), want, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert out[0, 0].isnan()  # NaN passes ReLU and pooling, as in torch


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape,cols", POOL_GRIDS)
def test_unpool_kernels_match_autograd_through_relu_and_pool(shape, cols, train):
    # d = the gradient that autograd sends through avg_pool and ReLU to the BN output;
    # the kernels form d from the pooled gradient without materializing it.
    x, spatial, scale, shift = _pool_case(shape, cols, 7)
    n = shape[0]
    a = _grid_of(x * scale + shift, n, spatial).requires_grad_()
    pooled = _avg_pool(torch.relu(a))
    g = torch.randn_like(pooled)
    pooled.backward(g)
    d = a.grad.movedim(1, -1).reshape(-1, cols).double()
    g_rows = g.movedim(1, -1).reshape(-1, cols)
    mean = x.double().mean(0).float()
    sum_d, sum_dx = native.unpool_relu_bn_sums(g_rows, x, spatial, scale, shift, mean)
    terms = d * (x.double() - mean.double())
    assert ((sum_d.double() - d.sum(0)).abs() <= 1e-6 * d.abs().sum(0) + 1e-7).all()
    assert ((sum_dx.double() - terms.sum(0)).abs() <= 1e-6 * terms.abs().sum(0) + 1e-7).all()
    k = torch.randn(cols)
    b, c = (torch.randn(cols), torch.randn(cols)) if train else (None, None)
    out = native.unpool_bn_grad(g_rows, x, spatial, scale, shift, k, mean, b, c)
    want = d.float() * k + ((x - mean) * b + c if train else 0.0)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,cols", POOL_GRIDS)
def test_bf16_pooling_kernels_compute_in_float32_and_round_once(shape, cols):
    # a transition under bf16 autocast: bf16 rows in and out, float32 arithmetic, one rounding
    x, spatial, scale, shift = _pool_case(shape, cols, 8)
    xb = x.bfloat16()
    n = shape[0]
    out = native.bn_relu_pool(xb, spatial, scale, shift)
    want = _avg_pool(_grid_of(torch.relu(xb.float() * scale + shift), n, spatial))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(_grid_of(out.float(), n, want.shape[2:]), want.bfloat16().float(),
                               rtol=2 ** -8, atol=1e-5)
    g_rows = torch.randn(out.shape).bfloat16()
    mean, k, b, c = xb.float().mean(0), torch.randn(cols), torch.randn(cols), torch.randn(cols)
    got = native.unpool_bn_grad(g_rows, xb, spatial, scale, shift, k, mean, b, c)
    want = native.unpool_bn_grad(g_rows.float(), xb.float(), spatial, scale, shift, k, mean, b, c)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.bfloat16().float(), rtol=2 ** -7, atol=1e-5)
    sums = native.unpool_relu_bn_sums(g_rows, xb, spatial, scale, shift, mean)
    for got_sum, want_sum in zip(sums, native.unpool_relu_bn_sums(g_rows.float(), xb.float(), spatial, scale,
                                                                  shift, mean)):
        torch.testing.assert_close(got_sum, want_sum, rtol=1e-5, atol=1e-5)


def test_pool_wrappers_refuse_what_the_c_code_would_misread():
    x = torch.randn(2 * 6 * 6, 4)
    ones = torch.ones(4)
    with pytest.raises(ValueError, match="whole number"):
        native.bn_relu_pool(x, (5, 6), ones, ones)
    with pytest.raises(ValueError, match="size >= 2"):
        native.bn_relu_pool(x[:12], (1, 6), ones, ones)
    with pytest.raises(ValueError, match=r"shape \(18, 4\)"):  # the pooled gradient's shape
        native.unpool_relu_bn_sums(torch.randn(72, 4), x, (6, 6), ones, ones, ones)
    with pytest.raises(ValueError, match="both b and c"):
        native.unpool_bn_grad(torch.randn(18, 4), x, (6, 6), ones, ones, ones, ones, ones, None)


# (N, *spatial), columns, and the max pooling's kernel, stride and padding: the ImageNet stem's
# 3x3/2/1, windows that do not overlap, a 1D and a 3D one, a threaded size and uneven sides.
MAX_POOLS = [((3, 9), 5, (3,), (2,), (1,)), ((2, 7, 9), 6, (3, 3), (2, 2), (1, 1)),
             ((2, 8, 8), 3, (2, 2), (2, 2), (0, 0)), ((2, 5, 6, 7), 4, (3, 2, 3), (2, 1, 2), (1, 1, 0)),
             ((4, 33, 30), 40, (3, 3), (2, 2), (1, 1))]


def _max_pool(t, kernel, stride, padding, **kw):
    return {3: torch.nn.functional.max_pool1d, 4: torch.nn.functional.max_pool2d,
            5: torch.nn.functional.max_pool3d}[t.dim()](t, kernel, stride, padding, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,cols,kernel,stride,padding", MAX_POOLS)
def test_relu_maxpool_matches_torch_and_its_offsets_carry_the_gradient(shape, cols, kernel, stride, padding,
                                                                       dtype):
    x, spatial, scale, shift = _pool_case(shape, cols, 9)
    x = x.to(dtype)
    n = shape[0]
    x[:n * 4, 0] = 0.5  # ties: torch takes the first of equal maxima
    x[1, 1] = float("nan")
    # the kernel computes x * scale + shift in float32 (a fused multiply-add: one rounding less
    # than this reference) and rounds the maximum once to the dtype
    y = _grid_of(x.float() * scale + shift, n, spatial)
    want = _max_pool(torch.relu(y), kernel, stride, padding)
    out, offsets = native.relu_maxpool(x, spatial, kernel, stride, padding, scale, shift, arg=True)
    assert out.dtype == dtype and offsets.dtype == torch.uint8
    torch.testing.assert_close(_grid_of(out, n, want.shape[2:]), want.to(dtype), rtol=1e-6, atol=1e-6,
                               equal_nan=True)
    plain, none = native.relu_maxpool(x, spatial, kernel, stride, padding)  # relu(x): no scale, shift
    assert none is None
    torch.testing.assert_close(_grid_of(plain, n, want.shape[2:]),
                               _max_pool(torch.relu(_grid_of(x, n, spatial)), kernel, stride, padding),
                               rtol=0, atol=0, equal_nan=True)
    # backward: autograd through ReLU and max pooling to y, then batch norm's terms
    y.requires_grad_()
    pooled = _max_pool(torch.relu(y), kernel, stride, padding)
    g = torch.randn_like(pooled).to(dtype)
    pooled.backward(g.float())
    d = y.grad.movedim(1, -1).reshape(-1, cols).double()
    g_rows = g.movedim(1, -1).reshape(-1, cols)
    mean = x.float().nanmean(0)
    sum_d, sum_dx = native.maxpool_bn_sums(g_rows, offsets, x, spatial, kernel, stride, padding, mean)
    terms = d * (x.double() - mean.double())
    finite = terms.isfinite().all(0)  # the NaN's column: NaN either way
    assert ((sum_d.double() - d.sum(0)).abs() <= 1e-6 * d.abs().sum(0) + 1e-6).all()
    assert ((sum_dx.double() - terms.sum(0)).abs() <= 1e-6 * terms.abs().sum(0) + 1e-6)[finite].all()
    k = torch.randn(cols)
    for b, c in ((torch.randn(cols), torch.randn(cols)), (None, None)):
        got = native.unmaxpool_bn_grad(g_rows, offsets, x, spatial, kernel, stride, padding, k, mean, b, c)
        want = d.float() * k + ((x.float() - mean) * b + c if b is not None else 0.0)
        assert got.dtype == dtype
        tol = 2 ** -8 if dtype == torch.bfloat16 else 1e-6  # rounded once, to the dtype
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=1e-5, equal_nan=True)


def test_maxpool_wrappers_refuse_what_the_c_code_would_misread():
    x = torch.randn(2 * 6 * 6, 4)
    with pytest.raises(ValueError, match="whole number"):
        native.relu_maxpool(x, (5, 6), (3, 3), (2, 2), (1, 1))
    with pytest.raises(ValueError, match="do not fit"):  # padding over half the kernel, as torch refuses
        native.relu_maxpool(x, (6, 6), (3, 3), (2, 2), (2, 2))
    with pytest.raises(ValueError, match="at most 254"):
        native.relu_maxpool(torch.randn(2 * 16 ** 3, 4), (16, 16, 16), (7, 7, 7), (1, 1, 1), (0, 0, 0))
    out, offsets = native.relu_maxpool(x, (6, 6), (3, 3), (2, 2), (1, 1), arg=True)
    ones = torch.ones(4)
    with pytest.raises(ValueError, match="uint8 offsets"):
        native.maxpool_bn_sums(torch.randn(out.shape), offsets[:-1], x, (6, 6), (3, 3), (2, 2), (1, 1), ones)
    with pytest.raises(ValueError, match=r"shape \(18, 4\)"):
        native.unmaxpool_bn_grad(torch.randn(36, 4), offsets, x, (6, 6), (3, 3), (2, 2), (1, 1), ones, ones,
                                 None, None)


# (batch, height, width, in, out): one pixel; widths under, at and over a block of 14 pixels
# (29: three blocks, first and last at the edges); odd input counts (bf16 pairs a last channel
# with zero); 1 to 16 outputs; a batch of 64 14x14 images as in the ``make run`` model.
CONVS = [(1, 1, 1, 1, 1), (2, 3, 3, 5, 12), (1, 2, 14, 33, 16), (2, 29, 7, 17, 7), (1, 1, 29, 3, 2),
         (4, 5, 1, 8, 12), (64, 14, 14, 24, 12)]


def _conv_exact(x: torch.Tensor, w: torch.Tensor, n: int, h: int, wd: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The convolution of the channels-last rows ``x`` in float64 (exact for these products and
    sums of bf16 or float32 values, to float64's rounding), and of their absolute values."""
    def conv(rows, weight):
        grid = rows.double().reshape(n, h, wd, -1).permute(0, 3, 1, 2)
        return torch.nn.functional.conv2d(grid, weight.double(), padding=1).permute(0, 2, 3, 1).reshape(-1, w.shape[0])
    return conv(x, w), conv(x.abs(), w.abs())


def _exact_within_bound_on_any_thread_count(got, exact, magnitude, terms: int, dtype, rerun) -> None:
    """``got`` within float32 summation's error bound of ``exact`` (``terms`` products: terms *
    2^-24 of the sum of their absolute values, ``magnitude``), and in bf16 rounded once more at
    the end; ``rerun()`` on one thread gives the same bits."""
    bound = terms * 2.0 ** -24 * magnitude + (2.0 ** -8 * exact.abs() if dtype == torch.bfloat16 else 0)
    assert ((got.double() - exact).abs() <= bound * 1.01 + 1e-30).all()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(rerun(), got)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,w,cin,cout", CONVS)
def test_conv3x3_is_the_convolution_written_into_a_column_slice(n, h, w, cin, cout, dtype):
    """Within float32 summation's error bound of the exact convolution (n terms: n * 2^-24 of the
    sum of their absolute values), and in bf16 rounded once at the end; the output's neighbouring
    columns untouched; the same bits on one thread as on two."""
    if not native.conv3x3_supported(dtype):
        pytest.skip(f"this CPU's build has no {dtype} 3x3 convolution (AVX-512, AVX512-BF16)")
    torch.manual_seed(0)
    weight = torch.randn(cout, cin, 3, 3).to(dtype)
    conv = native.Conv3x3(weight, dtype)
    x = torch.randn(n * h * w, cin + 3).to(dtype)[:, 2:2 + cin]  # a column slice, as the input may be
    buffer = torch.full((n * h * w, cout + 5), 7.0, dtype=dtype)
    got = conv(x, (h, w), buffer[:, 1:1 + cout])
    assert got.data_ptr() == buffer[:, 1:].data_ptr()
    assert (buffer[:, 0] == 7).all() and (buffer[:, 1 + cout:] == 7).all()
    exact, magnitude = _conv_exact(x, weight, n, h, w)
    _exact_within_bound_on_any_thread_count(got, exact, magnitude, 9 * cin, dtype,
                                            lambda: conv(x, (h, w), torch.empty(n * h * w, cout, dtype=dtype)))


def test_conv3x3_refuses_what_the_c_code_would_misread():
    if not native.conv3x3_supported(torch.float32):
        pytest.skip("this CPU's build has no 3x3 convolution (AVX-512)")
    conv = native.Conv3x3(torch.randn(12, 8, 3, 3), torch.float32)
    x, out = torch.randn(2 * 5 * 4, 8), torch.empty(40, 12)
    conv(x, (5, 4), out)
    for bad_x, spatial, bad_out in [(x, (5, 5), out),                        # rows not whole images
                                    (x[:, :7], (5, 4), out),                 # channels
                                    (torch.randn(8, 40).t(), (5, 4), out),  # columns not contiguous
                                    (x.bfloat16(), (5, 4), out),             # dtype
                                    (x, (5, 4), out[:, :11]),                # output width
                                    (x, (5, 4), out[:39]),                   # output rows
                                    (x, (2, 5, 4), out),                     # 3D
                                    (x.view(2, 5, 4, 8), (5, 4), out)]:      # not a matrix
        with pytest.raises(ValueError, match="native 3x3 convolution"):
            conv(bad_x, spatial, bad_out)
    for weight in (torch.randn(17, 8, 3, 3), torch.randn(12, 8, 5, 5), torch.randn(12, 8, 3)):
        with pytest.raises(ValueError, match="Conv3x3 takes"):
            native.Conv3x3(weight, torch.float32)
    with pytest.raises(ValueError, match="no 3x3 convolution on torch.float64"):
        native.Conv3x3(torch.randn(12, 8, 3, 3), torch.float64)


# (batch, in, out, kernel, stride, padding, height, width): the ``make run`` model's stem (1 to
# 24 channels, stride 2), an RGB one at stride 1, outputs over one, two and three 16-lane
# vectors, odd sizes and strides, rows shorter and longer than a group of 4 pixels, 7x7 RGB
STEMS = [(64, 1, 24, 3, 2, 1, 28, 28), (3, 3, 24, 3, 1, 1, 9, 10), (2, 1, 1, 3, 1, 1, 1, 1), (2, 2, 40, 5, 3, 2, 11, 7),
         (1, 3, 64, 7, 2, 3, 17, 19), (2, 4, 17, 1, 1, 0, 3, 5), (1, 1, 33, 3, 2, 0, 9, 9)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,cin,cout,k,stride,pad,h,w", STEMS)
def test_stem_conv_is_the_convolution_in_channels_last(n, cin, cout, k, stride, pad, h, w, dtype):
    """Within float32 summation's error bound of the exact convolution of the weights rounded
    to ``dtype`` (bf16: and rounded once at the end), channels-last, the same bits on one
    thread as on two."""
    if not native.conv3x3_supported(dtype):
        pytest.skip(f"this CPU's build has no {dtype} native convolution (AVX-512, AVX512-BF16)")
    torch.manual_seed(0)
    weight = torch.randn(cout, cin, k, k)
    conv = native.StemConv(weight, (stride, stride), (pad, pad), dtype)
    x = torch.randn(n, cin, h, w).to(dtype)
    got = conv(x)
    w_d = weight.to(dtype).double()
    exact = torch.nn.functional.conv2d(x.double(), w_d, stride=stride, padding=pad)
    magnitude = torch.nn.functional.conv2d(x.double().abs(), w_d.abs(), stride=stride, padding=pad)
    assert got.shape == exact.shape and got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    _exact_within_bound_on_any_thread_count(got, exact, magnitude, cin * k * k, dtype, lambda: conv(x))


def test_stem_conv_refuses_what_the_c_code_would_misread():
    if not native.conv3x3_supported(torch.float32):
        pytest.skip("this CPU's build has no native convolution (AVX-512)")
    conv = native.StemConv(torch.randn(24, 1, 3, 3), (2, 2), (1, 1), torch.float32)
    for bad in (torch.randn(2, 3, 8, 8),                          # channels
                torch.randn(2, 1, 8, 8).bfloat16(),               # dtype
                torch.randn(2, 1, 8, 16)[..., ::2],               # not contiguous
                torch.randn(1, 8, 8),                             # not a batch
                torch.randn(2, 1, 0, 8)):                         # no output
        with pytest.raises(ValueError, match="native stem convolution"):
            conv(bad)
    with pytest.raises(ValueError, match="at most 64 output channels"):
        native.StemConv(torch.randn(65, 1, 3, 3), (1, 1), (1, 1), torch.float32)
    with pytest.raises(ValueError, match="no stem convolution on torch.float64"):
        native.StemConv(torch.randn(24, 1, 3, 3), (1, 1), (1, 1), torch.float64)


# (rows, in, out): under and over a group of 8 (or 4) rows, one to four 16-lane vectors of
# outputs, odd input counts (bf16 pairs a last channel with zero), the pruned ``make run``
# model's first block (12,544 rows); past 64 outputs, in chunks of 64 from one tile: a last
# chunk of one vector (65, 80) or two (96), run by 4-row functions as the wide chunks' groups
# are of 4 rows, of three (100, odd inputs), and two whole chunks (densenet121's bottleneck)
POINTWISE = [(1, 1, 1), (7, 5, 17), (13, 33, 48), (9, 2, 64), (12544, 16, 24), (100, 84, 32),
             (11, 7, 65), (30, 40, 80), (13, 9, 96), (9, 33, 100), (1001, 96, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("rows,cin,cout", POINTWISE)
def test_pointwise_is_the_product_with_bias_and_relu_written_into_a_column_slice(rows, cin, cout, relu, dtype):
    """Within float32 summation's error bound of the exact product plus bias (and ReLU), bf16
    rounded once at the end; from a column slice into a column slice, the neighbouring columns
    untouched; the same bits on one thread as on two."""
    if not native.conv3x3_supported(dtype):
        pytest.skip(f"this CPU's build has no {dtype} native convolution (AVX-512, AVX512-BF16)")
    torch.manual_seed(0)
    weight, bias = torch.randn(cout, cin, 1, 1), torch.randn(cout)
    conv = native.Pointwise(weight, bias, dtype, relu)
    x = torch.randn(rows, cin + 3).to(dtype)[:, 2:2 + cin]
    buffer = torch.full((rows, cout + 5), 7.0, dtype=dtype)
    got = conv(x, buffer[:, 1:1 + cout])
    assert got.data_ptr() == buffer[:, 1:].data_ptr()
    assert (buffer[:, 0] == 7).all() and (buffer[:, 1 + cout:] == 7).all()
    w = weight.to(dtype).double().reshape(cout, cin).t()
    exact = x.double() @ w + bias.double()
    magnitude = x.double().abs() @ w.abs() + bias.double().abs()
    if relu:
        exact = exact.clamp_min(0)
    _exact_within_bound_on_any_thread_count(got, exact, magnitude, cin + 1, dtype, lambda: conv(x))
    poisoned = x.clone()
    poisoned[0, 0] = float("nan")
    assert conv(poisoned)[0].isnan().all()  # a NaN passes the ReLU, as torch.relu keeps it


def _into_a_column_slice_only(run, want):
    """``run(out)`` into columns 1.. of a wider matrix writes ``want`` there and nothing beside it."""
    rows, cout = want.shape
    wide = torch.full((rows, cout + 3), 7.0, dtype=want.dtype)
    run(wide[:, 1:1 + cout])
    assert torch.equal(wide[:, 1:1 + cout], want)
    assert (wide[:, 0] == 7).all() and (wide[:, 1 + cout:] == 7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# (65, 24, 24), (300, 24, 24) and (100, 300, 16): several tiles of rows and a part tile (native.c's
# pw_tile_rows), each thread's share a tile or more
@pytest.mark.parametrize("rows,cin,cout", [(1, 1, 1), (13, 33, 48), (50, 120, 48), (9, 2, 64), (50, 33, 80),
                                           (203, 128, 128), (65, 24, 24), (300, 24, 24), (100, 300, 16)])
def test_pointwise_with_bn_relu_is_the_product_of_bn_relus_output_bit_for_bit(rows, cin, cout, dtype):
    """With scale and shift the product reads ReLU(x * scale + shift), formed as bn_relu forms it
    (rounded once to the matrix's dtype): the same bits as bn_relu into a matrix, then the
    product, on one thread or two; the NaN a BN-ReLU passes reaches every output of its row."""
    if not native.conv3x3_supported(dtype):
        pytest.skip(f"this CPU's build has no {dtype} native convolution (AVX-512, AVX512-BF16)")
    torch.manual_seed(1)
    conv = native.Pointwise(torch.randn(cout, cin, 1, 1), None, dtype, relu=False)
    x = torch.randn(rows, cin + 5).to(dtype)[:, 3:3 + cin]  # a column slice, as of a block's buffer
    scale, shift = torch.rand(cin) + 0.5, torch.randn(cin) * 0.5
    want = conv(native.bn_relu(x, scale, shift, torch.empty(rows, cin, dtype=dtype)))
    got = conv(x, scale=scale, shift=shift)
    assert torch.equal(got, want)
    _into_a_column_slice_only(lambda out: conv(x, out=out, scale=scale, shift=shift), want)
    _exact_within_bound_on_any_thread_count(got, got.double(), got.double().abs(), 0, torch.float32,
                                            lambda: conv(x, scale=scale, shift=shift))
    poisoned = x.clone()
    poisoned[-1, -1] = float("nan")
    assert conv(poisoned, scale=scale, shift=shift)[-1].isnan().all()
    with pytest.raises(ValueError, match="native 1x1 convolution"):
        conv(x, scale=scale)  # a scale needs its shift


@pytest.mark.parametrize("rows,cols", [(1, 1), (37, 20), (300, 48), (2000, 120)])
def test_relu_bn_sums_read_the_mask_from_the_input_as_from_the_bn_relu_output(rows, cols):
    """Without a, the mask is x * scale + shift > 0: the same results, bit for bit, as with the
    BN-ReLU's output a (bf16), NaN included; the float32 build refuses it."""
    if not native.relu_mask_from_input(torch.bfloat16):
        pytest.skip("this CPU's build reads no mask from the input (AVX512-BF16)")
    torch.manual_seed(2)
    x = (torch.randn(rows, cols + 3) * 2).bfloat16()[:, 1:cols + 1]
    x[0, 0] = float("nan")
    scale, shift = torch.rand(cols) + 0.5, torch.randn(cols)
    a = native.bn_relu(x, scale, shift, torch.empty(rows, cols, dtype=torch.bfloat16))
    g, k, mean = torch.randn(rows, cols).bfloat16(), torch.randn(cols), torch.randn(cols) * 0.1
    acc = torch.randn(rows, cols).bfloat16()
    acc_ref = acc.clone()
    want = native.relu_bn_sums(g, a, x=x, mean=mean, acc=acc_ref, k=k)
    got = native.relu_bn_sums(g, None, x=x, mean=mean, acc=acc, k=k, scale=scale, shift=shift)
    assert torch.equal(acc, acc_ref)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1][1:], want[1][1:]) and got[1][0].isnan() and want[1][0].isnan()  # NaN x passes
    with pytest.raises(ValueError, match="no a needs x, scale and shift"):
        native.relu_bn_sums(g, None, x=x, mean=mean)
    with pytest.raises(ValueError, match="only in bfloat16"):
        native.relu_bn_sums(g.float(), None, x=x.float(), mean=mean, scale=scale, shift=shift)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cin,cout,with_src,threads", [(1, 1, 1, False, None), (7, 17, 5, True, None),
                                                           (129, 33, 48, False, None), (2000, 120, 48, True, None),
                                                           (67, 70, 13, False, None), (300, 216, 128, False, None),
                                                           (1500, 40, 48, False, 3)])
def test_whole_1x1_backward_is_the_exact_result_within_float32s_bound(rows, cin, cout, with_src, threads, dtype):
    """One pass for a 1x1 convolution of ReLU(x * scale + shift): d = (g @ w) masked where
    x * scale + shift <= 0 (a NaN x passes, as in relu_bn_sums), its column sums, acc = src +
    d * k rounded once to the matrices' dtype, and the weight gradient: each within float32
    summation's bound of the float64 result from the same values; odd output counts, row and
    column tails, strided rows, an uneven split over 3 threads included; columns past the
    layer's, src and the inputs untouched."""
    if not native.conv3x3_supported(dtype):
        pytest.skip(f"this CPU's build has no {dtype} 1x1 backward (AVX-512; AVX512-BF16 for bf16)")
    torch.manual_seed(4)
    x = torch.randn(rows, cin + 4).to(dtype)[:, 2:2 + cin]
    x[0, 0] = float("nan")
    scale, shift = torch.rand(cin) + 0.5, torch.randn(cin) * 0.5
    mean, k = torch.randn(cin) * 0.1, torch.randn(cin)
    g = torch.randn(rows, cout + 5).to(dtype)[:, 3:3 + cout]  # rows apart by more than cout
    w = torch.randn(cout, cin, 1, 1).to(dtype)
    store = torch.randn(rows, cin + 3).to(dtype)
    acc, src = store[:, :cin], torch.randn(rows, cin).to(dtype) if with_src else None
    before, base = store.clone(), (src if with_src else store[:, :cin]).double()
    inputs = [t.clone() for t in (x, g, w) + ((src,) if with_src else ())]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        sum_d, sum_dx, dw = native.pointwise_backward(g, x, w, scale, shift, mean, k, acc, src)
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(t, u) for t, u in zip(inputs, (x, g, w, src)) if not t.isnan().any())
    assert sum_d.dtype == sum_dx.dtype == dw.dtype == torch.float32 and dw.shape == (cout, cin)

    # the kernel's fused multiply-add rounds the exact value once: the same sign
    on = x.double() * scale.double() + shift.double() > 0
    on[0, 0] = True  # the NaN passes
    d = (g.double() @ w.double().view(cout, cin)) * on
    dmag = (g.double().abs() @ w.double().view(cout, cin).abs()) * on * (cout + 1) * 2.0 ** -24  # |error| of each d
    centered = x.double() - mean.double()
    a = native.bn_relu(x, scale, shift, torch.empty(rows, cin, dtype=dtype)).double()
    eps = 2.0 ** -24
    tail = slice(1, None)  # column 0 holds the NaN, which d * (x - mean) and a carry there
    assert sum_dx[0].isnan() and not sum_d.isnan().any() and not acc.isnan().any()
    assert ((sum_d.double() - d.sum(0)).abs() <= dmag.sum(0) + 8 * eps * d.abs().sum(0) + 1e-30).all()
    assert ((sum_dx.double() - (d * centered).sum(0)).abs()[tail]
            <= ((dmag * centered.abs()).sum(0) + 8 * eps * (d * centered).abs().sum(0))[tail] + 1e-30).all()
    want = base + d * k.double()
    rounding = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -23  # one rounding to the dtype
    assert ((acc.double() - want).abs() <= rounding * want.abs() + dmag * k.double().abs() + 1e-30).all()
    exact = g.double().t() @ a.nan_to_num()
    bound = (rows + 1) * eps * (g.double().abs().t() @ a.nan_to_num().abs())
    assert dw[:, 0].isnan().all() and ((dw.double() - exact).abs()[:, tail] <= bound[:, tail] + 1e-30).all()
    assert torch.equal(store[:, cin:], before[:, cin:])
    no_w = native.pointwise_backward(g, x, w, scale, shift, mean, k, acc.clone(), src, weight_grad=False)
    assert no_w[2] is None  # its rows may be split over more threads: the same sums within their bound
    assert ((no_w[0].double() - d.sum(0)).abs() <= dmag.sum(0) + 8 * eps * d.abs().sum(0) + 1e-30).all()
    with pytest.raises(ValueError, match="native kernels need"):
        native.pointwise_backward(g.double(), x, w, scale, shift, mean, k, acc)


def test_whole_1x1_backward_returns_float32_under_another_default_dtype():
    """The sums and the weight gradient are float32 whatever torch's default dtype (the C code
    writes float32 into them)."""
    if not native.conv3x3_supported(torch.float32):
        pytest.skip("this CPU's build has no 1x1 backward (AVX-512)")
    x, g, w, acc = torch.randn(40, 20), torch.randn(40, 6), torch.randn(6, 20), torch.zeros(40, 20)
    vecs = [torch.rand(20) + 0.5, torch.randn(20), torch.randn(20), torch.randn(20)]
    want = native.pointwise_backward(g, x, w, *vecs, acc.clone())
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = native.pointwise_backward(g, x, w, *vecs, acc.clone())
    finally:
        torch.set_default_dtype(previous)
    assert all(t.dtype == torch.float32 and torch.equal(t, u) for t, u in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width,cout", [(1, 5, 3), (37, 60, 48), (203, 200, 128), (50, 40, 80), (65, 40, 24),
                                              (300, 40, 24), (150, 60, 48), (100, 500, 16)])
def test_pointwise_of_gathered_columns_is_the_product_of_the_gather_bit_for_bit(rows, width, cout, dtype):
    """With an index (a pruned layer's columns of the block's buffer) the tile is what
    gather_cols with BN-ReLU (or without: plain) writes, so the result is that gather's product
    to the bit, on one thread or two; a column past the width is refused before any read."""
    if not native.conv3x3_supported(dtype):
        pytest.skip(f"this CPU's build has no {dtype} native convolution (AVX-512, AVX512-BF16)")
    torch.manual_seed(2)
    index = torch.sort(torch.randperm(width)[:max(1, width * 3 // 5)]).values
    cin = index.numel()
    weight = torch.randn(cout, cin, 1, 1)
    plain = native.Pointwise(weight, None, dtype, relu=False)
    conv = native.Pointwise(weight, None, dtype, relu=False, index=index, width=width)
    x = torch.randn(rows, width + 4).to(dtype)[:, 1:1 + width]
    scale, shift = torch.rand(cin) + 0.5, torch.randn(cin) * 0.5
    gathered = native.gather_cols(x, index, torch.empty(rows, cin, dtype=dtype), scale, shift)
    got = conv(x, scale=scale, shift=shift)
    assert torch.equal(got, plain(gathered))
    _into_a_column_slice_only(lambda out: conv(x, out=out, scale=scale, shift=shift), got)
    assert torch.equal(conv(x), plain(native.gather_cols(x, index, torch.empty(rows, cin, dtype=dtype))))
    _exact_within_bound_on_any_thread_count(got, got.double(), got.double().abs(), 0, torch.float32,
                                            lambda: conv(x, scale=scale, shift=shift))
    with pytest.raises(ValueError, match="native 1x1 convolution"):
        conv(x[:, :-1], scale=scale, shift=shift)  # the input must have the index's width
    with pytest.raises(ValueError, match="input columns"):
        native.Pointwise(weight, None, dtype, relu=False, index=index + width - int(index.max()), width=width)


def test_pointwise_refuses_what_the_c_code_would_misread():
    if not native.conv3x3_supported(torch.float32):
        pytest.skip("this CPU's build has no native convolution (AVX-512)")
    conv = native.Pointwise(torch.randn(12, 8, 1, 1), None, torch.float32, relu=False)
    x, out = torch.randn(40, 8), torch.empty(40, 12)
    conv(x, out)
    for bad_x, bad_out in [(x[:, :7], out),                   # channels
                           (torch.randn(8, 40).t(), out),     # columns not contiguous
                           (x.bfloat16(), out),               # dtype
                           (x, out[:, :11]),                  # output width
                           (x, out[:39]),                     # output rows
                           (x.view(2, 20, 8), out)]:          # not a matrix
        with pytest.raises(ValueError, match="native 1x1 convolution"):
            conv(bad_x, bad_out)
    for weight in (torch.randn(129, 8, 1, 1), torch.randn(12, 8, 3, 3)):
        with pytest.raises(ValueError, match="Pointwise takes"):
            native.Pointwise(weight, None, torch.float32, relu=False)
    with pytest.raises(ValueError, match="no 1x1 convolution on torch.float64"):
        native.Pointwise(torch.randn(12, 8, 1, 1), None, torch.float64, relu=False)


def test_native_results_do_not_vary_between_runs():
    torch.manual_seed(4)
    g, a = torch.randn(20000, 30), torch.relu(torch.randn(20000, 30))
    zeros, ones = torch.zeros(30), torch.ones(30)
    first = native.relu_bn_sums(g, a, x=a, mean=zeros)
    first_pool = native.unpool_relu_bn_sums(g[:5000], a, (50, 40), ones, zeros, zeros)
    for _ in range(3):
        again = native.relu_bn_sums(g, a, x=a, mean=zeros)
        again_pool = native.unpool_relu_bn_sums(g[:5000], a, (50, 40), ones, zeros, zeros)
        assert all(torch.equal(p, q) for p, q in zip(first + first_pool, again + again_pool))


@pytest.mark.parametrize("train", [True, False])
def test_fused_block_native_and_torch_ops_agree_on_a_threaded_size(train):
    # 8 x 24 x 24 = 4608 rows and 16-40 channels: the kernels split rows between threads
    torch.manual_seed(5)
    block = DenseBlock(16, 8, 3, bn_size=4).train(train)
    block.fused = True
    other = copy.deepcopy(block)
    x = torch.randn(8, 16, 24, 24)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = block(x1)
    with native.disabled():
        y2 = other(x2)
    g = torch.randn_like(y1)
    y1.backward(g)
    with native.disabled():
        y2.backward(g)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for p, q in zip(block.parameters(), other.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)
    for p, q in zip(block.buffers(), other.buffers()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("pruned", [False, True])
def test_fused_block_under_bf16_autocast_native_as_close_to_fp32_as_torch_ops(train, pruned):
    """Under bf16 autocast the block's buffer and gradients are bf16; the native kernels take
    them and compute in float32. Against the float32 block, their outputs and gradients are
    no further off than the torch ops' (which round scales and shifts to bf16 too)."""
    from densekit.prune import prune_model

    torch.manual_seed(6)
    block = DenseBlock(16, 8, 3, bn_size=4).train(train)
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    block.fused = True
    if pruned:
        prune_model(block, 0.3)
    x = torch.randn(8, 16, 24, 24)
    g = torch.randn(8, block.out_channels, 24, 24)

    def run(model, bf16, kernels):
        model = copy.deepcopy(model)
        xi = x.clone().requires_grad_()
        with contextlib.ExitStack() as stack:
            if not kernels:
                stack.enter_context(native.disabled())
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = model(xi)
            y.float().backward(g)
        return [y.float(), xi.grad.float(), *[p.grad for p in model.parameters()]]

    exact = run(block, False, True)
    with_native, with_ops = run(block, True, True), run(block, True, False)
    errors = [[((got - want).norm() / want.norm()).item() for got in (a, b)]
              for want, a, b in zip(exact, with_native, with_ops)]
    # bf16 keeps 8 bits: the gradients of the norms' parameters, sums over 4,608 rows of
    # products of rounded values, are off by up to about a tenth (in L2) either way, and which
    # path is closer on one tensor is chance; over all of them the native kernels are not worse
    native_err, ops_err = (sum(e[i] for e in errors) / len(errors) for i in (0, 1))
    assert all(n < 0.2 for n, _ in errors) and native_err <= 1.1 * ops_err, errors


def test_without_a_compiler_the_block_falls_back_to_torch_ops(tmp_path):
    code = ("import logging, torch; logging.basicConfig(level=logging.WARNING);"
            "from densekit import create_model; from densekit.models import native;"
            "m = create_model('densenet_bc_40_k12_s2', num_classes=10, in_chans=1);"
            "m(torch.randn(2, 1, 28, 28)).sum().backward();"
            "print('available', native.available())")
    env = dict(os.environ, CC="/bin/false", DENSEKIT_CACHE=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "available False" in done.stdout
    assert "native CPU kernels unavailable" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no partial library left behind


def test_disabled_by_environment(tmp_path):
    code = "from densekit.models import native; print(native.available())"
    env = dict(os.environ, DENSEKIT_NATIVE="0")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "False", done.stderr


def test_a_cached_library_that_does_not_load_is_built_again(tmp_path):
    code = "from densekit.models import native; print(native.available())"
    env = dict(os.environ, DENSEKIT_CACHE=str(tmp_path))
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    (lib,) = tmp_path.glob("native-*.so")
    lib.write_bytes(b"truncated")
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert first.stdout.strip() == again.stdout.strip() == "True", again.stderr
    assert lib.stat().st_size > 1000 and lib.stat().st_mode & 0o755 == 0o755
