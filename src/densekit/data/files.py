"""A collection of image files with their labels, however they were listed (a folder per class,
a CSV file): the files that are not images found up front, the validation split, and the
choice between decoding the collection into memory and streaming it.

Every file's header is read first, for its colour mode, which finds files that are not images
before any training. Then:

- a small collection (``SMALL_IMAGES`` images at most, ``SMALL_BYTES`` at most once decoded at
  the image size) is decoded once, in DataLoader workers, each image's short side resized to
  the image size and its center cropped (aspect ratio kept, nothing squashed), and held in
  memory: the device-resident loader then serves it, as it serves Fashion-MNIST;
- a larger one stays on disk as a :class:`FileSplit`, decoded and augmented batch by batch
  in worker processes (``streaming``), so that memory does not grow with the dataset; its
  mean and std come from a sample of ``STATS_SAMPLE`` training images.

The choice is said in the log. A collection is grayscale when every file is (by its header
when streaming; by its pixels when decoded), else RGB.
"""

from __future__ import annotations

import logging

import torch
import torch.utils.data

from .. import checks
from .core import DataArgumentError, DataError, FileSplit, Split, channel_stats, stratified_split
from .images import header
from .streaming import CROP_PCT, ImageFiles, default_workers

log = logging.getLogger(__name__)

# Held in memory up to 256 MiB decoded (Fashion-MNIST as 70,000 PNGs: 55 MB) and 100,000 images,
# which a start decodes in about half a minute at 28 px on 2 cores; beyond either, streamed.
SMALL_IMAGES = 100_000
SMALL_BYTES = 256 << 20
STATS_SAMPLE = 500  # training images whose pixels give a streamed collection's mean and std
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def _read_headers(split: FileSplit, skip_bad_images: bool) -> tuple[FileSplit, bool]:
    """The split without the files that are not images (skipped with a warning, or refused),
    and whether every file is grayscale by its header."""
    keep, gray = [], True
    for i, path in enumerate(split.paths):
        try:
            mode = header(path)[1]
        except DataError as e:
            if not skip_bad_images:
                raise DataArgumentError(f"{checks.text(e)} (give {{skip_bad_images}} to skip such files "
                                        "with a warning)") from None
            log.warning("skipping %s", e)
            continue
        keep.append(i)
        gray = gray and mode in _GRAY_MODES
    if len(keep) < len(split):
        split = split.subset(torch.tensor(keep, dtype=torch.int64))
    return split, gray


def _as_list(samples: list) -> list:
    return samples


def _decode_all(split: FileSplit, size: int, workers: int, skip_bad_images: bool) -> Split:
    """Every image of ``split`` as uint8 RGB (N, 3, size, size), in ``workers`` processes: short
    side to ``size``, center crop. A file that does not decode is refused, or skipped."""
    files = ImageFiles(split, 3, size, train=False, crop_pct=1.0)
    out = torch.empty((len(split), 3, size, size), dtype=torch.uint8)
    keep = []
    loader = torch.utils.data.DataLoader(files, batch_size=64, num_workers=workers, collate_fn=_as_list,
                                         sampler=[(i, 0) for i in range(len(split))])
    for batch in loader:
        for img, _, error in batch:
            if error and not skip_bad_images:
                raise DataArgumentError(f"{checks.text(error)} (give {{skip_bad_images}} to skip such files "
                                        "with a warning)")
            if error:
                log.warning("skipping %s", error)
            else:
                out[len(keep)] = img
            keep.append(not error)
    kept = torch.tensor(keep, dtype=torch.bool)
    return Split(out[:int(kept.sum())], split.labels[kept].clone())


def load_files(what: str, splits: dict[str, FileSplit], classes: list[str], image_size: int,
               val_fraction: float = 0.1, seed: int = 0, train_limit: int | None = None,
               workers: int | None = None, skip_bad_images: bool = False,
               val_named: str | None = None, stream: bool | None = None) -> dict:
    """The splits of a collection (``splits``: "train", and "val" and "test" where it has
    them) and what describes them, for ``datasets.load_dataset``: train, val, test (None if
    absent), classes, in_chans, mean, std, val_source, crop_pct. ``what`` names the
    collection in the log; ``val_named`` says where a given "val" split comes from. ``stream``
    forces the choice (True: streamed, False: in memory), as evaluating a run must make the
    one its training made, whatever the collection's size now."""
    checks.positive_int("image_size", image_size)
    workers = default_workers() if workers is None else workers
    gray = True
    for name in list(splits):
        splits[name], is_gray = _read_headers(splits[name], skip_bad_images)
        gray = gray and is_gray
    train = splits["train"]
    if not len(train):
        raise DataArgumentError(f"{what}: none of the training images could be read (see the warnings); "
                                "check the files, or drop {skip_bad_images} to stop at the first")
    if "val" in splits:
        val, val_source = splits["val"], val_named or "the given validation split"
    else:
        kept, held = stratified_split(train.labels, val_fraction, seed)
        train, val = train.subset(kept), train.subset(held)
        by = "by their rarest label" if train.labels.dim() == 2 else "by class"
        val_source = f"{100 * val_fraction:g}% of the training images, stratified {by}, seed {seed}"
    if train_limit is not None and train_limit < len(train):
        train = train.subset(torch.arange(train_limit))
    test = splits.get("test")
    count = len(train) + len(val) + (len(test) if test is not None else 0)
    small = count <= SMALL_IMAGES and count * 3 * image_size ** 2 <= SMALL_BYTES if stream is None else not stream
    labels = f"{len(classes)} {'labels' if train.labels.dim() == 2 else 'classes'}"
    sizes = f"{len(train)} train, {len(val)} val, {0 if test is None else len(test)} test images"
    if small:
        out = {name: _decode_all(split, image_size, workers, skip_bad_images) for name, split in
               (("train", train), ("val", val), ("test", test)) if split is not None}
        colour = any(bool((s.images[:, 0] != s.images[:, 1]).any() or (s.images[:, 1] != s.images[:, 2]).any())
                     for s in out.values())
        if not colour:  # a gray image decoded as RGB has three equal planes: one of them is exact
            out = {k: Split(s.images[:, :1].clone(), s.labels) for k, s in out.items()}
        if not len(out["train"]):
            raise DataArgumentError(f"{what}: none of the training images decodes (see the warnings); check the "
                                    "files, or drop {skip_bad_images} to stop at the first")
        mean, std = channel_stats(out["train"].images)
        log.info("%s: %s, %s, %s %dx%d, decoded into memory", what, labels, sizes,
                 "RGB" if colour else "grayscale", image_size, image_size)
        return dict(train=out["train"], val=out["val"], test=out.get("test"), classes=classes,
                    in_chans=3 if colour else 1, mean=mean, std=std, val_source=val_source, crop_pct=1.0)
    in_chans = 1 if gray else 3
    sample = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:STATS_SAMPLE])
    # a file that does not decode stops the run here, before training, unless such files are skipped
    images = _decode_all(sample, image_size, workers, skip_bad_images).images
    if not len(images):
        raise DataArgumentError(f"{what}: none of {len(sample)} training images decodes (see the warnings); "
                                "check the files")
    mean, std = channel_stats(images[:, :1] if gray else images)
    log.info("%s: %s, %s, %s; streamed from disk at %d px (%d decoding workers); mean and std of %d training "
             "images", what, labels, sizes, "grayscale" if gray else "RGB", image_size, workers, len(sample))
    return dict(train=train, val=val, test=test, classes=classes, in_chans=in_chans, mean=mean, std=std,
                val_source=val_source, crop_pct=CROP_PCT)
