"""Image collections too large to hold decoded: listed up front, then decoded and augmented in
DataLoader worker processes, batch by batch, so that memory does not grow with the dataset.

Training images go through ``RandomResizedCrop`` to the image size (aspect ratio kept within
its 3/4 to 4/3 range, nothing squashed) and a horizontal flip; evaluation images are resized
so that their short side is ``size / crop_pct`` (0.875: 256 for 224) and center-cropped, as
torchvision's and timm's ImageNet recipes do (torchvision.transforms.v2). Workers hand back
uint8 tensors, a quarter of float32's bytes; the main process normalizes each batch on the
device (``loader.Normalize``).

Every random choice is a function of (seed, epoch) and the sample's place in the epoch, never
of which worker decodes it or when: the epoch's order and one seed per sample are drawn up
front from a generator seeded by (seed, epoch), and each worker seeds the transforms with
the sample's own seed before applying them. A run resumed in the middle of an epoch, or run
with another number of workers or processes, therefore sees exactly the same batches.

A file that cannot be decoded is reported by the worker, not raised there (an exception in
a worker reaches the main process wrapped in its traceback): the main process then raises
a one-line DataError naming the file, or, with ``skip_bad_images``, warns once per file and
either drops the image from its evaluation batch or, in training, puts the next file that
decodes in its place, so that every training batch keeps its size (an epoch keeps its
number of steps, and data-parallel ranks all take every step).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence

import torch
import torch.utils.data
from torchvision.transforms import v2

from .. import checks
from ..checks import text
from .core import DataArgumentError, DataError, FileSplit
from .images import decode_file, to_channels
from .loader import Normalize, epoch_seed

log = logging.getLogger(__name__)

CROP_PCT = 0.875  # evaluation: the short side resized to size / 0.875, then the center size x size
SUBSTITUTES = 8   # training with skip_bad_images: the next files tried in place of one that does not decode


def default_workers(processes: int = 1) -> int:
    """Decoding workers for each of ``processes`` training processes on this machine: the
    cores this process may use shared between them, at most 8 each (more decode faster than
    a model trains on a CPU and only take its cores), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # platforms without affinity
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // max(1, processes)))


class ImageFiles(torch.utils.data.Dataset):
    """Item ``(i, seed)``: file i decoded to ``in_chans`` channels and transformed to
    ``size`` x ``size`` (training: random resized crop of ``crop_scale`` of the area, and a
    flip with ``hflip``, seeded by ``seed``; evaluation, and training with ``crop_scale`` None:
    resize and center crop), as (uint8 image, label, error message or "").

    ``substitute``: a file that does not decode is replaced by the next one that does (its
    image and label), with the error as a warning in the message ("replaced: ..."), so that a
    training batch keeps its size and every data-parallel rank takes every step."""

    def __init__(self, split: FileSplit, in_chans: int, size: int, train: bool, crop_pct: float = CROP_PCT,
                 crop_scale: tuple[float, float] | None = (0.08, 1.0), substitute: bool = False,
                 hflip: bool = True) -> None:
        self.split, self.in_chans, self.size, self.train = split, in_chans, size, train
        self.substitute = substitute
        steps = [v2.RandomResizedCrop(size, scale=crop_scale, antialias=True)] if train and crop_scale else [
            v2.Resize(int(size / crop_pct), antialias=True), v2.CenterCrop(size)]
        self.transform = v2.Compose(steps + ([v2.RandomHorizontalFlip()] if train and hflip else []))

    def __len__(self) -> int:
        return len(self.split)

    def _label(self, i: int) -> int | torch.Tensor:
        return self.split.labels[i] if self.split.labels.dim() == 2 else int(self.split.labels[i])

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int | torch.Tensor, str]:
        i, seed = key
        note = ""
        for attempt in range(SUBSTITUTES + 1 if self.substitute else 1):
            j = (i + attempt) % len(self.split)
            try:
                img = to_channels(decode_file(self.split.paths[j]), self.in_chans)
                break
            except DataError as e:
                note = note or str(e)
        else:
            return torch.zeros(self.in_chans, self.size, self.size, dtype=torch.uint8), self._label(i), note
        if self.train:
            # the sample's own draws, whichever worker takes it; the caller's generator untouched
            # (with workers=0 this runs in the training process, whose dropout draws from it)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                img = self.transform(img)
        else:
            img = self.transform(img)
        return img, self._label(j), f"replaced: {note}" if note else ""


def _collate(samples):
    images, labels, errors = zip(*samples)
    labels = torch.stack(labels) if isinstance(labels[0], torch.Tensor) else torch.tensor(labels, dtype=torch.int64)
    return torch.stack(images), labels, list(errors)


class StreamingLoader:
    """Batches of a :class:`FileSplit` (or of a user's dataset, ``torchdata.TorchSplit``),
    decoded in ``workers`` processes; the interface of
    ``DeviceLoader`` (``len``, ``epoch(epoch, start_step)``, ``shard``), so that training and
    evaluation take either.

    ``shard=(rank, world_size)`` yields this rank's contiguous share of each global batch:
    every rank draws the same epoch and decodes only its share."""

    def __init__(self, split: FileSplit, batch_size: int, *, in_chans: int, size: int, mean: Sequence[float],
                 std: Sequence[float], device: str | torch.device = "cpu", train: bool = False, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, channels_last: bool = False, shard=None,
                 workers: int | None = None, skip_bad_images: bool = False, crop_pct: float = CROP_PCT,
                 crop_scale: tuple[float, float] | None = (0.08, 1.0), hflip: bool = True) -> None:
        self.batch_size = checks.positive_int("batch_size", batch_size)
        if isinstance(split, FileSplit):
            # training replaces a file that does not decode (a batch keeps its size); evaluation drops it
            self.files = ImageFiles(split, in_chans, size, train, crop_pct, crop_scale,
                                    substitute=train and skip_bad_images, hflip=hflip)
        else:  # a user's own dataset (torchdata.TorchSplit): its transforms are its own
            from .torchdata import UserItems

            self.files = UserItems(split, in_chans, size)
        self.device = torch.device(device)
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.shard = None if shard is None or shard[1] == 1 else shard
        self.workers = (default_workers(1 if self.shard is None else self.shard[1]) if workers is None
                        else checks.non_negative_int("workers", workers))
        self.skip_bad_images = skip_bad_images
        self.normalize = Normalize(mean, std, self.device, channels_last=channels_last)
        self._reported: set[str] = set()

    def __len__(self) -> int:
        n = len(self.files)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    def _keys(self, epoch: int, start_step: int) -> list[list[tuple[int, int]]]:
        """Every batch of the epoch from ``start_step`` on, as this rank's (index, seed) pairs."""
        n = len(self.files)
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        seeds = torch.randint(0, 2 ** 62, (n,), generator=g)
        batches = []
        for step in range(start_step, len(self)):
            lo, hi = step * self.batch_size, min((step + 1) * self.batch_size, n)
            if self.shard is not None:
                rank, world = self.shard
                lo, hi = lo + (hi - lo) * rank // world, lo + (hi - lo) * (rank + 1) // world
            if hi > lo:  # a rank's share of a short last batch may be empty: that rank has one batch less
                batches.append([(int(order[j]), int(seeds[j])) for j in range(lo, hi)])
        return batches

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        checks.non_negative_int("epoch", epoch)
        if checks.non_negative_int("start_step", start_step) > len(self):
            raise checks.ArgumentError(f"{{start_step}} must be at most the {len(self)} batches of an epoch, "
                                       f"got {start_step}")
        return self._batches(self._keys(epoch, start_step))

    def _batches(self, keys: list[list[tuple[int, int]]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not keys:
            return
        # its own generator: the workers' base seed is then not drawn from the global one, whose
        # state (dropout's) would otherwise depend on how many epochs and resumes came before
        loader = torch.utils.data.DataLoader(
            self.files, batch_sampler=keys, num_workers=self.workers, collate_fn=_collate,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if self.workers else None,
            persistent_workers=False, generator=torch.Generator().manual_seed(0))
        for images, labels, errors in loader:
            for e in errors:
                if e.startswith("replaced: ") and e not in self._reported:
                    self._reported.add(e)
                    log.warning("skipping %s; the next file that decodes takes its place", e[len("replaced: "):])
            bad = [i for i, e in enumerate(errors) if e and not e.startswith("replaced: ")]
            if bad:
                images, labels = self._drop_bad(images, labels, errors, bad)
                if len(labels) == 0:
                    continue
            x = self.normalize(images.to(self.device, non_blocking=True))
            yield x, labels.to(self.device, non_blocking=True)

    def _drop_bad(self, images, labels, errors, bad):
        if not self.skip_bad_images:
            raise DataArgumentError(f"{text(errors[bad[0]])} (give {{skip_bad_images}} to skip such files with a "
                                    "warning)")
        for i in bad:
            if errors[i] not in self._reported:
                self._reported.add(errors[i])
                log.warning("skipping %s", errors[i])
        keep = torch.tensor([i for i in range(len(errors)) if i not in set(bad)], dtype=torch.int64)
        return images[keep], labels[keep]
