"""A whole split held on one device, served as normalized float batches.

Data loading is the bottleneck for small images on a fast card, so (as in the CIFAR-10
speed runs) the uint8 images stay on the device and each batch is gathered, augmented
and normalized there with a few tensor ops: no workers, no per-image Python.

Every random choice of an epoch (order, crop offsets, flips) is drawn up front from a
CPU generator seeded with (seed, epoch) alone. A run resumed at (epoch, step) therefore
sees exactly the batches an uninterrupted run would, on any device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from .. import checks

from .core import Split


@dataclasses.dataclass
class Augment:
    crop_padding: int = 0  # random crop of the original size from the zero-padded image (CIFAR recipe: 4)
    hflip: bool = False  # random horizontal flip with p=0.5
    # Cutout (DeVries & Taylor 2017, arXiv:1708.04552): a square of this side, centred on a
    # uniformly drawn pixel and clipped at the border, set to the dataset mean (0 after
    # normalization) in every image; 0: off
    erase: int = 0
    # streamed image files: the range of the area a random resized crop takes (torchvision's
    # default); None: no random crop, the evaluation's resize and center crop
    crop_scale: tuple[float, float] | None = (0.08, 1.0)

    def __post_init__(self) -> None:
        for name in ("crop_padding", "erase"):
            checks.non_negative_int(name, getattr(self, name))

    @property
    def active(self) -> bool:
        """Whether in-memory batches change (streamed ones also follow ``crop_scale``)."""
        return self.crop_padding > 0 or self.hflip or self.erase > 0


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed for one epoch; depends only on (seed, epoch)."""
    return (seed * 1_000_003 + epoch) % (1 << 64)


def erase_squares(x: torch.Tensor, side: int, centers: torch.Tensor) -> torch.Tensor:
    """Zero a ``side`` x ``side`` square around ``centers`` (B, 2) (row, col) in each image
    of ``x`` (B, C, H, W), clipped at the border; one masked fill for the whole batch, in
    place (an out-of-place fill would return NCHW whatever x's memory format)."""
    h, w = x.shape[-2:]
    lo = centers - side // 2
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= lo[:, :1]) & (rows < lo[:, :1] + side)   # (B, H)
    in_cols = (cols >= lo[:, 1:]) & (cols < lo[:, 1:] + side)   # (B, W)
    return x.masked_fill_((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0)


def crop_flip(
    x: torch.Tensor, padding: int, offsets: torch.Tensor | None, flips: torch.Tensor | None
) -> torch.Tensor:
    """Random-crop and flip a batch (B, C, H, W) with one gather, given the draws.

    ``offsets`` (B, 2) holds each sample's (dy, dx) in [0, 2 * padding], the top-left
    corner of its H x W window in the zero-padded image; ``flips`` (B,) says which
    samples are mirrored left-right after cropping. Either may be None (no crop, no flip).
    Output pixel (i, j) of sample b reads the padded image at (dy + i, dx + j), or at
    (dy + i, dx + W-1-j) when b is flipped.
    """
    b, c, h, w = x.shape
    rows = torch.arange(h, device=x.device).expand(b, h)
    cols = torch.arange(w, device=x.device).expand(b, w)
    if flips is not None:
        cols = torch.where(flips[:, None], (w - 1) - cols, cols)
    if offsets is not None and padding > 0:
        # zeros before normalization, i.e. black, as in the paper's recipe
        x = F.pad(x, (padding, padding, padding, padding))
        rows = rows + offsets[:, :1]
        cols = cols + offsets[:, 1:]
    return x[
        torch.arange(b, device=x.device)[:, None, None, None],
        torch.arange(c, device=x.device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


class Normalize:
    """uint8 batches (B, C, H, W) to normalized floats on ``device``: ``(x / 255 - mean) / std``
    per channel, folded into one multiply-add so that each batch costs a single float pass;
    computed in float32 (float64 for float64) and cast once at the end."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: str | torch.device = "cpu", *,
                 channels_last: bool = False, dtype: torch.dtype = torch.float32) -> None:
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have one value per channel, got mean={mean}, std={std}")
        if not all(s > 0 for s in std):
            raise ValueError(f"std must be > 0 for every channel, got {std}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
        self.channels, self.channels_last, self.dtype = len(mean), channels_last, dtype
        self._compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        mean_t = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        self._scale = (1.0 / (255.0 * std_t)).to(device, self._compute_dtype)
        self._shift = (-mean_t / std_t).to(device, self._compute_dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            # on the uint8 batch, where the copy is a quarter the size; the float ops
            # below keep the memory format
            x = x.contiguous(memory_format=torch.channels_last)
        out = x.to(self._compute_dtype) * self._scale + self._shift
        return out.to(self.dtype)


class DeviceLoader:
    """Holds a whole Split on one device as uint8 and yields normalized float batches;
    augmentation is done per batch on tensors (no per-image Python).

    ``shard=(rank, world_size)`` (data-parallel training) yields only this rank's share of
    each batch; ``batch_size`` stays the global batch and ``len`` the global step count.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        device: str | torch.device = "cpu",
        shuffle: bool = False,
        augment: Augment | None = None,
        drop_last: bool = False,
        seed: int = 0,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
        shard: tuple[int, int] | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        checks.positive_int("batch_size", batch_size)
        chans = split.images.shape[1]
        if len(tuple(mean)) != chans or len(tuple(std)) != chans:
            raise ValueError(f"mean and std must have one value per channel ({chans}), got mean={tuple(mean)}, "
                             f"std={tuple(std)}")
        if shard is not None:
            rank, world = shard
            if not (isinstance(rank, int) and isinstance(world, int) and world >= 1 and 0 <= rank < world):
                raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard!r}")
            shard = None if world == 1 else (rank, world)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.augment = augment if augment is not None and augment.active else None
        self.drop_last = drop_last
        self.seed = seed
        self.channels_last = channels_last
        self.dtype = dtype
        self.shard = shard
        self.images = split.images.to(self.device).contiguous()
        self.labels = split.labels.to(self.device)
        self._normalize = Normalize(mean, std, self.device, channels_last=channels_last, dtype=dtype)
        # the batches' size, where it is not the images' own: each batch is resized after its
        # augmentation (bilinear, antialiased), so the held images stay as small as they are
        self.size = None if size is None or tuple(size) == tuple(self.images.shape[-2:]) else tuple(size)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch``, from batch ``start_step`` on.

        Skipped batches cost nothing: their random draws are made with the rest of the
        epoch's, and their images are never gathered.
        """
        checks.non_negative_int("epoch", epoch)
        if checks.non_negative_int("start_step", start_step) > len(self):
            raise checks.ArgumentError(f"{{start_step}} must be at most the {len(self)} batches of an epoch, "
                                       f"got {start_step}")
        return self._batches(epoch, start_step)

    def _draws(self, epoch: int) -> tuple[torch.Tensor | None, ...]:
        n = len(self.labels)
        g = torch.Generator(device="cpu")
        g.manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(n, generator=g) if self.shuffle else None
        offsets = flips = centers = None
        if self.augment is not None:
            if self.augment.crop_padding > 0:
                offsets = torch.randint(0, 2 * self.augment.crop_padding + 1, (n, 2), generator=g)
            if self.augment.hflip:
                flips = torch.rand(n, generator=g) < 0.5
            if self.augment.erase:  # drawn last: runs without it see the same draws as before
                # in the batch's frame: the squares are erased after any resize to ``size``
                size = torch.tensor(self.size if self.size is not None else self.images.shape[-2:])
                centers = (torch.rand(n, 2, generator=g) * size).long()
        return tuple(t if t is None else t.to(self.device) for t in (order, offsets, flips, centers))

    def _batches(self, epoch: int, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, offsets, flips, centers = self._draws(epoch)
        n = len(self.labels)
        for step in range(start_step, len(self)):
            lo, hi = self._bounds(step * self.batch_size, min((step + 1) * self.batch_size, n))
            if order is None:
                x, y = self.images[lo:hi], self.labels[lo:hi]
            else:
                idx = order[lo:hi]
                x, y = self.images[idx], self.labels[idx]
            if self.augment is not None:
                x = crop_flip(
                    x,
                    self.augment.crop_padding,
                    None if offsets is None else offsets[lo:hi],
                    None if flips is None else flips[lo:hi],
                )
            x = self._normalize(x)
            if self.size is not None:
                x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
            if centers is not None:
                x = erase_squares(x, self.augment.erase, centers[lo:hi])
            yield x, y

    def _bounds(self, lo: int, hi: int) -> tuple[int, int]:
        """This process's part of the global batch [lo, hi): its rank's contiguous share.

        Every rank draws the same epoch (order and augmentation), so the shares of all ranks
        together are exactly the batch one process would see."""
        if self.shard is None:
            return lo, hi
        rank, world = self.shard
        size = hi - lo
        return lo + size * rank // world, lo + size * (rank + 1) // world

