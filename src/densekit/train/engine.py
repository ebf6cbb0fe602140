"""One training epoch and one evaluation pass: the loops, and nothing else.

The device is never waited on per step: losses and correct counts stay on it and are
read back every ``SYNC_EVERY`` steps (and before any checkpoint), so the host keeps
queueing work. The check for a non-finite loss happens at those reads, before any
checkpoint is written, so a diverged run never overwrites its last good state.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import DeviceLoader, Split
from ..distributed import gather_objects, sum_across_ranks
from ..errors import UserError
from .multilabel import MultiLabelLoss, MultiLabelResult
from .runtime import Runtime
from .step import TrainStep

EVAL_BATCH_SIZE = 500  # any size gives the same predictions (BN in eval mode); large batches are fast
EVAL_BYTES = 1 << 30   # what an evaluation batch's activations may take: large images get smaller batches


def eval_batch_size(activations: int) -> int:
    """The evaluation batch for a model that keeps ``activations`` elements per image
    (``models.size``): EVAL_BATCH_SIZE, or fewer where that would take more than EVAL_BYTES."""
    return max(1, min(EVAL_BATCH_SIZE, EVAL_BYTES // (4 * max(1, activations))))
SYNC_EVERY = 25        # steps between reads of the loss from the device


class Diverged(UserError):
    """The loss became NaN or infinite; ``step`` is the 1-based optimizer step."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


@dataclasses.dataclass
class EpochStats:
    """What an epoch has accumulated so far; part of the resume state."""

    loss_sum: float = 0.0   # sum over images of the training loss
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0    # training time, without evaluation and checkpoint writes
    lr: float = 0.0         # the learning rate of the last step taken
    data_seconds: float = 0.0  # of ``seconds``, spent waiting for batches (decoding workers, augmentation)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.seen if self.seen else math.nan

    @property
    def acc(self) -> float:
        return self.correct / self.seen if self.seen else math.nan


@dataclasses.dataclass
class StepReport:
    epoch: int              # 0-based
    step: int               # steps done in this epoch
    steps_per_epoch: int
    global_step: int        # steps done in the run
    loss: float             # mean over the steps since the last report
    acc: float
    images_per_s: float


class _Window:
    """The steps since the last read-back: their losses and correct counts stay on the device
    until :meth:`flush` reads them all at once, checks them and adds them to the epoch."""

    def __init__(self, stats: EpochStats, sharded: bool, epoch: int, steps_per_epoch: int) -> None:
        self.stats, self.sharded, self.epoch, self.n = stats, sharded, epoch, steps_per_epoch
        self.pending: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self.tick = time.perf_counter()

    def add(self, loss: torch.Tensor, correct: torch.Tensor, batch: int) -> None:
        self.pending.append((loss, correct, batch))

    def restart_clock(self) -> None:
        self.tick = time.perf_counter()

    def flush(self, step: int, global_step: int) -> StepReport | None:
        """Read the pending steps back; raises :class:`Diverged` on a non-finite loss."""
        if not self.pending:
            return None
        # one read-back for all pending steps: (loss sum, correct, images) per step
        parts = torch.stack([torch.stack([l.double() * b, c.double(), torch.full_like(c, b, dtype=torch.float64)])
                             for l, c, b in self.pending])
        if self.sharded:  # each rank saw its share of the batch: add the shares up
            parts = sum_across_ranks(parts)
        loss_sums, correct, sizes = parts.cpu().numpy().T
        finite = np.isfinite(loss_sums)
        if not finite.all():
            bad = int(np.argmin(finite))
            at = global_step - len(self.pending) + bad + 1
            batch = step - len(self.pending) + bad
            raise Diverged(f"loss is {loss_sums[bad] / sizes[bad]} at step {at} (epoch {self.epoch + 1}, batch "
                           f"{batch + 1} of {self.n})", at)
        now = time.perf_counter()
        elapsed, self.tick = now - self.tick, now
        self.stats.loss_sum += float(loss_sums.sum())
        self.stats.correct += int(correct.sum())
        self.stats.seen += int(sizes.sum())
        self.stats.seconds += elapsed
        self.pending.clear()
        return StepReport(epoch=self.epoch, step=step, steps_per_epoch=self.n, global_step=global_step,
                          loss=float(loss_sums.sum() / sizes.sum()), acc=float(correct.sum() / sizes.sum()),
                          images_per_s=float(sizes.sum() / max(elapsed, 1e-9)))


def train_one_epoch(
    train_step: TrainStep,
    loader: DeviceLoader,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    epoch: int,
    start_step: int,
    global_step: int,
    stats: EpochStats,
    max_steps: int | None = None,
    save_every: int | None = None,
    save: Callable[[int, int], None] | None = None,
    report: Callable[[StepReport], None] | None = None,
    eval_modules: nn.Module | None = None,
) -> tuple[int, int]:
    """Train ``epoch`` from batch ``start_step`` on; returns (steps done in the epoch, global step).

    Stops early once ``global_step`` reaches ``max_steps``. Every ``save_every`` global
    steps inside the epoch it calls ``save(step_in_epoch, global_step)``; the epoch's end
    is left to the caller. ``eval_modules`` stay in eval mode (a frozen backbone's batch
    norms). Raises :class:`Diverged` on a non-finite loss.
    """
    optimizer = train_step.optimizer
    train_step.model.train()
    if eval_modules is not None:
        eval_modules.eval()
    n = len(loader)
    window = _Window(stats, loader.shard is not None, epoch, n)
    step = start_step
    batches = iter(loader.epoch(epoch, start_step))
    while True:
        waited = time.perf_counter()
        batch = next(batches, None)
        stats.data_seconds += time.perf_counter() - waited
        if batch is None:
            break
        x, y = batch
        stats.lr = optimizer.param_groups[0]["lr"]
        loss, correct = train_step(x, y)
        scheduler.step()
        step += 1
        global_step += 1
        window.add(loss, correct, len(y))
        stop = max_steps is not None and global_step >= max_steps
        checkpoint = save is not None and save_every and global_step % save_every == 0 and step < n
        if len(window.pending) >= SYNC_EVERY or stop or checkpoint or step == n:
            step_report = window.flush(step, global_step)
            if report is not None and step_report is not None:
                report(step_report)
        if checkpoint:
            save(step, global_step)
            window.restart_clock()  # the write is not training time
        if stop:
            break
    return step, global_step


# Above this many classes no confusion matrix is kept: it grows as their square (ImageNet-21k's
# would be 3.8 GB); the per-class counts are kept for any number.
MAX_CONFUSION_CLASSES = 1000


@dataclasses.dataclass
class EvalResult:
    loss: float                     # mean cross-entropy (no label smoothing)
    counts: np.ndarray              # (classes,) images of each true class
    hits: np.ndarray                # (classes,) of those, the correctly predicted
    confusion: np.ndarray | None = None  # (classes, classes); rows: true, columns: predicted (<= 1000 classes)

    @classmethod
    def from_confusion(cls, loss: float, confusion: np.ndarray) -> "EvalResult":
        return cls(loss, confusion.sum(axis=1), np.diagonal(confusion).copy(), confusion)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def correct(self) -> int:
        return int(self.hits.sum())

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else math.nan

    @property
    def score(self) -> float:
        """What model selection maximizes: the accuracy."""
        return self.accuracy

    @property
    def per_class(self) -> list[float | None]:
        """Accuracy on each true class; None for a class with no test images."""
        return [float(h / c) if c else None for h, c in zip(self.hits, self.counts)]


def eval_loader(split: Split, mean, std, runtime: Runtime, batch_size: int = EVAL_BATCH_SIZE,
                shard: tuple[int, int] | None = None) -> DeviceLoader:
    """The loader every evaluation uses: fixed order, no augmentation, the runtime's layout;
    ``shard`` (rank, world_size) splits each batch between data-parallel ranks."""
    return DeviceLoader(split, batch_size, mean=mean, std=std, device=runtime.device, shuffle=False,
                        channels_last=runtime.channels_last, shard=shard)


def predict_logits(model: nn.Module, x: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Logits of one normalized batch, the way evaluation computes them (float32 out)."""
    with runtime.autocast():
        return model(x).float()


@torch.inference_mode()
def evaluate(model: nn.Module, loader, runtime: Runtime, num_classes: int,
             report: Callable[[int], None] | None = None, multi_label: bool = False) -> EvalResult | MultiLabelResult:
    """Loss and confusion matrix of ``model`` in eval mode over ``loader`` (a ``DeviceLoader``
    or a ``StreamingLoader``); ``report(batches done)`` every few batches. A ``multi_label``
    model's result holds every image's probabilities instead (``multilabel``)."""
    if multi_label:
        return _evaluate_multi_label(model, loader, runtime, report)
    was_training = model.training
    model.eval()
    # Autotuned kernels may differ between two processes; the default heuristics pick the
    # same ones for the same shapes, so `densekit eval` reproduces the training run's number.
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
        preds, labels = [], []
        for i, (x, y) in enumerate(loader, 1):
            logits = predict_logits(model, x, runtime)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            preds.append(logits.argmax(1))
            labels.append(y)
            if report is not None and (i % SYNC_EVERY == 0 or i == len(loader)):
                report(i)
        pred = torch.cat(preds).cpu() if preds else torch.zeros(0, dtype=torch.int64)
        true = torch.cat(labels).cpu() if labels else torch.zeros(0, dtype=torch.int64)
        # on the host: CUDA's bincount is not deterministic, and this is tiny
        if num_classes <= MAX_CONFUSION_CLASSES:
            tally = torch.bincount(true * num_classes + pred, minlength=num_classes * num_classes)
        else:
            tally = torch.cat([torch.bincount(true, minlength=num_classes),
                               torch.bincount(true[pred == true], minlength=num_classes)])
        if loader.shard is not None:  # each rank evaluated its share of the test set
            loss_sum, tally = sum_across_ranks(loss_sum), sum_across_ranks(tally)
        if num_classes <= MAX_CONFUSION_CLASSES:
            result = EvalResult.from_confusion(math.nan, tally.view(num_classes, num_classes).numpy())
        else:
            result = EvalResult(math.nan, tally[:num_classes].numpy(), tally[num_classes:].numpy())
        result.loss = float(loss_sum) / result.total if result.total else math.nan
        return result
    finally:
        torch.backends.cudnn.benchmark = benchmark
        model.train(was_training)


@torch.inference_mode()
def _evaluate_multi_label(model: nn.Module, loader, runtime: Runtime,
                          report: Callable[[int], None] | None) -> MultiLabelResult:
    was_training = model.training
    model.eval()
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    criterion = MultiLabelLoss()
    try:
        loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
        known = torch.zeros((), dtype=torch.float64, device=runtime.device)
        probs, targets = [], []
        for i, (x, y) in enumerate(loader, 1):
            logits = predict_logits(model, x, runtime)
            n = (~torch.isnan(y)).sum()
            loss_sum += criterion(logits, y).double() * n
            known += n
            probs.append(torch.sigmoid(logits).cpu())
            targets.append(y.cpu())
            if report is not None and (i % SYNC_EVERY == 0 or i == len(loader)):
                report(i)
        width = model.num_classes if hasattr(model, "num_classes") else 0
        p = torch.cat(probs).numpy() if probs else np.zeros((0, width), np.float32)
        t = torch.cat(targets).numpy() if targets else np.zeros((0, width), np.float32)
        if loader.shard is not None:  # AUROC and AP do not depend on the images' order
            loss_sum, known = sum_across_ranks(loss_sum), sum_across_ranks(known)
            parts = gather_objects((p, t))
            p, t = np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])
        return MultiLabelResult(float(loss_sum / known) if float(known) else math.nan, p, t)
    finally:
        torch.backends.cudnn.benchmark = benchmark
        model.train(was_training)
