"""densekit.malloc: glibc keeps a step's freed memory for the next step instead of returning it.

Each case runs in a fresh interpreter: the allocator's thresholds belong to the process. The
checks read the allocator's state (where the program break lies, where a block comes from),
not page-fault counts, which depend on the kernel's transparent huge pages.
"""

import json
import os
import subprocess
import sys

import pytest

from densekit import malloc

pytestmark = pytest.mark.skipif(malloc._glibc() is None, reason="glibc's allocator only")

# A step's pattern: after a 4 MiB block was freed (which raises glibc's default thresholds to
# about 4 and 8 MiB), ten 3 MiB activations are allocated and freed together: is the heap's
# top given back (the program break moves down)? Then a 24 MiB and a 48 MiB block: from the
# heap (below the break) or from mmap? Through libc itself, so that no allocation of the
# interpreter's lands between them.
_SCRIPT = """
import ctypes, json, sys
from densekit.malloc import setting, tune_malloc
if sys.argv[1] == "tune":
    tune_malloc()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, (ctypes.c_ssize_t,)
def block(size):
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    return p
libc.free(block(4 * 2 ** 20))
trimmed = []
for i in range(3):
    step = [block(3 * 2 ** 20) for _ in range(10)]
    top = libc.sbrk(0)
    for p in step:
        libc.free(p)
    trimmed.append(libc.sbrk(0) < top)
from_heap = {}
for mib in (24, 48):
    p = block(mib * 2 ** 20)
    from_heap[mib] = p < libc.sbrk(0)
    libc.free(p)
print(json.dumps(dict(trimmed=trimmed, from_heap=from_heap, setting=setting())))
"""


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "GLIBC_TUNABLES", "DENSEKIT_MALLOC")}
    env.update(extra)
    return env


def _run(mode: str, **env_extra) -> dict:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], env=_clean_env(**env_extra), capture_output=True,
                         text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_allocator_keeps_a_steps_memory_that_glibc_would_give_back():
    default, tuned = _run("default"), _run("tune")
    # glibc's default trims the heap at each step's end and maps blocks over its threshold anew
    assert default["trimmed"] == [True] * 3 and default["from_heap"] == {"24": False, "48": False}, default
    assert default["setting"] == "default"
    assert tuned["setting"] in ("glibc malloc: mmap threshold 1 GiB, trim threshold 1 GiB",
                                "glibc malloc: mmap threshold 32 MiB, trim threshold 1 GiB")  # a glibc that caps it
    above_32 = tuned["setting"].startswith("glibc malloc: mmap threshold 1 GiB")
    assert tuned["trimmed"] == [False] * 3 and tuned["from_heap"] == {"24": True, "48": above_32}, tuned


@pytest.mark.parametrize("env", [dict(MALLOC_ARENA_MAX="2"), dict(MALLOC_TRIM_THRESHOLD_="65536"),
                                 dict(GLIBC_TUNABLES="glibc.malloc.trim_threshold=65536"),
                                 dict(DENSEKIT_MALLOC="default")])
def test_users_own_allocator_settings_are_left_alone(env):
    result = _run("tune", **env)
    name = next(iter(env))
    assert result["setting"] == f"the user's ({name}{'=default' if name == 'DENSEKIT_MALLOC' else ''})"
    assert not result["from_heap"]["48"]  # the user's thresholds, or glibc's, hold: 48 MiB is mapped


def test_the_command_line_sets_the_allocator_before_anything_else():
    # a user error exits 2 at once; the allocator was set before the subcommand ran
    out = subprocess.run([sys.executable, "-m", "densekit", "-v", "eval", "/nonexistent-run"], env=_clean_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "allocator: glibc malloc: mmap threshold " in out.stderr


_SHIM = {"malloc": """
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
static void *(*next_malloc)(size_t);
void *malloc(size_t n)
{
    if (!next_malloc)
        next_malloc = (void *(*)(size_t))dlsym(RTLD_NEXT, "malloc");
    return next_malloc(n);
}
""", "other": "int densekit_test_unrelated(void) { return 1; }\n"}


@pytest.mark.parametrize("kind", ["malloc", "other"])
def test_a_preloaded_allocator_is_detected_and_other_preloads_are_not(kind, tmp_path):
    import shutil

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src, lib = tmp_path / "shim.c", tmp_path / "shim.so"
    src.write_text(_SHIM[kind])
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(lib), str(src), "-ldl"], check=True, timeout=120)
    result = _run("tune", LD_PRELOAD=str(lib))
    if kind == "malloc":  # an allocator in front of glibc's: left alone
        assert result["setting"] == "the user's (a preloaded malloc)"
    else:
        assert result["setting"].startswith("glibc malloc: mmap threshold")
