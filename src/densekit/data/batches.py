"""The loader of a split, whichever kind it is: held in memory (``DeviceLoader``) or streamed
from files (``StreamingLoader``); both yield normalized float batches on the device and take
``epoch(epoch, start_step)``, so training and evaluation never ask which."""

from __future__ import annotations

import torch

from .core import Dataset, FileSplit, Split
from .loader import Augment, DeviceLoader
from .streaming import StreamingLoader


def loader_for(data: Dataset, split: Split | FileSplit, batch_size: int, *, train: bool,
               device: torch.device, seed: int = 0, channels_last: bool = False, shard=None,
               augment: Augment | None = None, workers: int | None = None, skip_bad_images: bool = False):
    """Training (``train``: shuffled, augmented, the last partial batch dropped) or evaluation
    (fixed order, every image) batches of ``split`` at ``data.image_size``. ``augment`` is the
    in-memory recipe's (crops of a padded image, flips); streamed images get random resized
    crops of ``augment.crop_scale`` of their area (none when it is None) and the same flips
    (``streaming``)."""
    if not isinstance(split, Split):  # image files, or a user's dataset: read in worker processes
        return StreamingLoader(split, batch_size, in_chans=data.in_chans, size=data.image_size[0], mean=data.mean,
                               std=data.std, device=device, train=train, shuffle=train, drop_last=train, seed=seed,
                               channels_last=channels_last, shard=shard, workers=workers,
                               skip_bad_images=skip_bad_images, crop_pct=data.crop_pct or 1.0,
                               crop_scale=augment.crop_scale if augment is not None else (0.08, 1.0),
                               hflip=augment.hflip if augment is not None else True)
    return DeviceLoader(split, batch_size, mean=data.mean, std=data.std, device=device, shuffle=train,
                        augment=augment if train else None, drop_last=train, seed=seed, channels_last=channels_last,
                        shard=shard, size=data.image_size)
