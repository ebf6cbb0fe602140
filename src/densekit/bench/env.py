"""The machine and software a result was measured on: every figure carries it."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import torch


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    from densekit.train.runtime import cpuinfo

    return cpuinfo("model name") or platform.processor() or platform.machine()


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_state() -> dict:
    # The source tree the package runs from (src/ on PYTHONPATH or an editable install).
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():  # an installed copy: its version says what it is
        return {}
    commit = _run(["git", "rev-parse", "--short", "HEAD"], cwd=root)
    if commit is None:
        return {}
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return dict(git_commit=commit, git_dirty=bool(dirty))


def models_digest() -> str:
    """A short hash of densekit's model sources as they are on disk now.

    Each run records it: when the sources change during a long benchmark (someone is
    optimizing the block), rounds of one figure may have measured different code.
    """
    root = Path(__file__).resolve().parents[1] / "models"
    h = hashlib.sha1()
    for path in sorted([*root.glob("*.py"), *root.glob("*.c")]):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def environment() -> dict:
    """Card, driver, CUDA, library versions, CPU, cores, threads, load and date."""
    import densekit
    from densekit.malloc import setting as malloc_setting
    from densekit.models import native
    from densekit.train.runtime import bf16_hardware

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    env = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        densekit=densekit.__version__, **_git_state(), models_digest=models_digest(),
        torch=torch.__version__, torchvision=_version("torchvision"), timm=_version("timm"),
        python=platform.python_version(), platform=platform.platform(),
        cpu=_cpu_model(), cores=cores, torch_threads=torch.get_num_threads(),
        native_cpu_kernels=native.available(), cpu_bf16=bf16_hardware(torch.device("cpu")),
        load_avg=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        malloc=malloc_setting(),
        card=None, driver=None, cuda=torch.version.cuda, cudnn=None,
    )
    if torch.cuda.is_available():
        env.update(card=torch.cuda.get_device_name(0), cudnn=torch.backends.cudnn.version(),
                   gpu_memory_mib=torch.cuda.get_device_properties(0).total_memory // 2 ** 20,
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env["driver"] = driver.splitlines()[0] if driver else None
    return env


def card_slug(env: dict, devices: list[str]) -> str:
    """A short file-name tag: "h100", "rtx-4090", or "cpu"."""
    if "cuda" not in devices or not env.get("card"):
        return "cpu"
    words = [w for w in re.split(r"[\s_]+", env["card"].lower()) if w not in ("nvidia", "geforce", "tesla", "amd")]
    out = []
    for w in words:
        if any(ch.isdigit() for ch in w):
            out.append(w.split("-")[0])
            break
        out.append(w)
    return "-".join(out) or "gpu"


def default_out(env: dict, devices: list[str]) -> Path:
    torch_minor = ".".join(env["torch"].split("+")[0].split(".")[:2])
    return Path("bench/results") / f"{card_slug(env, devices)}-torch{torch_minor}.json"
