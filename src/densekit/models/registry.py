"""Name -> model: ``register``, ``create_model`` and ``list_models``."""

from __future__ import annotations

import fnmatch
import inspect

from .densenet import DenseNet
from .variants import VARIANTS, Variant

_REGISTRY: dict[str, Variant] = {}

# What create_model changes from DenseNet's own defaults, and why.
_FAST_DEFAULTS = dict(
    fused=True,  # the fused lean block: same function, less memory, faster (docs/performance.md)
)


def register(name: str, variant: Variant) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    if not isinstance(variant, Variant):
        raise TypeError(f"register expects a Variant, got {type(variant).__name__}")
    _REGISTRY[name] = variant


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def get_variant(name: str) -> Variant:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}") from None


def model_kwargs(name: str, **overrides) -> dict:
    """The full DenseNet arguments ``create_model(name, **overrides)`` uses."""
    accepted = set(inspect.signature(DenseNet.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]!r} for model {name!r}; accepted: {', '.join(sorted(accepted))}")
    return {**get_variant(name).kwargs(), **_FAST_DEFAULTS, **overrides}


def create_model(name: str, pretrained: bool = False, **overrides) -> DenseNet:
    """Build the registered model ``name``; keyword arguments override the variant's.

    ``pretrained`` is timm's argument; densekit bundles no weights and downloads nothing, so
    True is refused: load a torchvision or timm state dict into the model instead.

    >>> model = create_model("densenet_bc_100_k12", num_classes=100)
    """
    if pretrained:
        raise ValueError(f"pretrained=True: densekit downloads no weights; build {name!r} and load a weights "
                         "file into it (model.load_state_dict(torch.load(path, weights_only=True)))")
    kwargs = model_kwargs(name, **overrides)
    model = DenseNet(**kwargs)
    variant = get_variant(name)
    spatial = variant.input_size[1:]
    if model.spatial_dims != len(spatial):
        spatial = (spatial[0],) * model.spatial_dims
    model.pretrained_cfg = dict(model.default_pretrained_cfg(spatial), architecture=name)
    return model


for _name, _variant in VARIANTS.items():
    register(_name, _variant)
