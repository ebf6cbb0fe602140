"""Fine-tuning: a run that starts from pretrained weights (``--pretrained``), and the switches
that keep part of the model still (``--freeze-backbone``, ``--head-epochs``) or slower
(``--backbone-lr-scale``).

The "head" is the classifier (``model.get_classifier()``), the "backbone" everything before
it. Freezing the backbone turns off its gradients and puts its batch norms in eval mode, so
that their running statistics stay the pretrained ones: a linear probe of the pretrained
features, as in the transfer experiments of Kornblith et al. 2019 ("Do Better ImageNet
Models Transfer Better?"). The optimizer always holds every parameter; a frozen one gets no
gradient, which SGD and AdamW skip, so a run that unfreezes after ``head_epochs`` keeps one
optimizer and one resume state throughout.

Preprocessing follows the weights: images are normalized with the mean and std the weights
were trained with (ImageNet's for torchvision and timm files), which ``model.json`` keeps for
``predict`` and ``export``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch
from torch import nn

from .. import distributed
from ..checks import ArgumentError, text
from ..data import Dataset
from ..models import DenseNet
from ..models import pretrained as weights_io
from ..rundir import RunDir

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def read_weights(source: str) -> weights_io.Weights:
    """The weights a run starts from, read once per process (the config, the data and the
    model each need something of them)."""
    return weights_io.read_weights(source)


def pretrained_defaults(source: str, frozen: bool = False) -> dict:
    """What a run started from ``source`` takes from it unless told otherwise: the model the
    weights fit, the fine-tuning recipe (a linear probe's for a ``frozen`` backbone) and the
    image size the weights were trained at."""
    w = read_weights(source)
    return dict(model=w.model, model_args=_source_args(w), recipe="probe" if frozen else "finetune",
                image_size=int(w.preprocessing["image_size"][0]))


def _source_args(w: weights_io.Weights) -> dict:
    """The model arguments a run directory was trained with (none for a weights file)."""
    return RunDir(w.source).read_info().model_args if w.kind == "densekit" else {}


def adapt_stats(values: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    """A per-channel mean or std for ``in_chans`` channels: RGB's averaged for gray images (the
    stem's weights are summed over RGB, which assumes one normalization for the three), a gray
    value repeated for RGB."""
    if len(values) == in_chans:
        return tuple(values)
    if in_chans == 1:
        return (sum(values) / len(values),)
    return tuple(values) * in_chans if len(values) == 1 else tuple(values)


def with_pretrained_stats(data: Dataset, cfg: dict, run: RunDir, resumed: bool) -> Dataset:
    """``data`` normalized as the weights expect: their mean and std (a resumed run's from its
    own model.json, so that the weights file may be gone by now)."""
    if cfg["pretrained"] is None:
        return data
    if resumed and run.has_model():
        pre = run.read_info().preprocessing
        mean, std = pre.mean, pre.std
    else:
        pre = read_weights(cfg["pretrained"]).preprocessing
        mean, std = adapt_stats(tuple(pre["mean"]), data.in_chans), adapt_stats(tuple(pre["std"]), data.in_chans)
    log.info("normalizing with the pretrained weights' mean %s and std %s", _short(mean), _short(std))
    return dataclasses.replace(data, mean=tuple(mean), std=tuple(std))


def _short(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def pretrained_model(cfg: dict, data: Dataset) -> tuple[DenseNet, dict, dict]:
    """The model to fine-tune, its DenseNet arguments, and what was loaded (for the summary)."""
    w = read_weights(cfg["pretrained"])
    # another model than the weights' own: it must fit them as given
    chosen = cfg["model"] if (cfg["model"], cfg["model_args"]) != (w.model, _source_args(w)) else None
    model, kwargs, report = weights_io.build_pretrained(w, data.num_classes, data.in_chans, data.classes,
                                                        model=chosen, model_args=cfg["model_args"] or None)
    log.info("pretrained %s (%s): %s", text(cfg["pretrained"]), w.kind, report.summary())
    h, w_ = data.image_size
    if model.min_input_size > min(h, w_):
        raise ArgumentError(f"{{pretrained}}: its model needs images of at least {model.min_input_size} px, the "
                            f"images are {h}x{w_}; give a larger {{image_size}}")
    read_weights.cache_clear()  # the model holds the weights now
    return model, kwargs, dict(source=cfg["pretrained"], kind=w.kind, loaded=report.loaded, new=report.new,
                               adapted=report.adapted)


class Freezer:
    """Turns the backbone's training off and on. ``frozen(epoch)`` says whether it is off in
    that epoch (0-based); ``apply(frozen)`` makes it so, re-wrapping the model for
    data-parallel training when that changes which parameters take gradients (DDP reduces
    only those that did when it was built)."""

    def __init__(self, model: DenseNet, cfg: dict) -> None:
        self.model = model
        self.always, self.head_epochs = bool(cfg["freeze_backbone"]), int(cfg["head_epochs"])
        head = {id(p) for p in model.get_classifier().parameters()}
        self.backbone = [p for p in model.parameters() if id(p) not in head]
        self.state = False

    @property
    def used(self) -> bool:
        return self.always or self.head_epochs > 0

    def frozen(self, epoch: int) -> bool:
        return self.always or epoch < self.head_epochs

    def apply(self, frozen: bool, wrapped: nn.Module, device: torch.device) -> nn.Module:
        """The model as the training step should call it, frozen or not."""
        if frozen == self.state:
            return wrapped
        for p in self.backbone:
            p.requires_grad_(not frozen)
        self.state = frozen
        log.info("backbone %s", "frozen: training the classifier alone" if frozen else "unfrozen: training all")
        return distributed.wrap(self.model, device) if distributed.current().active else wrapped

    def eval_modules(self) -> nn.Module | None:
        """What stays in eval mode while training (the frozen backbone's batch norms)."""
        return self.model.features if self.state else None
