"""glibc's allocator set to keep freed memory for the next training step or forward.

PyTorch allocates CPU tensors with ``posix_memalign``, so on Linux glibc's malloc decides
what a freed activation costs the next time. By default it serves blocks above a
threshold with fresh ``mmap``s and raises that threshold to the size of each such block
freed (up to 32 MiB); the largest recurring block of a step therefore goes back to the
kernel at every free, and the top of the heap is returned once more than twice that
threshold lies free there. Each page of it is then faulted in and zeroed again at the
next step: on a 2-core KVM guest (AMD EPYC, Zen 5) a densenet121 training step in bf16 took
50,000-58,000 minor faults (0.58-0.70 s), and a forward of the ``make run`` model at batch 64
3,100 (14.8 ms against 8.7 without them), measured ad hoc with ``getrusage``
(docs/performance.md, "Allocator"). PyTorch's CPU performance guide recommends jemalloc or
TCMalloc for the same reason; neither ships with PyTorch's wheels, so densekit's command
line sets glibc's two thresholds instead, by ``mallopt(3)``:

- ``M_MMAP_THRESHOLD`` at 32 MiB, glibc's largest: blocks up to that come from the heap,
  and setting it turns the dynamic adjustment off;
- ``M_TRIM_THRESHOLD`` at 1 GiB: freed memory at the top of the heap is kept for reuse
  unless more than that lies free.

The process then keeps the memory of its largest step, as jemalloc, TCMalloc and PyTorch's
CUDA caching allocator do; peak RSS, which the benchmarks report, is what it was.
Nothing is set where the user chose an allocator or glibc settings themselves (an
``LD_PRELOAD``, a ``MALLOC_*`` variable, ``GLIBC_TUNABLES`` naming malloc), or where the C
library is not glibc. Library code never calls this: it changes the whole process.
"""

from __future__ import annotations

import ctypes
import os
import platform

MMAP_THRESHOLD = 32 * 2 ** 20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 2 ** 30

# mallopt(3) parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_applied: str | None = None


def user_choice() -> str | None:
    """The allocator setting the user made in the environment, or None."""
    if os.environ.get("LD_PRELOAD"):
        return "LD_PRELOAD"
    for name in sorted(os.environ):
        if name.startswith("MALLOC_"):
            return name
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return None


def tune_malloc() -> str | None:
    """Set glibc's thresholds as the module docstring says, once per process; returns what
    was set (a short description) or None where nothing was (not glibc, or the user's own
    setting, see :func:`user_choice`). For scripts that train or infer on the CPU, like
    densekit's command line; it changes the allocator of the whole process."""
    global _applied
    if _applied is not None:
        return _applied
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or user_choice() is not None:
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return None
    _applied = f"glibc malloc: mmap threshold {MMAP_THRESHOLD // 2 ** 20} MiB, trim threshold " \
               f"{TRIM_THRESHOLD // 2 ** 30} GiB"
    return _applied


def setting() -> str:
    """How this process's allocator is set, for logs and benchmark records."""
    if _applied is not None:
        return _applied
    choice = user_choice()
    if choice is not None:
        return f"the user's ({choice})"
    return "default"
