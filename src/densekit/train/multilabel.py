"""Several labels per image (ChestX-ray14's 14 findings, CheXpert's): sigmoid outputs trained
with binary cross-entropy, scored by per-label AUROC and average precision.

Targets are float (B, L): 1 present, 0 absent, NaN unknown (CheXpert's uncertain labels
under ``ignore``); an unknown entry adds nothing to the loss, the hits or the metrics.
AUROC and average precision come from scikit-learn (``roc_auc_score``,
``average_precision_score``, ``roc_curve`` for ``plots.roc_png``); a label whose known targets are all one value
has neither, and is left out of the means (NaN in the per-label lists), as is usual for
CheXNet-style reports. "Accuracy" of a multi-label model is the exact-match ratio: the
share of images whose every known label is decided right at probability 0.5.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class MultiLabelLoss(nn.Module):
    """Binary cross-entropy with logits, averaged over the known (non-NaN) targets;
    ``pos_weight`` (L,) weighs each label's positives (``auto_pos_weight``)."""

    def __init__(self, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(target)
        loss = F.binary_cross_entropy_with_logits(logits, torch.where(known, target, 0.0), weight=known.to(logits.dtype),
                                                  pos_weight=self.pos_weight, reduction="sum")
        return loss / known.sum().clamp(min=1)


def auto_pos_weight(labels: torch.Tensor) -> torch.Tensor:
    """Each label's negatives over its positives among the known training targets (1 where
    a label has no positive), so that a rare finding weighs as much as a common one."""
    known = ~torch.isnan(labels)
    pos = ((labels == 1) & known).sum(0).double()
    neg = ((labels == 0) & known).sum(0).double()
    return torch.where(pos > 0, neg / pos.clamp(min=1), torch.ones_like(pos)).float()


def exact_hits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Images whose every known label is decided right at probability 0.5 (logit 0)."""
    right = (logits > 0) == (target > 0.5)
    return (right | torch.isnan(target)).all(1).sum()


def _per_label(metric, targets: np.ndarray, probs: np.ndarray) -> list[float]:
    out = []
    for j in range(targets.shape[1]):
        known = ~np.isnan(targets[:, j])
        t = targets[known, j]
        if t.size == 0 or t.min() == t.max():  # one class only: undefined
            out.append(math.nan)
        else:
            out.append(float(metric(t, probs[known, j])))
    return out


@dataclasses.dataclass
class MultiLabelResult:
    """An evaluation of a multi-label model: the loss, and each image's probabilities and
    targets (N, L) for the metrics."""

    loss: float
    probs: np.ndarray
    targets: np.ndarray

    @property
    def total(self) -> int:
        return len(self.targets)

    @property
    def correct(self) -> int:
        right = (self.probs > 0.5) == (self.targets > 0.5)
        return int((right | np.isnan(self.targets)).all(1).sum())

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else math.nan

    @property
    def auroc(self) -> list[float]:
        from sklearn.metrics import roc_auc_score

        return _per_label(roc_auc_score, self.targets, self.probs)

    @property
    def average_precision(self) -> list[float]:
        from sklearn.metrics import average_precision_score

        return _per_label(average_precision_score, self.targets, self.probs)

    @property
    def mean_auroc(self) -> float:
        return _nanmean(self.auroc)

    @property
    def mean_average_precision(self) -> float:
        return _nanmean(self.average_precision)

    @property
    def score(self) -> float:
        """What model selection maximizes: the mean AUROC over the labels that have one."""
        return self.mean_auroc


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def roc_curves(result: MultiLabelResult, labels: list[str]) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(label, false positive rates, true positive rates, AUROC) of each label that has a curve."""
    from sklearn.metrics import roc_curve

    out = []
    for j, (name, auc) in enumerate(zip(labels, result.auroc)):
        if not math.isnan(auc):
            known = ~np.isnan(result.targets[:, j])
            fpr, tpr, _ = roc_curve(result.targets[known, j], result.probs[known, j])
            out.append((name, fpr, tpr, auc))
    return out
