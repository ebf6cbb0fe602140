"""The one place that picks the device and the precision, for training and inference alike.

On CUDA: bf16 autocast (the weights, optimizer and loss stay float32) and channels-last
memory, which is what cuDNN's fastest convolution kernels want; cuDNN autotuning unless
the run must be deterministic; training steps replayed from a CUDA graph (``step.py``).
On a CPU whose bf16 instructions are faster than its float32 ones (:func:`bf16_preferred`:
AMX-BF16, or AVX512-BF16 on AMD): bf16 autocast, whose convolutions oneDNN runs on them, with
the fused block's native kernels taking bf16 too: `make run` trained 1.35x as fast to the
same accuracy on a 2-core AVX512-BF16 EPYC (docs/performance.md#make-run). On other CPUs,
among them Intel ones with AVX512-BF16 but no AMX, whose two 512-bit FMA units multiply as
many float32 values per cycle as their one bf16 dot-product unit does bf16 pairs (there
densenet121 inferred 0.71x as fast in bf16, ``make run``'s model trained 0.86-0.97x):
float32. The default layout on the CPU.

``precision`` overrides the choice of dtype: "fp32", or "bf16" (autocast) on any device
that runs it (on a CPU without bf16 instructions, emulated and slow); ``bf16_hardware`` in a
run's summary says what the device offers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..models import native

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclasses.dataclass
class RuntimeFacts:
    """Where and how a run or an evaluation computed: part of what it reports."""

    device: str
    device_name: str
    precision: str
    channels_last: bool
    deterministic: bool
    cuda_graph: bool
    native_cpu_kernels: bool     # the fused block's CPU passes ran as native kernels (speed, not results)
    bf16_hardware: str           # the device's bf16 arithmetic: "AMX-BF16", "AVX512-BF16", "none" (CPU), "cuda"


@dataclasses.dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None   # autocast dtype; None runs in float32
    channels_last: bool
    deterministic: bool
    cuda_graph: bool = False        # replay training steps from a CUDA graph (CUDA only)

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> dict:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return dict(device=str(self.device), device_name=name, precision=self.precision,
                    channels_last=self.channels_last, deterministic=self.deterministic,
                    cuda_graph=self.cuda_graph,
                    native_cpu_kernels=self.device.type == "cpu" and native.available(),
                    bf16_hardware=bf16_hardware(self.device))

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device, in the memory format the runtime uses."""
        return model.to(self.device, memory_format=self.memory_format)

    def autocast(self, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=cache_enabled)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def activated(self) -> Iterator[None]:
        """Apply the process-wide settings this runtime needs, and restore them after."""
        saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                 torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(),
                 torch.backends.cudnn.deterministic)
        try:
            torch.use_deterministic_algorithms(self.deterministic, warn_only=False)
            torch.backends.cudnn.deterministic = self.deterministic
            # autotuning picks kernels by timing, so two runs may pick different ones
            torch.backends.cudnn.benchmark = self.device.type == "cuda" and not self.deterministic
            if self.device.type == "cuda" and not self.deterministic:
                torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in float32
            yield
        finally:
            torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
            torch.backends.cudnn.benchmark = saved[2]
            torch.set_float32_matmul_precision(saved[3])
            torch.backends.cudnn.deterministic = saved[4]


def bf16_hardware(device: torch.device) -> str:
    """What bf16 arithmetic ``device`` has: on the CPU its widest bf16 instructions (oneDNN's
    bf16 convolutions use them; without them bf16 is emulated), "cuda" on a GPU that runs bf16."""
    if device.type == "cuda":
        return "cuda" if torch.cuda.is_bf16_supported() else "none"
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX-BF16"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return "none"


def cpuinfo(field: str) -> str:
    """The first value of ``field`` in /proc/cpuinfo ("vendor_id", "model name", ...; "" where
    there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD", ...; "" where unknown)."""
    return cpuinfo("vendor_id")


def bf16_preferred(device: torch.device, hardware: str | None = None, vendor: str | None = None) -> bool:
    """Does precision "auto" run bf16 autocast on ``device``? On CUDA where it runs bf16; on the
    CPU with AMX-BF16, or with AVX512-BF16 on an AMD CPU (Zen 4 and 5, where it made training
    1.35x faster) but not on an Intel one without AMX (see the module docstring).
    ``hardware`` and ``vendor`` default to this machine's (:func:`bf16_hardware`, :func:`cpu_vendor`)."""
    hardware = bf16_hardware(device) if hardware is None else hardware
    if hardware in ("cuda", "AMX-BF16"):
        return True
    return hardware == "AVX512-BF16" and (cpu_vendor() if vendor is None else vendor) == "AuthenticAMD"


def select_runtime(device: str = "auto", channels_last: bool | None = None,
                   deterministic: bool = False, cuda_graph: bool | None = None, precision: str = "auto") -> Runtime:
    """Choose the device ("auto", "cpu", "cuda" or "cuda:N") and with it the precision
    (``precision`` "auto": bf16 autocast where :func:`bf16_preferred`, else float32; or
    "fp32", "bf16").

    ``channels_last`` and ``cuda_graph`` None mean: on CUDA only.
    """
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise UserError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if deterministic:
            # cuBLAS needs a fixed workspace to be reproducible; it must be set before its first use
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"precision bf16 asked for, but {torch.cuda.get_device_name(dev)} does not run bf16")
    if precision == "auto":
        amp = torch.bfloat16 if bf16_preferred(dev) else None
    else:
        amp = torch.bfloat16 if precision == "bf16" else None
    if channels_last is None:
        channels_last = dev.type == "cuda"
    if cuda_graph is None:
        cuda_graph = dev.type == "cuda"
    elif cuda_graph and dev.type != "cuda":
        raise UserError(f"CUDA graphs need a CUDA device; the run is on {dev}")
    return Runtime(device=dev, amp_dtype=amp, channels_last=bool(channels_last), deterministic=bool(deterministic),
                   cuda_graph=bool(cuda_graph))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)  # seeds every CUDA device too


def rng_state() -> dict[str, torch.Tensor]:
    """torch's generator states as uint8 tensors (the only generators training draws from)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    if "cpu" in state:
        torch.set_rng_state(state["cpu"].cpu())
    cuda = [state[k].cpu() for k in sorted((k for k in state if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    # a run resumed on another machine may have fewer devices; restore those that exist
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
