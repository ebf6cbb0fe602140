"""The types every dataset reader returns, the validation split, and the one error they raise."""

from __future__ import annotations

import dataclasses
import math

import torch

from ..checks import ArgumentError
from ..errors import UserError


class DataError(UserError):
    """A user-facing data problem: a missing, truncated or corrupt file, or a bad layout.

    ``str(e)`` is one line naming the file or directory and what was expected, so the
    CLI can show it as is, without a traceback.
    """


class DataArgumentError(DataError, ArgumentError):
    """A data problem whose remedy is an argument: ``template`` names it in braces
    ({data_dir}) for the command line to say as its flag (``checks.ArgumentError``)."""

    def __init__(self, template: str) -> None:
        ArgumentError.__init__(self, template)


def check_label_tensor(labels: torch.Tensor, n: int, what: str) -> None:
    """Labels are int64 (N,) class indices (single-label), or float32 (N, L) with 1 for a label
    present, 0 for absent and NaN for unknown, which the loss and the metrics leave out
    (multi-label)."""
    single = labels.dtype == torch.int64 and labels.dim() == 1
    multi = labels.dtype == torch.float32 and labels.dim() == 2
    if not (single or multi) or len(labels) != n:
        raise ValueError(f"labels must be an int64 tensor (N,) or a float32 tensor (N, L) with N = {n} {what}, "
                         f"got {labels.dtype} of shape {tuple(labels.shape)}")


@dataclasses.dataclass
class Split:
    images: torch.Tensor  # uint8, (N, C, H, W), CPU
    labels: torch.Tensor  # int64 (N,), or float32 (N, L): see check_label_tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 tensor of shape (N, C, H, W), "
                f"got {self.images.dtype} of shape {tuple(self.images.shape)}"
            )
        check_label_tensor(self.labels, len(self.images), "images")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "Split":
        # clone: the rest's memory is freed rather than kept alive by a view
        return Split(self.images[index].clone(), self.labels[index].clone())


@dataclasses.dataclass
class FileSplit:
    """A split as image files and their labels, decoded only when a batch needs them."""

    paths: list[str]
    labels: torch.Tensor  # int64 (N,), or float32 (N, L): see check_label_tensor

    def __post_init__(self) -> None:
        check_label_tensor(self.labels, len(self.paths), "paths")

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: torch.Tensor) -> "FileSplit":
        return FileSplit([self.paths[i] for i in index.tolist()], self.labels[index].clone())


@dataclasses.dataclass
class Dataset:
    """A dataset's splits as a model sees them: ``image_size`` is the size of every batch;
    ``val`` is the split every epoch is scored on and the best checkpoint chosen by,
    ``test`` (None where the dataset has none) is scored once, at the end."""

    name: str
    train: Split | FileSplit
    val: Split | FileSplit
    test: Split | FileSplit | None
    classes: list[str]  # index = label (multi-label: column of the label tensors)
    in_chans: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]  # per channel, [0, 1] units, from the train split
    std: tuple[float, ...]
    val_source: str = ""     # how the validation split was made, in words
    # How evaluation frames an image: None resizes it whole to image_size (the fixed-size
    # datasets); a number resizes its short side to image_size / crop_pct and takes the center.
    crop_pct: float | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def streaming(self) -> bool:
        """Read batch by batch in worker processes (image files, a user's dataset), rather
        than held in memory."""
        return not isinstance(self.train, Split)

    @property
    def multi_label(self) -> bool:
        """Several labels per image (sigmoid outputs), rather than one class."""
        return self.train.labels.dim() == 2


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) indices, in increasing order: ``fraction`` of each class's images held
    out (rounded, at least one where a class has two or more, never all), chosen by a
    generator seeded with ``seed`` alone, so that the split is the same in every run of it.
    Where classes are too small for that to reach ``fraction`` of all images (a class of one
    image gives none), the rest is drawn from all images alike, the last image of a class only
    where nothing else is left. Multi-label images are
    grouped by their rarest label (those with none form a group of their own), so that rare
    labels are held out in proportion too."""
    if labels.dim() == 2:
        labels = rarest_label(labels)
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(labels), dtype=torch.bool)
    if fraction <= 0 or len(labels) < 2:
        return torch.arange(len(labels)), torch.zeros(0, dtype=torch.int64)
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        n = len(members)
        k = min(n - 1, max(1, round(fraction * n))) if n >= 2 else 0
        out[members[torch.randperm(n, generator=g)[:k]]] = True
    short = min(len(labels) - 1, max(1, round(fraction * len(labels)))) - int(out.sum())
    if short > 0:  # first from classes that keep an image to train on; the last image of a class last
        values, counts = torch.unique(labels[~out], return_counts=True)
        left = dict(zip(values.tolist(), counts.tolist()))
        order = torch.nonzero(~out).flatten()[torch.randperm(int((~out).sum()), generator=g)].tolist()
        for last_resort in (False, True):
            for i in order:
                c = int(labels[i])
                if short and not out[i] and (last_resort or left[c] > 1):
                    out[i], left[c], short = True, left[c] - 1, short - 1
    return torch.nonzero(~out).flatten(), torch.nonzero(out).flatten()


def rarest_label(labels: torch.Tensor) -> torch.Tensor:
    """(N,) for (N, L) multi-label targets: the index of each image's rarest present label,
    or L for an image with none."""
    present = labels.nan_to_num(0.0) > 0.5
    counts = present.sum(0).double()
    rank = torch.where(present, counts, torch.full_like(counts, math.inf).expand_as(present))
    return torch.where(present.any(1), rank.argmin(1), torch.full((len(labels),), labels.shape[1]))


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images, in [0, 1] units.

    A uint8 channel takes only 256 values, so a histogram gives the exact moments in
    float64 without ever materialising a float copy of the images (60k MNIST images
    would be 376 MB as float64).
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"images must be a uint8 tensor of shape (N, C, H, W), "
            f"got {images.dtype} of shape {tuple(images.shape)}"
        )
    if images.numel() == 0:
        raise ValueError("cannot compute channel statistics of an empty image tensor")
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * (values - mean) ** 2).sum() / n
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return tuple(means), tuple(stds)


def check_labels(labels: torch.Tensor, num_classes: int, source: object) -> None:
    """Raise DataError naming ``source`` if any label is outside [0, num_classes)."""
    if labels.numel() == 0 or labels.dim() == 2:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(
            f"{source}: labels must be in [0, {num_classes - 1}], found values in [{lo}, {hi}]"
        )
