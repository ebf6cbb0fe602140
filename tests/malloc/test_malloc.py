"""densekit.malloc: glibc keeps a freed block for the next step instead of faulting it in anew.

Each case runs in a fresh interpreter: the allocator's thresholds belong to the process.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's allocator only")

# A step's pattern: ten 3 MiB activations allocated, touched and freed together, after one
# 4 MiB block was freed (which raises glibc's thresholds to about 4 and 8 MiB); the minor
# page faults of the last four of six steps. Through libc itself, so that no small
# allocation of the interpreter's lands between them.
_SCRIPT = """
import ctypes, json, resource, sys
from densekit.malloc import setting, tune_malloc
if sys.argv[1] == "tune":
    tune_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def block(size):
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    return p
libc.free(block(4 * 2 ** 20))
faults = []
for i in range(6):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step = [block(3 * 2 ** 20) for _ in range(10)]
    for p in step:
        libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps(dict(faults=faults[2:], setting=setting())))
"""


def _run(mode: str, **env_extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_allocator_reuses_a_freed_block_that_glibc_would_give_back():
    default, tuned = _run("default"), _run("tune")
    pages = 30 * 2 ** 20 // os.sysconf("SC_PAGE_SIZE")
    # glibc's default gives the step's memory back at its end and faults it in again at the next
    assert min(default["faults"]) > pages // 2, default
    assert max(tuned["faults"]) < pages // 20, tuned
    assert default["setting"] == "default"
    assert tuned["setting"] == "glibc malloc: mmap threshold 32 MiB, trim threshold 1 GiB"


@pytest.mark.parametrize("env", [dict(MALLOC_ARENA_MAX="2"), dict(MALLOC_MMAP_THRESHOLD_="65536"),
                                 dict(GLIBC_TUNABLES="glibc.malloc.trim_threshold=1")])
def test_users_own_allocator_settings_are_left_alone(env):
    result = _run("tune", **env)
    name = next(iter(env))
    assert result["setting"] == f"the user's ({name})"
    if name == "MALLOC_MMAP_THRESHOLD_":  # the user's threshold holds: every block is mmapped again
        assert min(result["faults"]) > 30 * 2 ** 20 // os.sysconf("SC_PAGE_SIZE") // 2


def test_the_command_line_sets_the_allocator():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-m", "densekit", "-v", "models"], env=env, capture_output=True,
                         text=True, check=True, timeout=300)
    assert "allocator: glibc malloc: mmap threshold 32 MiB, trim threshold 1 GiB" in out.stderr
