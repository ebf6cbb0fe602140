"""One timed configuration: build, warm up, time ``steps`` steps, read peak memory.

A training step is what a training loop does: forward and cross-entropy under autocast
(bf16) or not (fp32), backward, SGD with momentum 0.9, ``zero_grad(set_to_none=True)``.
For ``densekit`` on CUDA it is densekit's own :class:`~densekit.train.step.TrainStep`, the
step ``densekit train`` runs: the same ops with fused SGD, replayed from a CUDA graph after
two eager steps; its capture is part of the warm-up, which must be at least 3 steps.
``densekit-eager`` on CUDA is the same step and SGD without the graph; ``densekit-me`` the graph's
step on its memory-efficient network.
An inference step is a forward under ``torch.inference_mode`` on a model in eval mode.
A compiled implementation (``-compile``) runs the same steps on ``torch.compile(model)``:
its first warm-up step compiles, and ``first_step_s`` is the compile time (plus one step).

Timing: on CUDA each step is bracketed by events and synchronized once at the end, so the
host never stalls the queue between steps; on the CPU each step is bracketed by
``perf_counter`` and ``process_time`` (the CPU time shows how much of the cores the run
actually got on a shared machine).

Memory: on CUDA ``max_memory_allocated`` over the timed steps (weights, gradients,
optimizer state and activations; exact, so this runs in process). The peak is reset after
warm-up because cuDNN's kernel search allocates trial workspaces once, which say nothing
about training; the warm-up peak is kept beside it as ``warmup_peak_mem_mib``. A step
replayed from a CUDA graph allocates nothing (its activations stay in the graph's pool,
allocated during the capture), so for densekit on CUDA the peak runs from the capture,
after the eager warm-up steps, to the end. On
the CPU the growth of peak RSS from just before the first step to the end: the kernel's
high-water mark is reset there (``/proc/self/clear_refs``) where Linux allows, else
``ru_maxrss`` is used. Freed memory that the allocator keeps would hide a later
configuration's growth, so CPU memory is only reported from a fresh process
(``densekit.bench.worker``), whose allocator is set as the ``densekit`` command sets its
own (``densekit.malloc``: freed memory kept for the next step) for every implementation
alike; the setting is recorded with each run.
"""

from __future__ import annotations

import datetime
import gc
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

from ..malloc import setting as malloc_setting
from .env import models_digest
from .impls import build, torch_dtype
from ..models.frozen import optimize_for_inference
from .spec import CUDA_GRAPHED, OPTIMIZED, Config, base_impl

MIB = 2 ** 20


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset the peak RSS to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _make_step(model, x, y, config: Config):
    device_type = x.device.type
    autocast = dict(device_type=device_type, dtype=torch_dtype(config.dtype), enabled=config.dtype != "fp32")
    if config.mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode(), torch.autocast(**autocast):
                model(x)
        return step

    model.train()
    if config.impl in (*CUDA_GRAPHED, "densekit-eager") and device_type == "cuda":
        return _densekit_step(model, x, y, config, cuda_graph=config.impl in CUDA_GRAPHED)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        with torch.autocast(**autocast):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _densekit_step(model, x, y, config: Config, cuda_graph: bool):
    """densekit's own training step on CUDA, with fused SGD both with and without the graph,
    so that densekit against densekit-eager isolates what the graph buys."""
    from ..train.runtime import Runtime
    from ..train.step import TrainStep

    runtime = Runtime(device=x.device, amp_dtype=None if config.dtype == "fp32" else torch_dtype(config.dtype),
                      channels_last=config.layout == "channels_last", deterministic=False, cuda_graph=cuda_graph)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, fused=True)
    train_step = TrainStep(model, optimizer, torch.nn.CrossEntropyLoss(), runtime, cuda_graph=cuda_graph,
                           warmup_steps=_GRAPH_WARMUP)

    def step():
        train_step(x, y)
    step.train_step = train_step
    return step


# Eager steps before the capture: the capture is warm-up step number _GRAPH_WARMUP (from 0).
_GRAPH_WARMUP = 2


def measure(config: Config, record_cpu_memory: bool = False) -> dict:
    """Run ``config`` once; return its step times, warm-up time and peak memory (no tensors).

    ``record_cpu_memory`` is set by the worker, whose process holds nothing else.
    """
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    digest = models_digest()
    device = torch.device(config.device)
    cuda = device.type == "cuda"
    if cuda:
        # Let cuDNN pick its fastest kernels for every implementation alike; the search is warm-up.
        torch.backends.cudnn.benchmark = True
        # TF32 for float32 matrix products as cuDNN's convolutions use by default, so that a
        # 1x1 convolution run as a GEMM (densekit's fused block) is not held to strict fp32
        # where torchvision's cuDNN 1x1 convolution is not; densekit train does the same.
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(0)
    model = build(config)
    num_classes = model_num_classes(model)
    memory_format = torch.channels_last if config.layout == "channels_last" else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    if config.impl == OPTIMIZED:
        model = optimize_for_inference(model)
    elif config.impl != base_impl(config.impl):
        # compiled at its first call, in the warm-up; a model's compiled code is its own,
        # so the cache of an earlier configuration in this process must not serve it
        torch._dynamo.reset()
        model = torch.compile(model)
    shape = (config.batch_size, config.in_chans, config.input_size, config.input_size)
    x = torch.randn(shape, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, num_classes, (config.batch_size,), device=device)
    step = _make_step(model, x, y, config)

    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        hwm_reset = False
    else:
        base = _rss_bytes() if record_cpu_memory else None
        hwm_reset = _reset_peak_rss() if record_cpu_memory else False

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    # A replayed CUDA graph never calls the allocator: its activations live in the graph's
    # pool, allocated once, during the capture. Its peak is therefore taken from the capture
    # on (after the eager warm-up steps, whose cuDNN search may hold large workspaces), and
    # an eager step's from the timed steps.
    train_step = getattr(step, "train_step", None)
    capture_at = _GRAPH_WARMUP if train_step is not None and train_step.cuda_graph else None
    first_step_s = None
    t0 = time.perf_counter()
    for i in range(config.warmup):
        if cuda and i == capture_at:
            sync()
            torch.cuda.reset_peak_memory_stats(device)
        step()
        if i == 0:
            sync()
            first_step_s = time.perf_counter() - t0
    sync()
    warmup_s = time.perf_counter() - t0
    warmup_peak = None
    if cuda:
        warmup_peak = torch.cuda.max_memory_allocated(device)
        if capture_at is None or config.warmup <= capture_at:
            torch.cuda.reset_peak_memory_stats(device)

    step_s, cpu_s = [], []
    if cuda:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(config.steps + 1)]
        c0 = time.process_time()
        events[0].record()
        for i in range(config.steps):
            step()
            events[i + 1].record()
        torch.cuda.synchronize(device)
        step_s = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(config.steps)]
        cpu_total = time.process_time() - c0
    else:
        for _ in range(config.steps):
            t, c = time.perf_counter(), time.process_time()
            step()
            step_s.append(time.perf_counter() - t)
            cpu_s.append(time.process_time() - c)
        cpu_total = sum(cpu_s)

    if cuda:
        peak, metric = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    elif record_cpu_memory and base is not None:
        peak, metric = max(_peak_rss_bytes() - base, 0), "peak_rss_growth" if hwm_reset else "ru_maxrss_growth"
    else:
        peak, metric = None, None
    return dict(step_s=step_s, cpu_s=cpu_total, wall_s=sum(step_s), warmup_s=warmup_s, first_step_s=first_step_s,
                peak_mem_mib=None if peak is None else peak / MIB,
                base_mem_mib=None if base is None else base / MIB, mem_metric=metric,
                warmup_peak_mem_mib=None if warmup_peak is None else warmup_peak / MIB,
                threads=torch.get_num_threads(), started=started, models_digest=digest,
                # whether densekit's timed steps were replays of a captured CUDA graph
                cuda_graph_captured=None if train_step is None else train_step.captured,
                # glibc's tuning variables change what peak RSS counts (see bench/cpu.sh)
                malloc_env={k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
                malloc=malloc_setting())


def model_num_classes(model) -> int:
    head = model.get_classifier() if hasattr(model, "get_classifier") else model.classifier
    return head.out_features
