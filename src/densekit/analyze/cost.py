"""Parameters, compute and training memory: DenseNets against ResNets.

The DenseBlock blog post claims dense connectivity needs *fewer parameters* (claim 3) and
warns that it costs *heavy compute and memory* (claim 4). The table puts densekit's DenseNets beside
torchvision's ResNets and DenseNets (built with ``weights=None``: nothing is downloaded)
with their parameters, multiply-accumulates of one forward pass, and a published accuracy
with its source, so that size is read against what it buys. Memory is the activations a
training forward keeps for backward, counted exactly with autograd's saved-tensor hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..models import create_model
from ..models.profile import count_macs, count_params

_TABLE2 = "Huang et al. 2017 (arXiv:1608.06993), Table 2"


@dataclass(frozen=True)
class Reference:
    """One model of the comparison: how to build it, at which input, what was published."""

    build: Callable[[], nn.Module] | None   # None: a published row only (no torchvision model)
    input_size: tuple[int, ...]
    metric: str                             # what the published figure measures
    published: float | None = None          # None: read from torchvision's weights metadata
    params_published: str | None = None     # for rows that cannot be built here
    source: str = ""


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None)
    return build


def _densekit(name: str) -> Callable[[], nn.Module]:
    return lambda: create_model(name)


_IMAGENET = "ImageNet-1k top-1 accuracy (%), 224 px single crop"
_C10 = "CIFAR-10+ test error (%)"

REFERENCES: dict[str, Reference] = {
    "densekit:densenet121": Reference(_densekit("densenet121"), (3, 224, 224), _IMAGENET),
    "densekit:densenet169": Reference(_densekit("densenet169"), (3, 224, 224), _IMAGENET),
    "densekit:densenet201": Reference(_densekit("densenet201"), (3, 224, 224), _IMAGENET),
    "torchvision:densenet121": Reference(_torchvision("densenet121"), (3, 224, 224), _IMAGENET),
    "torchvision:resnet18": Reference(_torchvision("resnet18"), (3, 224, 224), _IMAGENET),
    "torchvision:resnet34": Reference(_torchvision("resnet34"), (3, 224, 224), _IMAGENET),
    "torchvision:resnet50": Reference(_torchvision("resnet50"), (3, 224, 224), _IMAGENET),
    "torchvision:resnet101": Reference(_torchvision("resnet101"), (3, 224, 224), _IMAGENET),
    "densekit:densenet_40_k12": Reference(_densekit("densenet_40_k12"), (3, 32, 32), _C10, 5.24,
                                          source=f"{_TABLE2}, DenseNet (L=40, k=12)"),
    "densekit:densenet_bc_100_k12": Reference(_densekit("densenet_bc_100_k12"), (3, 32, 32), _C10, 4.51,
                                              source=f"{_TABLE2}, DenseNet-BC (L=100, k=12)"),
    "paper:resnet110": Reference(None, (3, 32, 32), _C10, 6.41, "1.7M",
                                 f"{_TABLE2}, ResNet (110 layers), from He et al. 2016"),
    "paper:preact_resnet1001": Reference(None, (3, 32, 32), _C10, 4.62, "10.2M",
                                         f"{_TABLE2}; He et al. 2016, Identity Mappings (arXiv:1603.05027)"),
}

# densekit's ImageNet DenseNets load torchvision's checkpoints strictly, so their accuracy is that checkpoint's.
_SAME_WEIGHTS = {f"densekit:{n}": n for n in ("densenet121", "densenet169", "densenet201")}


def _torchvision_accuracy(arch: str) -> tuple[float, str]:
    """Top-1 of torchvision's IMAGENET1K_V1 checkpoint, from its weights metadata (on disk,
    no download): the figure torchvision publishes for the weights its recipe produced."""
    import torchvision

    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    return weights.meta["_metrics"]["ImageNet-1K"]["acc@1"], f"torchvision {type(weights).__name__}.IMAGENET1K_V1"


def _published(name: str, ref: Reference) -> dict:
    value, source = ref.published, ref.source
    if value is None:
        arch = _SAME_WEIGHTS.get(name, name.split(":", 1)[1])
        value, source = _torchvision_accuracy(arch)
        if name in _SAME_WEIGHTS:
            source += " (loads into densekit's model strictly)"
    return dict(metric=ref.metric, value=value, source=source)


def cost_row(name: str, model: nn.Module | None, input_size: tuple[int, ...], macs: bool = True) -> dict:
    """Parameters and forward MACs of one model at one input (C, *spatial)."""
    row = dict(model=name, input_size=list(input_size), params=None, macs=None)
    if model is not None:
        row["params"] = count_params(model)
        row["macs"] = count_macs(model, input_size) if macs else None
    return row


def cost_table(names: list[str] | None = None, macs: bool = True) -> list[dict]:
    """One row per reference model (default: all of :data:`REFERENCES`): params, MACs, and
    the published figure with its source."""
    rows = []
    for name in REFERENCES if names is None else names:
        if name not in REFERENCES:
            raise ValueError(f"unknown reference model {name!r}; known: {', '.join(REFERENCES)}")
        ref = REFERENCES[name]
        row = cost_row(name, ref.build() if ref.build else None, ref.input_size, macs)
        if ref.params_published:
            row["params_published"] = ref.params_published
        rows.append(dict(row, published=_published(name, ref)))
    return rows


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward after one training-mode forward of
    ``x``, parameters excluded: the activation memory that training holds at its peak.

    Every saved tensor passes through the pack hook; tensors that share storage (views, a
    tensor saved by two ops) are counted once, by storage.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out  # the graph, and with it every saved tensor, is freed here
    return sum(storages.values())


# What the memory comparison runs: the blog post's warning is about DenseNets as usually written
# (torchvision's concatenating path), which densekit's fused block is there to fix.
MEMORY_MODELS: dict[str, Callable[[], nn.Module]] = {
    "densekit:densenet121 (fused)": _densekit("densenet121"),
    "densekit:densenet121 (reference path)": lambda: create_model("densenet121", fused=False),
    "torchvision:densenet121": _torchvision("densenet121"),
    "torchvision:resnet50": _torchvision("resnet50"),
}


def activation_memory(image_size: int = 224, batch: int = 2, names: list[str] | None = None,
                      seed: int = 0) -> dict:
    """Saved activations per image of a training forward, for each of :data:`MEMORY_MODELS`."""
    torch.manual_seed(seed)
    x = torch.randn(batch, 3, image_size, image_size)
    rows = []
    for name in MEMORY_MODELS if names is None else names:
        model = MEMORY_MODELS[name]()
        rows.append(dict(model=name, saved_bytes_per_image=saved_activation_bytes(model, x) / batch))
    return dict(input_size=[3, image_size, image_size], batch=batch, rows=rows,
                measure="bytes autograd saves for backward in one training forward, per image (parameters excluded)")
