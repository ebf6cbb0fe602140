"""glibc's allocator set to keep freed memory for the next training step or forward.

PyTorch allocates CPU tensors with ``posix_memalign``, so on Linux glibc's malloc decides
what a freed activation costs the next time. By default its thresholds move with what is
freed: a block above the mmap threshold is a fresh ``mmap``, and freeing one raises that
threshold to its size, up to 32 MiB; the top of the heap goes back to the kernel once more
than twice the threshold lies free there. A training step frees most of what it allocated
at its end, so the heap is trimmed then and every block over 32 MiB is unmapped, and the next
step faults all of it in again, zero-filled, a page at a time: on a 2-core KVM guest (AMD
EPYC, Zen 5) a densenet121 training step in bf16 took 45,000-65,000 minor faults, and a
forward of the ``make run`` model at batch 64 3,100 (11.5-13.1 ms against 7.4-8.0 without
them), measured ad hoc with ``getrusage`` (docs/performance.md, "The allocator"). PyTorch's
CPU performance guide recommends jemalloc or TCMalloc for the same reason; neither ships
with PyTorch's wheels, so densekit's command line sets glibc's two thresholds instead, by
``mallopt(3)``, which also turns their adjustment off:

- ``M_MMAP_THRESHOLD`` at 1 GiB, or 32 MiB where glibc refuses more (mallopt(3) documents
  32 MiB as the maximum on 64-bit systems; glibc 2.36 accepts 1 GiB): blocks up to that come
  from the heap and are reused from it;
- ``M_TRIM_THRESHOLD`` at 1 GiB: freed memory at the top of the heap is kept for reuse
  unless more than that lies free.

The process then keeps the memory of its largest step for the next, as jemalloc, TCMalloc
and PyTorch's CUDA caching allocator do. Nothing is set where the user chose otherwise:
``DENSEKIT_MALLOC=default``, any ``MALLOC_*`` variable, ``GLIBC_TUNABLES`` naming malloc, or
an allocator of their own in front of glibc's (``LD_PRELOAD`` or ``/etc/ld.so.preload``:
``malloc`` then resolves outside libc), nor where the C library is not glibc. Library code
never calls this: it changes the whole process.
"""

from __future__ import annotations

import ctypes
import functools
import os

MMAP_THRESHOLD = 2 ** 30
MMAP_THRESHOLD_FALLBACK = 32 * 2 ** 20  # mallopt(3)'s documented maximum on 64-bit systems
TRIM_THRESHOLD = 2 ** 30

# mallopt(3) parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_applied: str | None = None


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, where it is this process's C library (looked up once)."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        return ctypes.CDLL("libc.so.6")
    except (AttributeError, ValueError, OSError):  # no confstr (not Unix), no such name, no glibc
        return None


def user_choice() -> str | None:
    """The allocator setting the user made, or None."""
    if os.environ.get("DENSEKIT_MALLOC") == "default":
        return "DENSEKIT_MALLOC=default"
    for name in sorted(os.environ):
        if name.startswith("MALLOC_"):
            return name
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    libc = _glibc()
    if libc is not None:
        try:  # an allocator preloaded in front of glibc's: malloc resolves to it, not to libc
            if ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value != \
                    ctypes.cast(libc.malloc, ctypes.c_void_p).value:
                return "a preloaded malloc"
        except (OSError, AttributeError):
            pass
    return None


def tune_malloc() -> str | None:
    """Set glibc's thresholds as the module docstring says, once per process; returns what
    was set (a short description) or None where nothing was (not glibc, or the user's own
    choice, see :func:`user_choice`). For scripts that train or infer on the CPU, like
    densekit's command line; it changes the allocator of the whole process. Never raises."""
    global _applied
    if _applied is not None:
        return _applied
    libc = _glibc()
    if libc is None or user_choice() is not None:
        return None
    try:
        mallopt = libc.mallopt
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    except AttributeError:
        return None
    mmap = next((v for v in (MMAP_THRESHOLD, MMAP_THRESHOLD_FALLBACK) if mallopt(_M_MMAP_THRESHOLD, v) == 1), None)
    trim = TRIM_THRESHOLD if mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 else None
    if mmap is None and trim is None:
        return None
    parts = [f"mmap threshold {_size(mmap)}" if mmap else "mmap threshold not set",
             f"trim threshold {_size(trim)}" if trim else "trim threshold not set"]
    _applied = "glibc malloc: " + ", ".join(parts)
    return _applied


def _size(n: int) -> str:
    return f"{n // 2 ** 30} GiB" if n % 2 ** 30 == 0 else f"{n // 2 ** 20} MiB"


def setting() -> str:
    """How this process's allocator is set, for logs and benchmark records."""
    if _applied is not None:
        return _applied
    choice = user_choice()
    if choice is not None:
        return f"the user's ({choice})"
    return "default"
