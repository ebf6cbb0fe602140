"""Fused elementwise CPU kernels for the dense block (native.c), built at first use.

On the CPU half of a fused block's training step is elementwise work over its feature
buffer: BN-ReLU, the ReLU mask in backward, batch norm's column sums and the gradient
accumulation, each a torch op that reads and writes the whole matrix. native.c does each
group in one pass. The library is compiled once per machine with the system C compiler
(``cc``, or ``$CC``) into a cache folder (``$DENSEKIT_CACHE``, else
``$XDG_CACHE_HOME/densekit``, else ``~/.cache/densekit``); where there is no compiler or
the build fails, or with ``DENSEKIT_NATIVE=0``, the block runs the same steps as torch
ops, and :func:`available` says which.

Each wrapper takes (rows, cols) CPU matrices whose columns are contiguous (any row stride,
so a column slice of the buffer is read in place) and per-column vectors. The kernels
take float32 or bfloat16 matrices (all of one call in the same dtype: a dense block or a
transition under bf16 autocast holds its activations and gradients in bf16) and compute in
float32.

Some kernels are not elementwise: :class:`Conv3x3`, a DenseNet-BC layer's last convolution,
written here because oneDNN's convolution has a fixed cost of about 250 us per call at 14x14
in a batch of 64 on these narrow shapes; :class:`StemConv` and :class:`Pointwise`, the
inference copy's stem and 1x1 convolutions (``frozen.py``); and, for a bf16 training step,
:class:`Pointwise` with a BN-ReLU formed in its tile and :func:`pointwise_backward`, so that the
fused block never writes a bottleneck's BN-ReLU output to memory (native.c,
docs/performance.md#pruning and "A Zen 4 EPYC" have the figures).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("native.c")
# -march=native: the library is built on the machine that runs it (the cache key holds
# the CPU's flags, so a shared home on another CPU builds its own). GNU C's default
# -ffp-contract=fast lets a*b + c become one fused multiply-add. -fno-trapping-math (no
# code here reads floating-point exception flags) lets GCC vectorize the ReLU mask's select
# beside a float64 sum; without it those loops run scalar, slower than torch.
_FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"]
_P, _I, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "dk_bn_relu": [_P, _I, _P, _I, _I, _I, _P, _P, _C],
    "dk_gather_cols": [_P, _I, _I, _P, _P, _I, _I, _I, _P, _P, _C],
    "dk_scatter_add_cols": [_P, _I, _P, _P, _I, _I, _I, _I, _C],
    "dk_relu_bn_sums": [_P, _I, _P, _I, _I, _I, _P, _I, _P, _I, _P, _P, _I, _P, _I, _P, _P, _P, _P, _P, _C],
    "dk_bn_grad_apply": [_P, _I, _P, _I, _P, _I, _I, _I, _P, _P, _P, _P, _C],
    "dk_col_stats": [_P, _I, _I, _I, _P, _P, _C],
    "dk_bn_relu_pool": [_P, _I, _P, _I] + [_I] * 8 + [_P, _P, _C],
    "dk_unpool_relu_bn_sums": [_P, _I, _P, _I] + [_I] * 8 + [_P] * 5 + [_C],
    "dk_unpool_bn_grad": [_P, _I, _P, _I] + [_I] * 8 + [_P] * 6 + [_P, _I, _C],
    "dk_relu_maxpool": [_P, _I, _P, _I, _P, _P, _P, _I, _P, _C],
    "dk_maxpool_bn_sums": [_P, _I, _P, _P, _I, _P, _I, _P, _P, _P, _C],
    "dk_unmaxpool_bn_grad": [_P, _I, _P, _P, _I, _P, _I, _P, _P, _P, _P, _P, _I, _C],
}
# every kernel also exists for bfloat16 matrices, as <name>_bf16 (native.c's second pass)
_BF16 = tuple(_SIGNATURES)
_SIGNATURES.update({f"{name}_bf16": _SIGNATURES[name] for name in _BF16})
# the 3x3 convolution takes its dtype as an argument (its bf16 weights are packed another way)
_SIGNATURES.update({"dk_conv3x3": [_C, _P, _I, _I, _I, _I, _I, _P, _I, _P, _I, _C], "dk_conv3x3_support": [],
                    "dk_stem_conv": [_C, _P, *[_I] * 4, _P, *[_I] * 9, _P, _C],
                    "dk_pointwise": [_C, _P, _I, _I, _I, _P, _P, _I, _C, _P, _I, _P, _P, _P, _I, _C],
                    "dk_pointwise_backward": [_C, _P, _I, _P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _I, _P, _I,
                                              _P, _P, _P, _C],
                    "dk_dense_layers": [_C, _P, *[_I] * 7, _P, _P, _P, _C]})
_DTYPES = (torch.float32, torch.bfloat16)
_enabled = os.environ.get("DENSEKIT_NATIVE", "1") != "0"


def _cache_dir() -> Path:
    root = os.environ.get("DENSEKIT_CACHE") or os.environ.get("XDG_CACHE_HOME")
    if root:
        return Path(root) / ("" if os.environ.get("DENSEKIT_CACHE") else "densekit")
    return Path.home() / ".cache" / "densekit"


def _cpu_fingerprint() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [ln for ln in text.splitlines() if ln.startswith(("flags", "model name", "Features"))]
    return "\n".join(sorted(set(lines)))


def _build() -> Path:
    """The compiled library's path, building it if this machine has none cached yet."""
    cc = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]
    if not cc[0]:
        raise RuntimeError("no C compiler (cc) on PATH")
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), *cc, version, " ".join(_FLAGS), platform.machine(),
                                    _cpu_fingerprint()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"native-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([*cc, *_FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cc)} failed: {done.stderr.strip().splitlines()[-1:]}")
        os.chmod(tmp, 0o755)  # mkstemp made it 0600: others sharing the cache load it too
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    if platform.system() != "Linux":
        return None  # the OpenMP set-up above is the one of GCC on Linux
    try:
        target = _build()
        try:
            lib = ctypes.CDLL(str(target))
        except OSError:  # a cached file that does not load (truncated by a full disk, ...): build again
            target.unlink(missing_ok=True)
            lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.warning("densekit: native CPU kernels unavailable (%s); the dense block uses torch ops", err)
        return None
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


@torch.compiler.assume_constant_result  # under torch.compile: called, not traced (it may build the library)
def available() -> bool:
    """True when the fused block's CPU passes run as native kernels."""
    return _enabled and _library() is not None


@contextlib.contextmanager
def disabled():
    """Run the block's CPU passes as torch ops inside this context (for parity tests and A/B runs)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def usable(*mats: torch.Tensor) -> bool:
    """Can the native kernels take these (rows, cols) matrices (all float32, or all bfloat16)?"""
    if not _enabled:
        return False
    dtype = mats[0].dtype if mats else torch.float32
    if dtype not in _DTYPES:
        return False
    for m in mats:  # a loop, not all() over a generator: called several times per layer
        if m.device.type != "cpu" or m.dtype != dtype or m.dim() != 2 or not m.numel() \
                or (m.stride(1) != 1 and m.shape[1] != 1):
            return False
    return _library() is not None


def _kernel(name: str, mat: torch.Tensor):
    """The native function ``name`` for matrices of ``mat``'s dtype."""
    return getattr(_library(), f"{name}_bf16" if mat.dtype == torch.bfloat16 else name)


def _vec(v: torch.Tensor | None, cols: int) -> torch.Tensor | None:
    """A per-column vector as the C code reads it: cols float32 values, contiguous, on the CPU."""
    if v is None:
        return None
    if v.device.type != "cpu" or v.numel() != cols:
        raise ValueError(f"native kernels need a CPU vector of {cols} values, got {tuple(v.shape)} on {v.device}")
    if v.dtype == torch.float32 and v.is_contiguous():
        return v  # as it is: only its memory is read
    return v.detach().to(torch.float32).contiguous()


def _mats(shape: torch.Size, *mats: torch.Tensor | None, dtype: torch.dtype | None = None) -> None:
    """Every matrix given has ``shape``, contiguous columns, and ``dtype`` (default: the first's)."""
    for m in mats:
        if m is None:
            continue
        dtype = dtype or m.dtype
        if m.shape != shape or m.dtype != dtype or not usable(m):
            raise ValueError(f"native kernels need float32 or bfloat16 CPU matrices of one dtype, of shape "
                             f"{tuple(shape)} with contiguous columns, got {tuple(m.shape)} {m.dtype} on {m.device}")


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _ld(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.stride(0)


def _check(code: int, what: str = "its per-thread sums") -> None:
    if code != 0:
        raise MemoryError(f"densekit native kernel: out of memory for {what}")


def bn_relu(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = relu(x * scale + shift), per column."""
    _mats(x.shape, x, out)
    scale, shift = _vec(scale, x.shape[1]), _vec(shift, x.shape[1])
    _check(_kernel("dk_bn_relu", x)(x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), x.shape[0],
                                 x.shape[1], scale.data_ptr(), shift.data_ptr(), torch.get_num_threads()))
    return out


def _columns(index: torch.Tensor, width: int) -> torch.Tensor:
    """A column index as the C code reads it: int64 values, contiguous (a pruned layer's
    ``input_index`` is also checked to be increasing where it is set and loaded). The
    kernels check that they lie in [0, width) before touching a matrix (:func:`_check_columns`):
    here that would cost more than the gather of a small batch."""
    if index.device.type != "cpu" or index.dtype != torch.int64 or index.dim() != 1 or not index.numel():
        raise ValueError(f"native kernels need int64 CPU column indices in [0, {width})")
    return index.contiguous()


def _check_columns(code: int, width: int) -> None:
    if code == 2:
        raise ValueError(f"native kernels need int64 CPU column indices in [0, {width})")
    _check(code, "its column index")


def gather_cols(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor, scale: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
    """out[:, j] = x[:, index[j]] (``index`` increasing); with ``scale`` and ``shift``,
    relu(x[:, index[j]] * scale[j] + shift[j]) in the same pass."""
    index = _columns(index, x.shape[1])
    cols = index.numel()
    _mats(x.shape, x)
    _mats(torch.Size((x.shape[0], cols)), out, dtype=x.dtype)
    if (scale is None) != (shift is None):
        raise ValueError("native gather_cols: scale and shift go together")
    scale, shift = _vec(scale, cols), _vec(shift, cols)
    _check_columns(_kernel("dk_gather_cols", x)(x.data_ptr(), x.stride(0), x.shape[1], index.data_ptr(),
                                             out.data_ptr(), out.stride(0), x.shape[0], cols, _ptr(scale),
                                             _ptr(shift), torch.get_num_threads()), x.shape[1])
    return out


class ColumnReader:
    """:func:`bn_relu` of a matrix's first ``width`` columns, or :func:`gather_cols` of them by
    ``index`` (with BN-ReLU where ``scale`` and ``shift`` are given), for a caller that makes
    the same call many times with constant ``index``, ``scale`` and ``shift`` (an inference
    copy's dense layers): those are checked and converted once, here, and a call checks only
    its two matrices' dtype, rows, widths and column strides. The wrappers above check
    everything at every call, 5-10 us of Python per call against the kernel's own 2 us of
    call overhead; a frozen forward of the ``make run`` model makes 18 to 21 such calls
    (docs/performance.md#pruning). Build it only where :func:`available`."""

    def __init__(self, width: int, index: torch.Tensor | None, scale: torch.Tensor | None,
                 shift: torch.Tensor | None, dtype: torch.dtype) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"native kernels take float32 or bfloat16 matrices, not {dtype}")
        if (scale is None) != (shift is None) or (index is None and scale is None):
            raise ValueError("native column reader: scale and shift go together, and without an index are needed")
        self.width, self.dtype = width, dtype
        self.index = None if index is None else _columns(index, width)
        self.cols = width if index is None else self.index.numel()
        self.scale, self.shift = _vec(scale, self.cols), _vec(shift, self.cols)
        lib = _library()
        suffix = "_bf16" if dtype == torch.bfloat16 else ""
        self._fn = getattr(lib, ("dk_bn_relu" if index is None else "dk_gather_cols") + suffix)

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (rows, cols) from ``x`` (rows, at least ``width`` columns): both CPU matrices
        of this reader's dtype with contiguous columns."""
        if x.dtype != self.dtype or out.dtype != self.dtype or x.device.type != "cpu" or out.device.type != "cpu" \
                or x.dim() != 2 or out.dim() != 2 or x.shape[1] < self.width or out.shape[1] != self.cols \
                or x.shape[0] != out.shape[0] or x.stride(1) != 1 or out.stride(1) != 1:
            raise ValueError(f"a native column reader of {self.width} {self.dtype} columns got "
                             f"{tuple(x.shape)} {x.dtype} into {tuple(out.shape)} {out.dtype}")
        threads = torch.get_num_threads()
        if self.index is None:
            code = self._fn(x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), x.shape[0], self.cols,
                            self.scale.data_ptr(), self.shift.data_ptr(), threads)
        else:
            code = self._fn(x.data_ptr(), x.stride(0), self.width, self.index.data_ptr(), out.data_ptr(),
                            out.stride(0), x.shape[0], self.cols, _ptr(self.scale), _ptr(self.shift), threads)
        _check_columns(code, self.width)
        return out


def scatter_add_cols(src: torch.Tensor, index: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """dst[:, index[j]] += src[:, j] (``index`` increasing), in place."""
    index = _columns(index, dst.shape[1])
    _mats(dst.shape, dst)
    _mats(torch.Size((dst.shape[0], index.numel())), src, dtype=dst.dtype)
    _check_columns(_kernel("dk_scatter_add_cols", src)(src.data_ptr(), src.stride(0), index.data_ptr(),
                                                    dst.data_ptr(), dst.stride(0), dst.shape[1], dst.shape[0],
                                                    index.numel(), torch.get_num_threads()), dst.shape[1])
    return dst


def relu_bn_sums(g: torch.Tensor, a: torch.Tensor | None, *, dout: torch.Tensor | None = None,
                 x: torch.Tensor | None = None, mean: torch.Tensor | None = None,
                 acc: torch.Tensor | None = None, k: torch.Tensor | None = None, src: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, shift: torch.Tensor | None = None):
    """With d = g where a > 0, else 0: returns (sum of d, sum of d * (x - mean)) per column
    (the second None without ``x``); writes d into ``dout`` and adds d * k to ``acc`` if given
    (with ``src``: acc = src + d * k, acc's own values unread). With ``a`` None, a > 0 is read
    as x * scale + shift > 0, the BN-ReLU that made a, which is then never read (bfloat16 only:
    see :func:`relu_mask_from_input`)."""
    rows, cols = g.shape
    _mats(g.shape, g, a, dout, x, acc, src)
    if (x is not None and mean is None) or (acc is not None and k is None) or (src is not None and acc is None) \
            or (a is None and (x is None or scale is None or shift is None)):
        raise ValueError("native relu_bn_sums: x needs mean, acc needs k, src needs acc and no a needs x, "
                         "scale and shift")
    sum_d = torch.empty(cols, dtype=torch.float32)
    sum_dx = torch.empty(cols, dtype=torch.float32) if x is not None else None
    mean, k = _vec(mean, cols), _vec(k, cols)
    scale, shift = (None, None) if a is not None else (_vec(scale, cols), _vec(shift, cols))
    code = _kernel("dk_relu_bn_sums", g)(g.data_ptr(), g.stride(0), _ptr(a), _ld(a), rows, cols, _ptr(dout),
                                         _ld(dout), _ptr(x), _ld(x), _ptr(mean), _ptr(acc), _ld(acc), _ptr(src),
                                         _ld(src), _ptr(k), sum_d.data_ptr(), _ptr(sum_dx), _ptr(scale), _ptr(shift),
                                         torch.get_num_threads())
    if code == 2:
        raise ValueError("native relu_bn_sums: this build reads the ReLU mask from its input only in bfloat16")
    _check(code)
    return sum_d, sum_dx


def pointwise_backward(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       shift: torch.Tensor, mean: torch.Tensor, k: torch.Tensor, acc: torch.Tensor,
                       src: torch.Tensor | None = None, weight_grad: bool = True):
    """The backward of a 1x1 convolution (``weight``, C_out x C_in) of a = ReLU(x * scale + shift)
    and the sums of that BN-ReLU's backward, in one pass over the rows (float32 or bfloat16
    matrices with contiguous columns, where :func:`conv3x3_supported` for their dtype: the
    same instructions). With d the gradient of a, masked
    where x * scale + shift <= 0 and kept in float32 (g @ weight, never rounded): returns
    (sum of d, sum of d * (x - mean), the float32 weight gradient or None without
    ``weight_grad``) and adds d * k to ``acc`` (with ``src``: acc = src + d * k).

    It does what :func:`relu_bn_sums` and a weight gradient from the BN-ReLU's input do after a
    product that writes d, without d in memory: on BC-100 those were four passes over the layer's input columns in
    bfloat16, six in float32 (the BN-ReLU output was formed there too)."""
    rows, cout = g.shape
    cin = x.shape[1]
    dtype = x.dtype
    _mats((rows, cin), x, acc, src, dtype=dtype)
    _mats((rows, cout), g, dtype=dtype)
    w = weight.detach().reshape(cout, cin).to(dtype).contiguous()
    scale, shift, mean, k = (_vec(v, cin) for v in (scale, shift, mean, k))
    sum_d, sum_dx = torch.empty(cin, dtype=torch.float32), torch.empty(cin, dtype=torch.float32)
    dw = torch.empty(cout, cin, dtype=torch.float32) if weight_grad else None
    lib = _library()
    if lib is None:
        raise RuntimeError("densekit's native kernels are unavailable here (see native.available())")
    code = lib.dk_pointwise_backward(int(dtype == torch.bfloat16), g.data_ptr(), g.stride(0), x.data_ptr(),
                                     x.stride(0), rows, cin, cout, w.data_ptr(), scale.data_ptr(), shift.data_ptr(),
                                     mean.data_ptr(), k.data_ptr(), acc.data_ptr(), acc.stride(0), _ptr(src), _ld(src),
                                     sum_d.data_ptr(), sum_dx.data_ptr(), _ptr(dw), torch.get_num_threads())
    if code == 2:
        raise RuntimeError(f"this build of the native kernels has no 1x1 convolution backward for {dtype} "
                           "(AVX-512; for bfloat16 AVX512-BF16)")
    _check(code)
    return sum_d, sum_dx, dw


def relu_mask_from_input(dtype: torch.dtype) -> bool:
    """Can :func:`relu_bn_sums` read the ReLU's mask from the BN-ReLU's input for ``dtype``
    matrices (bfloat16 with AVX512-BF16)?"""
    return dtype == torch.bfloat16 and conv3x3_supported(dtype)


def bn_grad_apply(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                  k: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = grad * k + (x - mean) * b + c per column (k = 1 when None); ``out`` defaults to
    ``grad`` (in place), and may be any other matrix of its shape that overlaps neither input."""
    out = grad if out is None else out
    _mats(grad.shape, grad, x, out)
    k, mean, b, c = (_vec(v, grad.shape[1]) for v in (k, mean, b, c))
    if mean is None or b is None or c is None:
        raise ValueError("native bn_grad_apply needs mean, b and c")
    _check(_kernel("dk_bn_grad_apply", grad)(grad.data_ptr(), grad.stride(0), x.data_ptr(), x.stride(0), out.data_ptr(),
                                       out.stride(0), grad.shape[0], grad.shape[1], _ptr(k), mean.data_ptr(),
                                       b.data_ptr(), c.data_ptr(), torch.get_num_threads()))
    return out


# native.c's STATS_WIDTH: a dense narrow matrix is summed as rows of up to this many values
_STATS_WIDTH = 384


def stats_width(x: torch.Tensor) -> int:
    """How many values :func:`col_stats` sums per row of the (rows, cols) matrix ``x``: a
    dense one (row stride cols) as rows of m * cols values, m the largest power of two with
    m * cols <= 384 that divides its rows (as native.c's ``stats_fold``), else its cols."""
    rows, cols = x.shape
    m = 1
    if x.stride(0) == cols:
        while 2 * m * cols <= _STATS_WIDTH and rows % (2 * m) == 0:
            m *= 2
    return m * cols


def col_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and biased variance, float32 (accumulated in float64); a dense narrow
    matrix is summed as wider rows (:func:`stats_width`)."""
    _mats(x.shape, x)
    mean = torch.empty(x.shape[1], dtype=torch.float32)
    var = torch.empty_like(mean)
    _check(_kernel("dk_col_stats", x)(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], mean.data_ptr(),
                                   var.data_ptr(), torch.get_num_threads()))
    return mean, var


def _pool_geometry(x: torch.Tensor, spatial: tuple[int, ...], grad: torch.Tensor | None = None):
    """Checks ``x`` (the input rows) and ``grad`` (the pooled rows' gradient) for 2x pooling
    of every dim in ``spatial`` (1 to 3 dims); returns the kernels' (n, d, h, w, kd, kh, kw)
    and the pooled rows' shape."""
    _mats(x.shape, x)
    if not 1 <= len(spatial) <= 3 or any(s < 2 for s in spatial):
        raise ValueError(f"native pooling needs 1 to 3 spatial dims of size >= 2, got {spatial}")
    size = pooled = 1
    for s in spatial:
        size, pooled = size * s, pooled * (s // 2)
    rows = x.shape[0]
    if rows % size:
        raise ValueError(f"native pooling: {rows} rows are not a whole number of {spatial} grids")
    pooled_shape = torch.Size((rows // size * pooled, x.shape[1]))
    _mats(pooled_shape, grad, dtype=x.dtype)
    pad = 3 - len(spatial)
    return [rows // size, *[1] * pad, *spatial, *[1] * pad, *[2] * len(spatial)], pooled_shape


def bn_relu_pool(x: torch.Tensor, spatial: tuple[int, ...], scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """avg_pool(relu(x * scale + shift)) with windows of 2 in every spatial dim: ``x`` holds
    the channels-last positions of an (N, *spatial) grid as rows; returns the pooled rows."""
    geometry, pooled_shape = _pool_geometry(x, spatial)
    out = torch.empty(pooled_shape, dtype=x.dtype)
    scale, shift = _vec(scale, x.shape[1]), _vec(shift, x.shape[1])
    _check(_kernel("dk_bn_relu_pool", x)(x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), *geometry,
                                      x.shape[1], scale.data_ptr(), shift.data_ptr(), torch.get_num_threads()))
    return out


def unpool_relu_bn_sums(g: torch.Tensor, x: torch.Tensor, spatial: tuple[int, ...], scale: torch.Tensor,
                        shift: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of :func:`bn_relu_pool` up to batch norm: with ``g`` the pooled rows' gradient
    and d its share in each input row where relu passed, returns (sum of d, sum of d * (x - mean))."""
    geometry, _ = _pool_geometry(x, spatial, g)
    cols = x.shape[1]
    scale, shift, mean = (_vec(v, cols) for v in (scale, shift, mean))
    sum_d, sum_dx = torch.empty(cols, dtype=torch.float32), torch.empty(cols, dtype=torch.float32)
    _check(_kernel("dk_unpool_relu_bn_sums", x)(g.data_ptr(), g.stride(0), x.data_ptr(), x.stride(0), *geometry, cols,
                                             scale.data_ptr(), shift.data_ptr(), mean.data_ptr(), sum_d.data_ptr(),
                                             sum_dx.data_ptr(), torch.get_num_threads()))
    return sum_d, sum_dx


def unpool_bn_grad(g: torch.Tensor, x: torch.Tensor, spatial: tuple[int, ...], scale: torch.Tensor,
                   shift: torch.Tensor, k: torch.Tensor, mean: torch.Tensor, b: torch.Tensor | None,
                   c: torch.Tensor | None) -> torch.Tensor:
    """The input gradient behind :func:`bn_relu_pool`, as a new (rows, cols) matrix:
    d * k + (x - mean) * b + c per column, d as in :func:`unpool_relu_bn_sums` (d * k when b
    and c are None: eval mode)."""
    geometry, _ = _pool_geometry(x, spatial, g)
    if (b is None) != (c is None):
        raise ValueError("native unpool_bn_grad needs both b and c, or neither")
    cols = x.shape[1]
    scale, shift, k, mean, b, c = (_vec(v, cols) for v in (scale, shift, k, mean, b, c))
    out = torch.empty(x.shape, dtype=x.dtype)
    _check(_kernel("dk_unpool_bn_grad", x)(g.data_ptr(), g.stride(0), x.data_ptr(), x.stride(0), *geometry, cols,
                                        scale.data_ptr(), shift.data_ptr(), k.data_ptr(), mean.data_ptr(), _ptr(b),
                                        _ptr(c), out.data_ptr(), out.stride(0), torch.get_num_threads()))
    return out


# The most positions a max-pooling window may have: native.c keeps each maximum's offset
# in its window in one byte, 255 meaning none.
MAXPOOL_WINDOW = 254


def maxpool_misfit(spatial, kernel, stride, padding) -> str | None:
    """Why the native max pooling cannot pool a grid of sides ``spatial`` (1 to 3 dims) with
    this kernel, stride and padding (one per dim, as torch's max pooling takes them: padding at
    most half the kernel), or None when it can."""
    dims = len(spatial)
    if not 1 <= dims <= 3 or not all(len(v) == dims for v in (kernel, stride, padding)):
        return "native max pooling needs 1 to 3 spatial dims, each with a kernel, stride and padding"
    if any(k < 1 or s < 1 or p < 0 or 2 * p > k or n + 2 * p < k
           for n, k, s, p in zip(spatial, kernel, stride, padding)):
        return f"native max pooling: kernel {kernel}, stride {stride}, padding {padding} do not fit {spatial}"
    volume = math.prod(kernel)
    if volume > MAXPOOL_WINDOW:
        return f"native max pooling takes windows of at most {MAXPOOL_WINDOW} positions, got {volume}"
    return None


def _maxpool_geometry(x: torch.Tensor, spatial: tuple[int, ...], kernel, stride, padding,
                      g: torch.Tensor | None = None, arg: torch.Tensor | None = None):
    """Checks ``x`` (the input rows of an (N, *spatial) grid) and the pooling
    (:func:`maxpool_misfit`), and for backward ``g`` (the pooled rows' gradient) and ``arg``
    (the offsets :func:`relu_maxpool` returned); returns the kernels' geometry (n, d, h, w, kd,
    kh, kw, sd, sh, sw, pd, ph, pw) as an int64 tensor, and the pooled rows' shape."""
    _mats(x.shape, x)
    misfit = maxpool_misfit(spatial, kernel, stride, padding)
    if misfit is not None:
        raise ValueError(misfit)
    dims = len(spatial)
    size = math.prod(spatial)
    if x.shape[0] % size:
        raise ValueError(f"native max pooling: {x.shape[0]} rows are not a whole number of {spatial} grids")
    pad = 3 - dims
    geometry = [x.shape[0] // size, *[1] * pad, *spatial, *[1] * pad, *kernel, *[1] * pad, *stride, *[0] * pad,
                *padding]
    pooled = torch.Size((x.shape[0] // size * math.prod(window_grid(spatial, kernel, stride, padding)), x.shape[1]))
    if g is not None:
        _mats(pooled, g, dtype=x.dtype)
    if arg is not None and (arg.dtype != torch.uint8 or arg.shape != pooled or not arg.is_contiguous()
                            or arg.device.type != "cpu"):
        raise ValueError(f"native max pooling needs the uint8 offsets relu_maxpool returned, of shape {tuple(pooled)}")
    return torch.tensor(geometry, dtype=torch.int64), pooled


def window_grid(spatial, kernel, stride, padding) -> tuple[int, ...]:
    """The sides of the grid a window of ``kernel`` sliding over ``spatial`` gives, as torch's max
    pooling and convolution give them (floor mode, no dilation)."""
    return tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(spatial, kernel, stride, padding))


def relu_maxpool(x: torch.Tensor, spatial: tuple[int, ...], kernel, stride, padding,
                 scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                 arg: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """max_pool(relu(x * scale + shift)) (relu(x) without ``scale`` and ``shift``) of the rows
    ``x`` of an (N, *spatial) grid, as torch's max pooling picks each window's maximum;
    returns the pooled rows and, with ``arg``, a uint8 matrix of each maximum's offset in its
    window (255 where the ReLU lets no gradient through), for :func:`maxpool_bn_sums` and
    :func:`unmaxpool_bn_grad`."""
    geometry, pooled_shape = _maxpool_geometry(x, spatial, kernel, stride, padding)
    if (scale is None) != (shift is None):
        raise ValueError("native relu_maxpool: scale and shift go together")
    scale, shift = _vec(scale, x.shape[1]), _vec(shift, x.shape[1])
    out = torch.empty(pooled_shape, dtype=x.dtype)
    offsets = torch.empty(pooled_shape, dtype=torch.uint8) if arg else None
    _check(_kernel("dk_relu_maxpool", x)(x.data_ptr(), x.stride(0), geometry.data_ptr(), x.shape[1], _ptr(scale),
                                      _ptr(shift), out.data_ptr(), out.stride(0), _ptr(offsets),
                                      torch.get_num_threads()))
    return out, offsets


def maxpool_bn_sums(g: torch.Tensor, arg: torch.Tensor, x: torch.Tensor, spatial: tuple[int, ...], kernel, stride,
                    padding, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of :func:`relu_maxpool` up to batch norm: with ``g`` the pooled rows' gradient
    and d what reaches each input row through the maxima ``arg``, (sum of d, sum of
    d * (x - mean)) per column."""
    geometry, _ = _maxpool_geometry(x, spatial, kernel, stride, padding, g, arg)
    cols = x.shape[1]
    mean = _vec(mean, cols)
    sum_d, sum_dx = torch.empty(cols, dtype=torch.float32), torch.empty(cols, dtype=torch.float32)
    _check(_kernel("dk_maxpool_bn_sums", x)(g.data_ptr(), g.stride(0), arg.data_ptr(), x.data_ptr(), x.stride(0),
                                         geometry.data_ptr(), cols, mean.data_ptr(), sum_d.data_ptr(),
                                         sum_dx.data_ptr(), torch.get_num_threads()))
    return sum_d, sum_dx


def unmaxpool_bn_grad(g: torch.Tensor, arg: torch.Tensor, x: torch.Tensor, spatial: tuple[int, ...], kernel, stride,
                      padding, k: torch.Tensor, mean: torch.Tensor, b: torch.Tensor | None,
                      c: torch.Tensor | None) -> torch.Tensor:
    """The input gradient behind :func:`relu_maxpool`, as a new (rows, cols) matrix: d * k +
    (x - mean) * b + c per column, d as in :func:`maxpool_bn_sums` (d * k when b and c are
    None: eval mode)."""
    geometry, _ = _maxpool_geometry(x, spatial, kernel, stride, padding, g, arg)
    if (b is None) != (c is None):
        raise ValueError("native unmaxpool_bn_grad needs both b and c, or neither")
    cols = x.shape[1]
    k, mean, b, c = (_vec(v, cols) for v in (k, mean, b, c))
    out = torch.empty(x.shape, dtype=x.dtype)
    _check(_kernel("dk_unmaxpool_bn_grad", x)(g.data_ptr(), g.stride(0), arg.data_ptr(), x.data_ptr(), x.stride(0),
                                           geometry.data_ptr(), cols, k.data_ptr(), mean.data_ptr(), _ptr(b),
                                           _ptr(c), out.data_ptr(), out.stride(0), torch.get_num_threads()))
    return out


# The most output channels :class:`Conv3x3` takes: one 16-lane register per pixel.
CONV3X3_MAX_OUT = 16


@functools.lru_cache(maxsize=None)
def _conv3x3_support() -> int:
    lib = _library()
    return lib.dk_conv3x3_support() if lib is not None else 0


def conv3x3_supported(dtype: torch.dtype) -> bool:
    """Does this machine's build run :class:`Conv3x3` on ``dtype`` matrices (float32 with AVX-512,
    bfloat16 with AVX512-BF16 as well)?"""
    if not _enabled:
        return False
    return bool(_conv3x3_support() & {torch.float32: 1, torch.bfloat16: 2}.get(dtype, 0))


def _in_lanes(weight: torch.Tensor, lanes: int, pairs: bool) -> torch.Tensor:
    """(..., C_in, C_out) weights as the native convolutions load them, C_out zero-padded to
    ``lanes`` (whole 16-lane vectors): as they are, or with ``pairs`` (the AVX512-BF16 dot
    product) pairs of input channels interleaved per output channel, (..., C_in / 2 rounded up,
    lanes, 2), the last pair's second channel zero where C_in is odd."""
    *lead, c_in, c_out = weight.shape
    rows = c_in + c_in % 2 if pairs else c_in
    packed = weight.new_zeros(*lead, rows, lanes)
    packed[..., :c_in, :c_out] = weight
    if pairs:
        packed = packed.view(*lead, rows // 2, 2, lanes).transpose(-2, -1).contiguous()
    return packed


class Conv3x3:
    """A 2D 3x3 convolution, stride 1, padding 1, no bias, of at most ``CONV3X3_MAX_OUT`` output
    channels (a DenseNet-BC layer's last convolution), on channels-last matrices: the input
    (N*H*W, C_in) and the output (N*H*W, C_out), each with contiguous columns and any row
    stride, so the output may be a column slice of a block's feature buffer. The weight is
    packed once, here, in ``dtype`` (native.c says why this is not oneDNN's convolution). Build
    it only where :func:`conv3x3_supported` for ``dtype``."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        if not conv3x3_supported(dtype):
            raise ValueError(f"this machine's native kernels run no 3x3 convolution on {dtype} matrices")
        c_out, c_in, *kernel = weight.shape
        if kernel != [3, 3] or not 0 < c_out <= CONV3X3_MAX_OUT or not c_in:
            raise ValueError(f"native Conv3x3 takes a (C_out <= {CONV3X3_MAX_OUT}, C_in, 3, 3) weight, "
                             f"got {tuple(weight.shape)}")
        self.in_channels, self.out_channels, self.dtype = c_in, c_out, dtype
        taps = weight.detach().to("cpu", dtype).permute(2, 3, 1, 0).reshape(9, c_in, c_out)  # (tap, in, out)
        self.weight = _in_lanes(taps, CONV3X3_MAX_OUT, pairs=dtype == torch.bfloat16)
        self._fn = _library().dk_conv3x3

    def __call__(self, x: torch.Tensor, spatial: tuple[int, ...], out: torch.Tensor) -> torch.Tensor:
        """``out`` from ``x``, the rows of a batch of images of ``spatial`` (H, W) positions."""
        rows = x.shape[0] if x.dim() == 2 else -1
        if rows < 0 or len(spatial) != 2 or min(spatial) < 1 or rows % (spatial[0] * spatial[1]) \
                or x.dtype != self.dtype or out.dtype != self.dtype or x.device.type != "cpu" \
                or out.device.type != "cpu" or out.dim() != 2 or x.shape[1] != self.in_channels \
                or tuple(out.shape) != (rows, self.out_channels) or x.stride(1) != 1 or out.stride(1) != 1:
            raise ValueError(f"a native 3x3 convolution of {self.in_channels} to {self.out_channels} "
                             f"{self.dtype} channels got {tuple(x.shape)} {x.dtype} into {tuple(out.shape)} "
                             f"{out.dtype} at {tuple(spatial)} positions")
        h, w = spatial
        if self._fn(int(self.dtype == torch.bfloat16), x.data_ptr(), x.stride(0), rows // (h * w), h, w,
                    self.in_channels, self.weight.data_ptr(), self.out_channels, out.data_ptr(), out.stride(0),
                    torch.get_num_threads()):
            raise RuntimeError("this build of the native kernels has no 3x3 convolution")
        return out


STEM_MAX_OUT = 64


class StemConv:
    """A 2D convolution with at most ``STEM_MAX_OUT`` outputs, no bias, groups 1, dilation 1,
    zero padding, from an NCHW batch into a new channels-last one: a network's first
    convolution where a dense block reads its output (native.c says why). The weight is packed
    once, here, for ``dtype``; build it only where :func:`conv3x3_supported` for ``dtype`` (the
    same instructions)."""

    def __init__(self, weight: torch.Tensor, stride, padding, dtype: torch.dtype) -> None:
        if not conv3x3_supported(dtype):
            raise ValueError(f"this machine's native kernels run no stem convolution on {dtype} images")
        c_out, c_in, kh, kw = weight.shape
        if not 0 < c_out <= STEM_MAX_OUT:
            raise ValueError(f"native StemConv takes at most {STEM_MAX_OUT} output channels, got {c_out}")
        self.in_channels, self.out_channels, self.kernel, self.dtype = c_in, c_out, (kh, kw), dtype
        self.stride, self.padding = tuple(stride), tuple(padding)
        # the weights as the kernel multiplies them: rounded to dtype, then float32, (tap, out)
        taps = weight.detach().to("cpu", dtype).float().permute(1, 2, 3, 0).reshape(c_in * kh * kw, c_out)
        self.weight = _in_lanes(taps, 16 * ((c_out + 15) // 16), pairs=False)
        self._fn = _library().dk_stem_conv

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution of ``x`` (N, C_in, H, W), contiguous, as an (N, C_out, OH, OW) tensor
        in channels-last memory."""
        if x.dim() != 4 or x.dtype != self.dtype or x.device.type != "cpu" or x.shape[1] != self.in_channels \
                or not x.is_contiguous() or min(window_grid(x.shape[2:], self.kernel, self.stride, self.padding)) < 1:
            raise ValueError(f"a native stem convolution of {self.in_channels} {self.dtype} channels "
                             f"got {tuple(x.shape)} {x.dtype}")
        n, c, h, w = x.shape
        oh, ow = window_grid((h, w), self.kernel, self.stride, self.padding)
        out = torch.empty((n, oh, ow, self.out_channels), dtype=self.dtype)
        if self._fn(int(self.dtype == torch.bfloat16), x.data_ptr(), n, c, h, w, self.weight.data_ptr(),
                    self.out_channels, *self.kernel, *self.stride, *self.padding, oh, ow, out.data_ptr(),
                    torch.get_num_threads()):
            raise RuntimeError("this build of the native kernels has no stem convolution")
        return out.permute(0, 3, 1, 2)


POINTWISE_MAX_OUT = 128
_POINTWISE_CHUNK = 64  # outputs a call of the kernel's register block computes (native.c's PW_VECS vectors)


class Pointwise:
    """A 1x1 convolution with a bias and optionally a ReLU, of at most ``POINTWISE_MAX_OUT``
    outputs, on channels-last matrices: (rows, C_in) to (rows, C_out), each with contiguous
    columns and any row stride (native.c says where it beats oneDNN). The weight (C_out, C_in,
    1...) and bias are packed once, here, for ``dtype``; build it only where
    :func:`conv3x3_supported` for ``dtype`` (the same instructions). With ``index`` (C_in int64
    columns in [0, ``width``)) it reads those columns of a (rows, width) input, as a pruned
    layer reads the block's buffer (:func:`gather_cols`), gathered into the kernel's tile."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, relu: bool,
                 index: torch.Tensor | None = None, width: int | None = None) -> None:
        if not conv3x3_supported(dtype):
            raise ValueError(f"this machine's native kernels run no 1x1 convolution on {dtype} matrices")
        c_out, c_in = weight.shape[:2]
        if not 0 < c_out <= POINTWISE_MAX_OUT or not c_in or any(k != 1 for k in weight.shape[2:]):
            raise ValueError(f"native Pointwise takes a (C_out <= {POINTWISE_MAX_OUT}, C_in, 1...) weight, "
                             f"got {tuple(weight.shape)}")
        self.in_channels, self.out_channels, self.dtype, self.relu = c_in, c_out, dtype, bool(relu)
        self.index, self.width = None, c_in
        if index is not None:
            if width is None or index.numel() != c_in or int(index.min()) < 0 or int(index.max()) >= width:
                raise ValueError(f"native Pointwise takes {c_in} input columns in [0, width), got "
                                 f"{index.numel()} for a width of {width}")
            self.index, self.width = _columns(index, width), width
        lanes = 16 * ((c_out + 15) // 16)
        w = weight.detach().to("cpu", dtype).reshape(c_out, c_in).t()  # (in, out)
        # in chunks of _POINTWISE_CHUNK outputs, each packed on its own, as the kernel runs them
        chunks = [w[:, o:o + _POINTWISE_CHUNK] for o in range(0, c_out, _POINTWISE_CHUNK)]
        self.weight = torch.cat([_in_lanes(c, 16 * ((c.shape[1] + 15) // 16), pairs=dtype == torch.bfloat16).flatten()
                                 for c in chunks])
        self.bias = torch.zeros(lanes)
        if bias is not None:
            self.bias[:c_out] = bias.detach().to("cpu", torch.float32)
        self._fn = _library().dk_pointwise

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                 shift: torch.Tensor | None = None) -> torch.Tensor:
        """The (rows, C_out) result of ``x`` (rows, C_in; with an index, rows, width), into ``out``
        if given; with ``scale`` and ``shift`` (C_in each), of ReLU(x * scale + shift) instead,
        formed as ``bn_relu`` (with an index ``gather_cols``) forms it (a batch norm and ReLU
        before the convolution, as in a dense layer)."""
        if out is None and x.dim() == 2:
            out = torch.empty((x.shape[0], self.out_channels), dtype=self.dtype)
        if x.dim() != 2 or x.dtype != self.dtype or x.device.type != "cpu" or x.shape[1] != self.width \
                or x.stride(1) != 1 or out.dim() != 2 or out.dtype != self.dtype or out.device.type != "cpu" \
                or tuple(out.shape) != (x.shape[0], self.out_channels) or out.stride(1) != 1 \
                or (scale is None) != (shift is None):
            raise ValueError(f"a native 1x1 convolution of {self.width} to {self.out_channels} {self.dtype} "
                             f"channels got {tuple(x.shape)} {x.dtype}")
        if scale is not None:
            scale, shift = _vec(scale, self.in_channels), _vec(shift, self.in_channels)
        code = self._fn(int(self.dtype == torch.bfloat16), x.data_ptr(), x.stride(0), x.shape[0], self.in_channels,
                        self.weight.data_ptr(), self.bias.data_ptr(), self.out_channels, int(self.relu),
                        out.data_ptr(), out.stride(0), _ptr(scale), _ptr(shift), _ptr(self.index), self.width,
                        torch.get_num_threads())
        if code == 2:
            raise RuntimeError("this build of the native kernels has no 1x1 convolution")
        if code == 3:
            _check_columns(2, self.width)
        _check(code, "its BN-ReLU rows")
        return out


class DenseLayers:
    """A dense block's layers for inference in one native call (``dk_dense_layers``): per layer
    its :class:`Pointwise` (the bottleneck, with the second batch norm folded into its weight
    and bias, a ReLU, and the first batch norm's BN-ReLU and a pruned layer's gather formed in
    its tile from ``scale`` and ``shift``), then its :class:`Conv3x3` of ``growth_rate``
    outputs straight into the block's buffer. Run one by one from Python, each of the two calls
    costs 10-20 us of checks and ctypes, as much as its arithmetic on a small batch, and the
    same for a pruned layer as for its parent; here the per-layer constants are checked and
    their addresses tabled once."""

    def __init__(self, points: list[Pointwise], scales: list[torch.Tensor], shifts: list[torch.Tensor],
                 directs: list[Conv3x3], in_channels: int, growth_rate: int, dtype: torch.dtype) -> None:
        if not (len(points) == len(scales) == len(shifts) == len(directs)) or not points:
            raise ValueError("native DenseLayers takes one Pointwise, scale, shift and Conv3x3 per layer")
        kept, pointers, dims = [], [], []
        for i, (point, scale, shift, direct) in enumerate(zip(points, scales, shifts, directs)):
            if point.dtype != dtype or direct.dtype != dtype or not point.relu \
                    or point.width != in_channels + i * growth_rate or direct.in_channels != point.out_channels \
                    or direct.out_channels != growth_rate:
                raise ValueError(f"layer {i} does not chain: a ReLU Pointwise of the block's first "
                                 f"{in_channels + i * growth_rate} channels into a Conv3x3 of {growth_rate}")
            scale, shift = _vec(scale, point.in_channels), _vec(shift, point.in_channels)
            kept += [point.weight, point.bias, scale, shift, point.index, direct.weight]
            pointers += [_ptr(t) for t in kept[-6:]]
            dims += [point.in_channels, point.out_channels]
        self._kept = kept  # the tabled memory stays alive with the table
        self._table = (ctypes.c_void_p * len(pointers))(*pointers)
        self._dims = torch.tensor(dims, dtype=torch.int64)
        self.layers, self.in_channels, self.growth_rate, self.dtype = len(points), in_channels, growth_rate, dtype
        self.width = max(dims[1::2])  # the widest bottleneck: the columns ``mid`` needs
        self._fn = _library().dk_dense_layers

    def __call__(self, rows: torch.Tensor, spatial: tuple[int, ...], mid: torch.Tensor) -> None:
        """Write each layer's ``growth_rate`` channels into ``rows`` (N*H*W, C), the block's buffer
        holding its input in the first channels; ``mid``: at least N*H*W times :attr:`width`
        contiguous values of the same dtype, the bottleneck's workspace."""
        filled = self.in_channels + self.layers * self.growth_rate
        if rows.dim() != 2 or rows.dtype != self.dtype or rows.device.type != "cpu" or rows.stride(1) != 1 \
                or rows.shape[1] < filled or len(spatial) != 2 or rows.shape[0] % (spatial[0] * spatial[1]) \
                or mid.dtype != self.dtype or mid.device.type != "cpu" or not mid.is_contiguous() \
                or mid.numel() < rows.shape[0] * self.width:
            raise ValueError(f"native DenseLayers of {filled} {self.dtype} channels got {tuple(rows.shape)} "
                             f"{rows.dtype} at {tuple(spatial)} positions")
        h, w = spatial
        code = self._fn(int(self.dtype == torch.bfloat16), rows.data_ptr(), rows.stride(0), rows.shape[0] // (h * w),
                        h, w, self.in_channels, self.growth_rate, self.layers, self._dims.data_ptr(), self._table,
                        mid.data_ptr(), torch.get_num_threads())
        if code == 2:
            raise RuntimeError("this build of the native kernels has no 1x1 or 3x3 convolution")
        if code == 3:
            raise ValueError("native DenseLayers: a layer's column index reaches past the channels before it")
        _check(code, "its BN-ReLU rows")
