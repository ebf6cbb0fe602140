"""A user's own ``torch.utils.data.Dataset`` as a split densekit trains on (``densekit.fit``).

Items are ``(image, target)``: the image a uint8 tensor (C, H, W) or a PIL image, as
``torchvision.io.decode_image`` or a v2 transform ending in ``ToImage()`` gives (densekit
normalizes it with the run's mean and std, which the run directory keeps for ``predict``);
the target a class index, or a float vector of L labels (1 present, 0 absent, NaN unknown)
for a multi-label dataset. Every image of a split must have one size.

Items are read in DataLoader worker processes through the streaming loader. Each item is
read with the torch generator seeded by the sample's own seed (drawn up front from the run's
seed and the epoch), so the random transforms of ``torchvision.transforms.v2`` inside the
dataset make the same draws whichever worker reads it, and a resumed run sees the same
batches; draws from Python's ``random`` or NumPy are not seeded.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.utils.data
from torchvision.transforms.v2 import functional as TF

from ..checks import ArgumentError
from .core import check_label_tensor


@dataclasses.dataclass
class TorchSplit:
    """Items ``index`` of ``dataset``, with their targets (read once: ``labels``)."""

    dataset: torch.utils.data.Dataset
    index: torch.Tensor   # int64 (N,): which of the dataset's items
    labels: torch.Tensor  # int64 (N,) or float32 (N, L), as core.check_label_tensor says

    def __post_init__(self) -> None:
        check_label_tensor(self.labels, len(self.index), "items")

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, index: torch.Tensor) -> "TorchSplit":
        return TorchSplit(self.dataset, self.index[index].clone(), self.labels[index].clone())


def as_image(img, where: str) -> torch.Tensor:
    """A uint8 (C, H, W) tensor from what a dataset item holds."""
    if not isinstance(img, torch.Tensor):
        try:
            img = TF.pil_to_tensor(img)
        except TypeError:
            raise ArgumentError(f"{where}: the image must be a uint8 tensor (C, H, W) or a PIL image, got "
                                f"{type(img).__name__}") from None
    if img.dtype != torch.uint8 or img.dim() != 3:
        raise ArgumentError(f"{where}: the image must be a uint8 tensor (C, H, W) (end the transforms with "
                            f"v2.ToImage(), without Normalize: densekit normalizes), got {img.dtype} of shape "
                            f"{tuple(img.shape)}")
    return img


def as_target(target, where: str) -> int | torch.Tensor:
    if isinstance(target, torch.Tensor) and target.dim() == 1 and target.is_floating_point():
        return target.float()
    try:
        return int(target)
    except (TypeError, ValueError):
        raise ArgumentError(f"{where}: the target must be a class index or a float vector of labels, got "
                            f"{type(target).__name__}") from None


def read_targets(dataset: torch.utils.data.Dataset, workers: int) -> torch.Tensor:
    """Every item's target: the dataset's ``targets`` (torchvision's datasets have them), or
    one pass over its items."""
    n = len(dataset)
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == n:
        values = [as_target(t, f"item {i}") for i, t in enumerate(targets)]
    else:
        loader = torch.utils.data.DataLoader(range(n), batch_size=64, num_workers=workers,
                                             collate_fn=lambda ids: [as_target(dataset[i][1], f"item {i}")
                                                                     for i in ids])
        values = [t for batch in loader for t in batch]
    if values and isinstance(values[0], torch.Tensor):
        return torch.stack(values)
    return torch.tensor(values, dtype=torch.int64)


class UserItems(torch.utils.data.Dataset):
    """Item ``(i, seed)`` of a :class:`TorchSplit`, read with the torch generator seeded by
    ``seed``: (uint8 image, target, ""), as ``streaming.ImageFiles`` gives a file's."""

    def __init__(self, split: TorchSplit, in_chans: int, size: int) -> None:
        self.split, self.in_chans, self.size = split, in_chans, size

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]):
        i, seed = key
        j = int(self.split.index[i])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            img, target = self.split.dataset[j]
        img = as_image(img, f"item {j}")
        if img.shape != (self.in_chans, self.size, self.size):
            raise ArgumentError(f"item {j}: the image is {tuple(img.shape)}, the split's first "
                                f"{(self.in_chans, self.size, self.size)}; resize every image to one size")
        return img, as_target(target, f"item {j}"), ""
