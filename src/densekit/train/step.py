"""One training step (forward, loss, backward, update), run eagerly or replayed from a CUDA graph.

On a GPU a DenseNet step on small images is launch-bound: DenseNet-BC-100 at 32 px is about
two thousand kernels of a few microseconds' work each, so the host's launch cost, not the
card, sets the pace (torchvision eager: 926 img/s at batch 64 on an H100, docs/performance.md).
Replaying the whole step from a CUDA graph removes that cost without a compiler: capturing
takes about one step. What capture needs, and how it is met here:

- static shapes: the training loader drops the last partial batch; a batch of any other
  shape, dtype or layout runs eagerly;
- no host synchronisation inside the step: the fused block's data-dependent shortcuts run
  on the CPU only, batch-norm momentum is a number, and the loss and the correct count are
  returned as copies that the engine reads back every few steps;
- a learning rate that changes without a new capture: during capture each param group's lr
  is a one-element device tensor, which the fused SGD kernel reads at every replay; before
  each replay the host writes the scheduler's current rate into it (an asynchronous fill).
  The optimizer's param groups keep plain floats, so checkpoints are the same either way;
- warm-up: the first ``warmup_steps`` steps run eagerly on a side stream (cuDNN autotuning,
  cuBLAS handles, the momentum buffers); each is a real step on a real batch.

If capture fails, the step says why in the log and stays eager: slower, never wrong.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .multilabel import exact_hits
from .runtime import Runtime

log = logging.getLogger(__name__)


def hits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The batch's correctly predicted images: the class (int labels), or every known label
    at probability 0.5 (multi-label float targets, ``multilabel.exact_hits``)."""
    return exact_hits(logits, y) if y.dim() == 2 else (logits.argmax(1) == y).sum()


class TrainStep:
    """``step(x, y)`` trains ``model`` on one batch and returns (loss, correct) as device tensors;
    ``y`` is class indices (B,), or multi-label targets (B, L) for a ``MultiLabelLoss``.

    ``cuda_graph`` replays steps from a CUDA graph after ``warmup_steps`` eager ones; it
    needs a CUDA runtime and a fused SGD optimizer (``torch.optim.SGD(..., fused=True)``),
    whose kernel takes its learning rate from device memory.

    ``sparsity`` (``(scales, lam)``) adds lam * |scale| summed over ``scales`` to the loss, by
    its subgradient lam * sign(scale) added to their gradients after backward (network
    slimming's sparsity training; the reported loss is the criterion's alone).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                 runtime: Runtime, cuda_graph: bool = False, warmup_steps: int = 3,
                 sparsity: tuple[list[torch.Tensor], float] | None = None) -> None:
        if cuda_graph:
            if warmup_steps < 1:
                # the fused SGD kernel creates its momentum buffers on its first step; captured
                # there, every replay would reset them
                raise ValueError(f"cuda_graph needs warmup_steps >= 1, got {warmup_steps}")
            if runtime.device.type != "cuda":
                raise ValueError(f"cuda_graph needs a CUDA device, got {runtime.device}")
            if not isinstance(optimizer, torch.optim.SGD) or not all(g["fused"] for g in optimizer.param_groups):
                raise ValueError("cuda_graph needs torch.optim.SGD(..., fused=True): its kernel reads the "
                                 "learning rate from device memory at every replay")
        self.model, self.optimizer, self.criterion, self.runtime = model, optimizer, criterion, runtime
        self.cuda_graph = cuda_graph
        self.sparsity = sparsity if sparsity is not None and sparsity[1] > 0 and sparsity[0] else None
        self.warmup_steps = warmup_steps
        self._warm = 0
        self._graph = None

    @property
    def captured(self) -> bool:
        """True once steps are replayed from the graph."""
        return self._graph is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cuda_graph:
            return self._eager(x, y)
        # capture and replay record on the current device's streams: make it the run's (cuda:N)
        with torch.cuda.device(self.runtime.device):
            return self._graphed(x, y)

    def _graphed(self, x, y):
        if self._graph is None:
            if self._warm < self.warmup_steps:
                self._warm += 1
                return self._on_side_stream(x, y)
            if not self._capture(x, y):
                self.cuda_graph = False
                return self._eager(x, y)
        if not self._fits(x, y):
            out = self._eager(x, y)
            self._restore_grads()
            return out
        self._x.copy_(x)
        self._y.copy_(y)
        for lr, group in zip(self._lrs, self.optimizer.param_groups):
            lr.fill_(group["lr"])
        self._graph.replay()
        return self._loss.clone(), self._correct.clone()

    def _step(self, x: torch.Tensor, y: torch.Tensor, autocast_cache: bool = True):
        """The step itself; the same ops eagerly and under capture."""
        with self.runtime.autocast(cache_enabled=autocast_cache):
            logits = self.model(x)
            loss = self.criterion(logits, y)
        loss.backward()
        if self.sparsity is not None:
            scales, lam = self.sparsity
            scales = [p for p in scales if p.grad is not None]
            if scales:
                with torch.no_grad():  # no autograd history on the gradients (DDP's are bucket views)
                    torch._foreach_add_([p.grad for p in scales], torch._foreach_sign(scales), alpha=lam)
        self.optimizer.step()
        return loss.detach(), hits(logits.detach(), y)

    def _eager(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        return self._step(x, y)

    def _on_side_stream(self, x, y):
        side = torch.cuda.Stream(self.runtime.device)
        side.wait_stream(torch.cuda.current_stream(self.runtime.device))
        with torch.cuda.stream(side):
            out = self._eager(x, y)
        torch.cuda.current_stream(self.runtime.device).wait_stream(side)
        return out

    def _fits(self, x, y) -> bool:
        return (x.shape == self._x.shape and x.stride() == self._x.stride() and x.dtype == self._x.dtype
                and y.shape == self._y.shape and y.dtype == self._y.dtype)

    def _restore_grads(self) -> None:
        # an eager step allocated fresh gradients; the graph reads and writes its own
        for p, g in zip(self._params, self._grads):
            p.grad = g

    def _capture(self, x, y) -> bool:
        groups = self.optimizer.param_groups
        if not all(g["fused"] for g in groups):  # e.g. a state dict loaded from an eager run
            log.warning("CUDA graph not captured: the optimizer is not fused SGD; training eagerly")
            return False
        floats = [g["lr"] for g in groups]
        self._x, self._y = x.clone(), y.clone()  # clone keeps x's memory format
        self._lrs = [torch.tensor(float(lr), device=self.runtime.device) for lr in floats]
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # backward inside the graph allocates them
        stream = torch.cuda.current_stream(self.runtime.device)
        try:
            for g, lr in zip(groups, self._lrs):
                g["lr"] = lr
            with torch.cuda.graph(graph):
                # autocast's cast cache would hold tensors from outside the graph's pool
                self._loss, self._correct = self._step(self._x, self._y, autocast_cache=False)
        except RuntimeError as e:
            # where ending the capture fails, torch.cuda.graph leaves its capture stream current
            torch.cuda.set_stream(stream)
            torch.cuda.synchronize(self.runtime.device)
            cause = e.__context__ or e  # the op that broke the capture, not the failed end of it
            log.warning("CUDA graph capture failed, training eagerly: %s",
                        "; ".join(dict.fromkeys((str(x) or repr(x)).splitlines()[0] for x in (cause, e))))
            self.optimizer.zero_grad(set_to_none=True)
            return False
        finally:
            for g, lr in zip(groups, floats):
                g["lr"] = lr
        self._params = [p for g in groups for p in g["params"]]
        self._grads = [p.grad for p in self._params]
        self._graph = graph
        return True
