"""Multi-label training and scoring: the masked loss, the hits, the metrics against hand counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densekit.train.multilabel import MultiLabelLoss, MultiLabelResult, auto_pos_weight, exact_hits, roc_curves

NAN = float("nan")


def test_loss_leaves_unknown_targets_out():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    target = torch.tensor([[1.0, NAN, 0.0], [0.0, 1.0, NAN]])
    known = [(0, 0), (0, 2), (1, 0), (1, 1)]
    by_hand = sum(F.binary_cross_entropy_with_logits(logits[i, j], target[i, j]) for i, j in known) / 4
    torch.testing.assert_close(MultiLabelLoss()(logits, target), by_hand)
    # positives weighed per label: label 0's positive counts 3 times
    weighted = MultiLabelLoss(torch.tensor([3.0, 1.0, 1.0]))(logits, target)
    extra = 2 * F.binary_cross_entropy_with_logits(logits[0, 0], target[0, 0]) / 4
    torch.testing.assert_close(weighted, by_hand + extra)
    # every target unknown: no loss, and no NaN
    assert MultiLabelLoss()(logits, torch.full_like(target, NAN)).item() == 0.0


def test_pos_weight_is_negatives_over_positives_of_known_targets():
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, NAN], [0.0, 1.0, NAN], [0.0, 0.0, 0.0]])
    assert auto_pos_weight(labels).tolist() == [3.0, 3.0, 1.0]  # label 2: no positive -> 1


def test_exact_hits_need_every_known_label_right():
    logits = torch.tensor([[1.0, -1.0], [1.0, 1.0], [-1.0, 5.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0], [NAN, 1.0]])
    assert exact_hits(logits, target).item() == 2  # the second image gets label 1 wrong


def test_auroc_and_average_precision_by_hand():
    probs = np.array([[0.9, 0.2], [0.4, 0.8], [0.6, 0.1], [0.1, 0.7]], dtype=np.float32)
    targets = np.array([[1, 0], [0, 1], [1, NAN], [0, 0]], dtype=np.float32)
    r = MultiLabelResult(0.3, probs, targets)
    # label 0: positives 0.9, 0.6 against negatives 0.4, 0.1: every pair ordered right
    # label 1 (known: 0.2-, 0.8+, 0.7-): the positive beats both negatives
    assert r.auroc == [1.0, 1.0] and r.mean_auroc == 1.0
    r2 = MultiLabelResult(0.3, probs[:, ::-1].copy(), targets)
    # label 0 now scores 0.2, 0.1 (positives) against 0.8, 0.7 (negatives): all pairs wrong
    assert r2.auroc[0] == 0.0
    # AP of label 1 in r2 (known scores 0.9-, 0.4+, 0.1-): ranked -, +, -: precision 1/2 at its recall
    assert r2.average_precision[1] == pytest.approx(0.5)
    assert r.correct == 3 and r.accuracy == 0.75  # image 4: label 1 at 0.7 is called present
    curves = roc_curves(r, ["a", "b"])
    assert [c[0] for c in curves] == ["a", "b"] and all(c[3] == 1.0 for c in curves)


def test_a_label_with_one_class_has_no_auroc():
    r = MultiLabelResult(0.1, np.array([[0.3, 0.6], [0.2, 0.9]], np.float32),
                         np.array([[0, 1], [0, 0]], np.float32))
    assert math.isnan(r.auroc[0]) and r.auroc[1] == 0.0 and r.mean_auroc == 0.0
    assert math.isnan(MultiLabelResult(0.1, np.zeros((2, 1), np.float32), np.zeros((2, 1), np.float32)).mean_auroc)
