"""``densekit.fit``: train (or fine-tune) a densekit model on a user's own datasets from Python,
with the run directory, checkpoints, resume, validation protocol and summary of
``densekit train``.

    model = densekit.create_model("densenet121", num_classes=14)
    model.load_state_dict(...)                       # or densekit.models.pretrained.build_pretrained
    summary = densekit.fit(model, train_set, val_set, test_set, out="runs/xray", multi_label=True,
                           recipe="finetune", epochs=5, batch_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD)

The datasets' items are (uint8 image tensor or PIL image, target): ``data.torchdata`` says
what they may hold and how their random transforms are seeded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.utils.data

from ..checks import ArgumentError
from ..data import Dataset
from ..data.core import channel_stats, stratified_split
from ..data.streaming import default_workers
from ..data.torchdata import TorchSplit, UserItems, as_image, read_targets
from ..models import DenseNet
from .config import TrainConfig
from .trainer import Event, TrainSummary, train

STATS_SAMPLE = 500  # training items whose pixels give the mean and std when none are given


def _dataset(data) -> torch.utils.data.Dataset:
    """A dataset, or a DataLoader's: densekit draws its own batches (seeded, resumable)."""
    if isinstance(data, torch.utils.data.DataLoader):
        return data.dataset
    return data


def _split(dataset, workers: int) -> TorchSplit:
    return TorchSplit(dataset, torch.arange(len(dataset)), read_targets(dataset, workers))


def _stats(split: TorchSplit, in_chans: int, size: int, seed: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pick = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:STATS_SAMPLE]
    items = UserItems(split.subset(pick), in_chans, size)
    return channel_stats(torch.stack([items[(i, seed)][0] for i in range(len(items))]))


def fit(model: DenseNet, train_data: torch.utils.data.Dataset, val_data: torch.utils.data.Dataset | None = None,
        test_data: torch.utils.data.Dataset | None = None, *, out: str | os.PathLike,
        classes: Sequence[str] | None = None, mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None, val_fraction: float = 0.1, resume: bool = False,
        on_event: Callable[[Event], None] | None = None, **options) -> TrainSummary:
    """Train ``model`` in place on ``train_data`` into the run directory ``out``; returns the
    summary (also in ``out/summary.json``). The data are map-style datasets (a DataLoader
    stands for its dataset: densekit draws the batches, seeded so that a run can resume).

    ``val_data`` is scored every epoch and picks the kept weights (default: a seeded
    ``val_fraction`` of ``train_data``, stratified by class); ``test_data`` is scored once,
    at the end. ``classes`` names the classes or labels (default: ``train_data.classes``, as
    torchvision's datasets have). Float vector targets make it a multi-label run (sigmoid
    outputs, per-label AUROC). ``mean`` and ``std`` normalize the images (per channel, [0, 1]
    units; default: those of up to 500 training images; give the pretrained weights' when
    fine-tuning). ``options`` are ``TrainConfig``'s fields: ``recipe``, ``epochs``,
    ``batch_size``, ``lr``, ``seed``, ``keep``, ``patience``, ``freeze_backbone``,
    ``head_epochs``, ``backbone_lr_scale``, ``pos_weight``, ``workers``, ``device``,
    ``deterministic``, ``max_steps``, ... ``resume`` continues the run in ``out``.

    On the CPU under glibc, call ``densekit.malloc.tune_malloc()`` once first, as the
    ``densekit`` command does: it keeps each step's memory for the next instead of faulting it
    in again (docs/design.md, "The allocator"). fit leaves the process's allocator alone.
    """
    bad = sorted(set(options) & {"model", "model_args", "dataset", "data_dir", "init", "pretrained", "image_size",
                                 "out", "resume", "csv", "train_limit"})
    if bad:
        raise ArgumentError(f"fit takes the model and the data as objects: drop {{{bad[0]}}}")
    train_data, val_data, test_data = (None if d is None else _dataset(d) for d in (train_data, val_data, test_data))
    seed = options.get("seed") or 0
    workers = options.get("workers")
    workers = default_workers() if workers is None else workers
    train_split = _split(train_data, workers)
    if not len(train_split):
        raise ArgumentError("{train_data} is empty")
    with torch.random.fork_rng(devices=[]):  # the item's random transforms leave the caller's generator alone
        first = as_image(train_data[0][0], "item 0")
    in_chans, size = first.shape[0], first.shape[-1]
    if first.shape[-2] != size:
        raise ArgumentError(f"item 0: the image is {tuple(first.shape)}; densekit trains on square images: "
                            "crop or resize them to one side")
    if val_data is None:
        kept, held = stratified_split(train_split.labels, val_fraction, seed)
        train_split, val_split = train_split.subset(kept), train_split.subset(held)
        by = "by their rarest label" if train_split.labels.dim() == 2 else "by class"
        source = f"{100 * val_fraction:g}% of the training items, stratified {by}, seed {seed}"
    else:
        val_split, source = _split(val_data, workers), "the validation dataset given"
    test_split = None if test_data is None else _split(test_data, workers)
    names = list(classes) if classes is not None else list(getattr(train_data, "classes", []) or [])
    width = train_split.labels.shape[1] if train_split.labels.dim() == 2 else int(train_split.labels.max()) + 1
    if len(names) < width or (train_split.labels.dim() == 2 and len(names) != width):
        raise ArgumentError(f"{{classes}}: {len(names)} name(s) for {width} classes or labels; give them all")
    if mean is None or std is None:
        mean, std = _stats(train_split, in_chans, size, seed)
    data = Dataset(name="python", train=train_split, val=val_split, test=test_split, classes=[str(c) for c in names],
                   in_chans=in_chans, image_size=(size, size), mean=tuple(mean), std=tuple(std), val_source=source,
                   crop_pct=None)
    config = TrainConfig(dataset="python", image_size=size, out=str(out), resume=resume, val_fraction=val_fraction,
                         **options)
    return train(config, on_event, data=data, model=model)
