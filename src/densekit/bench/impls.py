"""The networks a benchmark compares: densekit and the references built the way their users would.

- ``densekit``: ``create_model(name)`` with its defaults (the fused lean block), trained as
  ``densekit train`` trains it: on CUDA each step is replayed from a CUDA graph;
- ``densekit-eager``: the same network, every step launched eagerly;
- ``densekit-ref``: the same with ``fused=False``, the plain concatenating path.
- ``densekit-me``: the same with ``memory_efficient=True``: each layer's bottleneck is
  recomputed in backward instead of kept (torchvision's meaning of the flag).
- ``torchvision`` / ``torchvision-me``: ``torchvision.models.DenseNet`` with the variant's
  numbers, ``memory_efficient`` False / True. For CIFAR variants the stem is rebuilt as a
  torchvision user does it (a 3x3 stride-1 conv, no max-pool) and, so that both sides are
  the same function with the same parameters, without torchvision's norm0/relu0, which the
  paper's CIFAR networks do not have: densekit weights then load into it strictly.
- ``timm``: ``timm.create_model(name)`` for the ImageNet names timm registers.
- ``densekit-compile`` / ``torchvision-compile``: ``densekit`` / ``torchvision`` under
  ``torch.compile`` (measure.py compiles; the network is the same).
- ``densekit-optimized``: ``densekit``'s network copied by ``optimize_for_inference``, as
  ``densekit eval`` and ``predict`` run it on the CPU; inference only (measure.py copies it).

torchvision's DenseNet cannot express every variant: its dense layer always has the 1x1
bottleneck, its transitions always halve, it takes one growth rate. For those variants the
reference is *unavailable* (with the reason), not approximated, so no ratio is ever taken
against a different network.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from ..models import DenseNet
from .spec import OPTIMIZED, Config, base_impl, model_arguments


def _torchvision_reason(kwargs: dict) -> str | None:
    if not isinstance(kwargs["growth_rate"], int):
        return "torchvision's DenseNet takes one growth rate for all blocks"
    if not kwargs["bn_size"]:
        return "torchvision's dense layer always has the 1x1 bottleneck (bn_size > 0); it has no plain DenseNet"
    if kwargs["compression"] != 0.5:
        return f"torchvision's transitions always halve the channels (compression 0.5, here {kwargs['compression']})"
    if kwargs["stem"] not in ("imagenet", "cifar"):
        return f"torchvision has no equivalent of the {kwargs['stem']!r} stem"
    if kwargs.get("spatial_dims", 2) != 2:
        return "torchvision's DenseNet is 2D only"
    return None


def _timm_name(config: Config) -> str | None:
    import timm

    return config.model if config.model in timm.list_models("densenet*") else None


def unavailable_reason(config: Config) -> str | None:
    """Why ``config.impl`` cannot run ``config.model``, or None when it can."""
    kwargs = model_arguments(config.model)
    if config.layout == "channels_last" and kwargs.get("spatial_dims", 2) != 2:
        return "channels_last is a 2D layout"
    if config.impl == OPTIMIZED:
        return "an optimize_for_inference copy runs inference only" if config.mode != "infer" else None
    if config.impl != base_impl(config.impl) and not _compiles():
        return f"torch.compile is not available with torch {torch.__version__} here"
    if config.impl.startswith("torchvision"):
        return _torchvision_reason(kwargs)
    if config.impl == "timm":
        if importlib.util.find_spec("timm") is None:
            return "timm is not installed"
        try:
            name = _timm_name(config)
        except Exception as e:  # an installed timm that does not import with this torch: the rest runs
            return f"timm does not import ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
        if name is None:
            return f"timm registers no model named {config.model!r}"
    return None


def _compiles() -> bool:
    """Can torch.compile run here? Its CPU backend needs a C++ compiler."""
    import shutil

    return hasattr(torch, "compile") and any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def build(config: Config) -> nn.Module:
    """The ``config.impl`` network for ``config.model``, on the CPU in fp32 and train mode
    (a compiled implementation's eager network: measure.py compiles it)."""
    reason = unavailable_reason(config)
    if reason:
        raise ValueError(f"{config.impl} cannot build {config.model}: {reason}")
    impl = base_impl(config.impl)
    if impl in ("densekit", "densekit-eager", "densekit-ref", "densekit-me"):
        overrides = dict(in_chans=config.in_chans)
        if impl == "densekit-ref":
            overrides["fused"] = False
        if impl == "densekit-me":
            overrides["memory_efficient"] = True
        return DenseNet(**model_arguments(config.model, **overrides))
    if config.impl == "timm":
        import timm

        kwargs = model_arguments(config.model)
        return timm.create_model(_timm_name(config), pretrained=False, num_classes=kwargs["num_classes"],
                                 in_chans=config.in_chans)
    return torchvision_reference(config.model, config.in_chans, memory_efficient=impl == "torchvision-me")


def torchvision_reference(name: str, in_chans: int = 3, memory_efficient: bool = False) -> nn.Module:
    """torchvision's DenseNet with the numbers of densekit's ``name``."""
    import torchvision

    kwargs = model_arguments(name)
    reason = _torchvision_reason(kwargs)
    if reason:
        raise ValueError(f"no torchvision reference for {name}: {reason}")
    k = kwargs["growth_rate"]
    init = kwargs["num_init_features"] or 2 * k
    model = torchvision.models.DenseNet(growth_rate=k, block_config=tuple(kwargs["block_config"]),
                                        num_init_features=init, bn_size=kwargs["bn_size"],
                                        num_classes=kwargs["num_classes"], memory_efficient=memory_efficient)
    features = model.features
    if kwargs["stem"] == "cifar":
        features.conv0 = nn.Conv2d(in_chans, init, 3, padding=1, bias=False)
        features.norm0 = nn.Identity()
        features.relu0 = nn.Identity()
        features.pool0 = nn.Identity()
    elif in_chans != 3:
        features.conv0 = nn.Conv2d(in_chans, init, 7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(features.conv0.weight)
    return model


def torch_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
