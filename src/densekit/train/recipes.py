"""Training recipes: every number of a recipe in one dataclass, with the reason beside it.

``paper`` is the CIFAR recipe of Huang et al. 2017 (section 4.2), as published.
``fast`` is densekit's default: a short run that gets most of the accuracy in a few
epochs. ``finetune`` starts from pretrained weights (``--pretrained``). ``sprint`` and ``long`` are the GPU presets for Fashion-MNIST with the default
model, DenseNet-BC-100 k=12 (0.77M parameters at one input channel): ``sprint`` aims at
>= 95.0% test accuracy within 60 s of training on one H100, ``long`` at more than 95.4%
(the best DenseNet, a 768K DenseNet-BC, in the Fashion-MNIST benchmark table). Both are
designed, not yet measured: no GPU has run them (docs/performance.md). The numbers are
meant to be tuned; change them here and nowhere else.

The learning rate is a pure function of the global optimizer step (``lr_factor``), so a
run resumed mid-epoch follows exactly the schedule an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
from torch import nn

from ..data import Augment

log = logging.getLogger(__name__)

SCHEDULES = ("step", "warmup_cosine")
OPTIMIZERS = ("sgd", "adamw")


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    epochs: int                      # default length of a run; --epochs overrides
    batch_size: int                  # --batch-size overrides
    lr: float                        # peak learning rate; --lr overrides
    momentum: float                  # SGD momentum
    nesterov: bool                   # Nesterov momentum
    weight_decay: float              # L2 coefficient, coupled as in SGD
    decay_norm_and_bias: bool        # False exempts BN weights/biases and biases from weight decay
    label_smoothing: float           # target smoothing in the cross-entropy
    crop_padding: int                # zero padding of the random crop (0: none)
    hflip: bool                      # random horizontal flips (not for datasets in NO_FLIP)
    schedule: str                    # "step" or "warmup_cosine"
    erase: int = 0                       # Cutout: side of the square set to the mean in each image (0: off)
    milestones: tuple[float, ...] = ()   # "step": fractions of the epochs at which lr is divided
    gamma: float = 0.1                   # "step": the divisor's inverse
    warmup_fraction: float = 0.0         # "warmup_cosine": share of the steps spent warming up linearly
    final_lr_fraction: float = 0.0       # "warmup_cosine": lr at the last step, as a fraction of the peak
    optimizer: str = "sgd"               # "sgd" (momentum, nesterov, coupled weight decay) or "adamw" (decoupled)
    crop_scale: tuple[float, float] | None = (0.08, 1.0)  # streamed images: the area range of the random
                                                          # resized crop (None: resize and center crop)
    keep: str = "best"                   # the weights a run keeps unless --keep says: "best" or "last"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.keep not in ("best", "last"):
            raise ValueError(f"keep must be best or last, got {self.keep!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PAPER = Recipe(
    name="paper",
    epochs=300,               # the paper's CIFAR runs (SVHN: 40)
    batch_size=64,            # the paper's batch
    lr=0.1,                   # the paper's initial rate
    momentum=0.9,             # the paper: Nesterov momentum 0.9 without dampening
    nesterov=True,
    weight_decay=1e-4,        # the paper
    decay_norm_and_bias=True,  # the authors' Torch code (fb.resnet.torch) decays every parameter
    label_smoothing=0.0,      # not in the paper
    crop_padding=4,           # the standard CIFAR augmentation the paper uses: pad 4, crop 32
    hflip=True,               # ... and mirror
    schedule="step",
    milestones=(0.5, 0.75),   # the paper: lr / 10 at 50% and 75% of the epochs
    gamma=0.1,
)

FAST = Recipe(
    name="fast",
    epochs=10,                # short: an epoch of Fashion-MNIST takes seconds on a GPU (to tune for `make run`)
    batch_size=128,           # twice the paper's: fuller GPU steps; still small enough for BN noise to regularize
    lr=0.2,                   # the paper's 0.1 scaled linearly with the batch (64 -> 128)
    momentum=0.9,             # the usual SGD value; the paper's
    nesterov=True,            # slightly better than heavy-ball at the same cost
    weight_decay=5e-4,        # as in short CIFAR schedules: more decay keeps BN nets' effective lr up
    decay_norm_and_bias=False,  # decaying BN scales and biases only fights the normalization
    label_smoothing=0.1,      # softer targets: less over-confident logits, a small, consistent gain in short runs
    crop_padding=2,           # 2 of 28 px (7%): Fashion-MNIST items are centred; larger shifts push them off the frame
    hflip=True,               # garments are mirror-symmetric as a class (digits are not: see NO_FLIP)
    schedule="warmup_cosine",
    warmup_fraction=0.1,      # a lr of 0.2 on freshly initialized BN stats can diverge; ramp up over the first 10%
    final_lr_fraction=0.0,    # anneal to zero: the last epochs at a tiny lr settle the weights (and the BN stats)
)

# Sized from torchvision's eager rate on an H100 (BC-100 k=12, 32 px, batch 256, bf16: 4,069 img/s,
# docs/performance.md) and what the CUDA-graph step should add: about 10k img/s at 28 px makes 12 epochs
# of 60k images about 70 s, so sprint is 10. Not measured yet.
SPRINT = Recipe(
    name="sprint",
    epochs=10,                # see above: 600k images in <= 60 s needs >= 10k img/s
    batch_size=256,           # big enough to keep an H100 busy at 28 px, small enough for 2,340 steps
    lr=0.4,                   # fast's 0.2 scaled linearly with the batch (128 -> 256)
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    decay_norm_and_bias=False,
    label_smoothing=0.1,
    crop_padding=2,
    hflip=True,
    schedule="warmup_cosine",
    warmup_fraction=0.05,     # shorter ramp than fast's: every step counts in a 10-epoch run
    final_lr_fraction=0.0,
)

# long is sprint run 4x longer, with smaller batches and Cutout
LONG = dataclasses.replace(
    SPRINT,
    name="long",
    epochs=40,                # 4x sprint; Fashion-MNIST's best results use 100-300 epochs
    batch_size=128,           # smaller batches: more steps and more BN noise, both help at length
    lr=0.2,                   # scaled back with the batch (256 -> 128)
    erase=10,                 # Cutout of 10x10 px (13% of a 28 px image): at 40 epochs the net can afford
                              # the regularization (random erasing took WRN-28-10's Fashion-MNIST error from
                              # 4.01% to 3.65%: Zhong et al. 2017, arXiv:1708.04896)
)

# Fine-tuning pretrained weights on a user's own, usually small, data set: the weights already
# hold good features, and the job is to fit a new head and move the rest a little.
FINETUNE = Recipe(
    name="finetune",
    epochs=10,                # pretrained features converge in a few epochs; --patience can stop sooner
    batch_size=32,            # small data sets give few steps; 32 keeps them many and fits 224 px on a CPU
    lr=1e-3,                  # AdamW's usual rate at batch 32 (CheXNet fine-tuned DenseNet-121 with Adam at 1e-3);
                              # much lower than from scratch, where SGD runs at 0.1-0.2
    momentum=0.9,             # AdamW's beta1
    nesterov=False,           # (SGD only)
    weight_decay=0.01,        # AdamW's default, decoupled from the gradient; a light pull towards zero
    decay_norm_and_bias=False,  # as fast: decaying BN scales and biases only fights the normalization
    label_smoothing=0.1,      # single-label heads only (multi-label targets stay 0/1)
    crop_padding=2,           # in-memory images: small shifts, as fast
    hflip=True,               # light augmentation: the pretrained features carry the invariances they learnt
    schedule="warmup_cosine",
    warmup_fraction=0.05,     # a new head's first gradients are large and random: ramp up so they do not
                              # wreck the pretrained weights before the head has learnt anything
    final_lr_fraction=0.0,
    optimizer="adamw",        # per-parameter step sizes: no lr search per data set, and robust at small batches
    crop_scale=(0.35, 1.0),   # streamed images: crops of at least 35% of the area (0.08, ImageNet training's,
                              # throws away too much of a small data set's images)
)

# A linear probe: the classifier alone on a frozen backbone (--freeze-backbone takes this recipe
# unless told otherwise), the protocol of Kornblith et al. 2019 ("Do Better ImageNet Models
# Transfer Better?": features of unaugmented images, an L2-regularized logistic regression).
# On 450 Fashion-MNIST images of unseen classes it scored 91.6% against 85.1% with finetune's
# settings at lr 0.01 (docs/performance.md#transfer-learning).
PROBE = dataclasses.replace(
    FINETUNE,
    name="probe",
    epochs=30,                # a linear layer on fixed features converges in a few hundred steps
    lr=0.1,                   # one layer on fixed features is a convex problem: large steps are safe and needed
                              # (finetune's 1e-3 reached 70.8% in its 10 epochs on the data set above)
    label_smoothing=0.0,      # the plain logistic loss of the protocol
    crop_padding=0,           # no augmentation: a frozen backbone's features of shifted or mirrored images
    hflip=False,              # are other features, not the same ones with noise (91.6% without, 89.8% with)
    crop_scale=None,          # streamed images: the evaluation's resize and center crop
    keep="last",              # the converged head: on a small validation split the best epoch is mostly noise
                              # (the best of 30 epochs on 50 images: 89.8-90.1%; the last: 91.6-92.0%)
)

RECIPES = {r.name: r for r in (FAST, PAPER, SPRINT, LONG, FINETUNE, PROBE)}

# Datasets whose classes change under a left-right mirror: a flipped 2 or 7 is no digit.
NO_FLIP = ("mnist",)


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}") from None


def augment_for(recipe: Recipe, dataset: str) -> Augment:
    hflip = recipe.hflip and dataset not in NO_FLIP
    if recipe.hflip and not hflip:
        log.info("%s: horizontal flips off (its classes are not mirror-symmetric)", dataset)
    return Augment(crop_padding=recipe.crop_padding, hflip=hflip, erase=recipe.erase, crop_scale=recipe.crop_scale)


def lr_factor(recipe: Recipe, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of the peak."""
    if recipe.schedule == "step":
        # the paper changes the rate between epochs, so the milestones are epoch boundaries
        epochs = total_steps / steps_per_epoch
        epoch = step // steps_per_epoch
        drops = sum(epoch >= m * epochs for m in recipe.milestones)
        return recipe.gamma ** drops
    warmup = int(recipe.warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup  # (step + 1): the first step already moves the weights
    span = max(1, total_steps - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    final = recipe.final_lr_fraction
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, recipe: Recipe, head: set | None = None,
                 backbone_lr_scale: float = 1.0) -> list[dict]:
    """Parameters split into decayed and not decayed (BN scales and shifts, biases) and, when
    ``head`` (the ids of the classifier's parameters) is given, into head and backbone, the backbone's groups at
    ``backbone_lr_scale`` times the learning rate (``lr_scale``, applied by ``build_optimizer``).
    Frozen parameters are included: they get no gradient, which every optimizer skips."""
    groups = {}
    split_decay = not recipe.decay_norm_and_bias and recipe.weight_decay > 0
    for p in model.parameters():
        backbone = head is not None and id(p) not in head
        decay = not split_decay or p.dim() > 1  # conv and linear weights have >= 2 dims
        groups.setdefault((backbone, decay), []).append(p)
    return [dict(params=params, weight_decay=recipe.weight_decay if decay else 0.0,
                 lr_scale=backbone_lr_scale if backbone else 1.0)
            for (backbone, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]


def build_optimizer(model: nn.Module, recipe: Recipe, lr: float, fused: bool = False, head: set | None = None,
                    backbone_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """The recipe's optimizer; ``fused`` (CUDA) picks the one-kernel SGD update a CUDA graph can
    replay. ``head`` and ``backbone_lr_scale``: see ``param_groups``."""
    groups = param_groups(model, recipe, head, backbone_lr_scale)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(recipe.momentum, 0.999), weight_decay=recipe.weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, nesterov=recipe.nesterov, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule; its state is just the step count, so it checkpoints as JSON."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(recipe, step, steps_per_epoch, total_steps))
