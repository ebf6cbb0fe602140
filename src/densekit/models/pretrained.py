"""Pretrained weights to fine-tune from: torchvision and timm files, and densekit run directories.

:func:`read_weights` reads a source into :class:`Weights` (tensors in densekit's key names, which
are torchvision's modern ones, and what the source says of its model, classes and preprocessing);
:func:`build_pretrained` builds the model to fine-tune and loads them, strictly but for the
classifier, which is kept only when it predicts the same classes; :class:`LoadReport` says what
was loaded, what is new and what was adapted.

Written here rather than taken from timm (``timm.models.load_checkpoint`` and
``adapt_input_conv``) because densekit cannot lean on timm's loaders, which assume timm's
model classes and download what they lack, while densekit downloads nothing, reads strangers'
files without pickle (``weights_only=True``) and within a size bound, names the first tensor
that does not fit instead of dropping it, and reads its own run directories through
:class:`~densekit.rundir.RunDir`, the one owner of their format.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torchvision

from ..checks import ArgumentError, text
from ..errors import UserError
from ..rundir import LIMITS, RunDir
from ..rundir.files import check_regular, read_tensors
from .densenet import IMAGENET_MEAN, IMAGENET_STD, DenseNet
from .layers import LEGACY_LAYER_KEY, DenseBlock, DenseLayer, prune_block_outputs_
from .registry import create_model, get_variant, list_models, model_kwargs
from .size import estimate

# What torchvision's and timm's ImageNet weights were trained on (both list these in their configs).
IMAGENET_PREPROCESSING = dict(in_chans=3, image_size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                              crop_pct=0.875)

# A weights file of any model densekit agrees to build (float32 or float64 weights, batch-norm
# statistics, a header): the bound a run directory's model is held to (rundir.schema.LIMITS).
MAX_FILE_BYTES = 16 * LIMITS.params + (16 << 20)

_KINDS = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32)
_WRAPPERS = ("state_dict", "model")  # timm's and torchvision's training scripts save {key: state dict, ...}
_LAYER_KEY = re.compile(r"^(.*\.denselayer\d+\.)(.*)$")
# the part of torch.load's (long) weights_only refusal that says what it refused
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n|$)")
_HEAD = "classifier."
_STEM = "features.conv0.weight"


@dataclasses.dataclass
class Weights:
    source: str                            # as given
    kind: str                              # "torchvision", "timm" or "densekit" (a run directory)
    state_dict: dict[str, torch.Tensor]    # in densekit's key names (torchvision's modern names)
    model: str | None                      # the registered model they fit, or the run's
    model_kwargs: dict | None              # a run's full DenseNet arguments; None for files
    classes: tuple[str, ...] | None        # a run's class names; None for files (ImageNet's are unnamed)
    preprocessing: dict                    # in_chans, image_size (h, w), mean, std, crop_pct


@dataclasses.dataclass
class LoadReport:
    loaded: list[str]   # tensors taken from the weights (adapted ones included)
    new: list[str]      # tensors the model starts fresh (a new classifier)
    adapted: list[str]  # tensors changed to fit (the stem convolution for other input channels)
    changes: dict[str, str] = dataclasses.field(default_factory=dict)  # adapted tensor -> how

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        if self.new:
            parts.append(f"{len(self.new)} new ({', '.join(self.new)})")
        if self.adapted:
            how = [f"{k}: {self.changes[k]}" if k in self.changes else k for k in self.adapted]
            parts.append(f"{len(self.adapted)} adapted ({', '.join(how)})")
        return ", ".join(parts)


# -- reading -------------------------------------------------------------------------------------


def read_weights(source: str | os.PathLike) -> Weights:
    """The weights at ``source``: a torchvision weights file (``torch.load``, no pickled code),
    a safetensors file (torchvision's or timm's names), a densekit run directory, or the name
    of a torchvision DenseNet whose file is in torch hub's cache (nothing is downloaded)."""
    given = os.fspath(source)
    path = Path(given)
    if path.is_dir():
        return _read_run(given, RunDir(path))
    if not path.exists():
        path = _hub_file(given)
    where = str(path)  # the cached file, for a name
    state = _check_tensors(where, _normalise(where, _read_file(path)))
    name, mismatch = _closest(state)
    kind = "timm" if path.suffix == ".safetensors" else "torchvision"
    return Weights(given, kind, state, None if mismatch else name, None, None, dict(IMAGENET_PREPROCESSING))


def _read_run(given: str, run: RunDir) -> Weights:
    try:
        info = run.read_info()
        state = run.load_model().state_dict()
    except UserError as e:
        raise ArgumentError(f"{{pretrained}} {text(e)}") from e
    pre = info.preprocessing
    return Weights(given, "densekit", dict(state), info.model, dict(info.model_kwargs), tuple(info.classes),
                   dict(in_chans=pre.in_chans, image_size=tuple(pre.image_size), mean=tuple(pre.mean),
                        std=tuple(pre.std), crop_pct=pre.crop_pct))


def _hub_file(name: str) -> Path:
    """torchvision's weights file for model ``name`` in torch hub's cache, where torchvision's
    own ``weights=`` downloads put it ($TORCH_HOME/hub/checkpoints)."""
    published = torchvision.models.list_models(include="densenet*")
    if name not in published:
        raise ArgumentError(f"{{pretrained}} {text(name)}: no such file or folder, nor a model with published "
                            f"weights ({', '.join(published)})")
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    exact = folder / url.rsplit("/", 1)[-1]
    found = [exact] if exact.is_file() else sorted(folder.glob(f"{name}-*.pth"))
    if not found:
        raise ArgumentError(f"{{pretrained}} {name}: no weights file in {text(folder)}, and densekit downloads "
                            f"nothing: put {text(url)} there, or give the file's path")
    return found[0]


def _read_file(path: Path) -> object:
    """A safetensors file (timm publishes its weights so), or what torch.load reads without
    running pickled code; no bigger than the weights of a model densekit agrees to build."""
    try:
        if path.suffix == ".safetensors":
            return read_tensors(path, MAX_FILE_BYTES)
        check_regular(path, MAX_FILE_BYTES)
    except UserError as e:  # their messages start with the path
        raise ArgumentError(f"{{pretrained}} {text(e)}") from e
    try:
        # timm's and torchvision's training scripts store their argparse options beside the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike: a file torch.load will not read safely
        found = _UNPICKLER_ERROR.search(str(e))
        reason = found[1] if found else " ".join(str(e).split())[:200] or type(e).__name__
        raise ArgumentError(f"{{pretrained}} {text(path)}: not a weights file that torch.load reads without "
                            f"running code ({text(reason)}); give a saved state_dict()") from e


def _normalise(where: str, obj: object) -> dict:
    """The state dict inside ``obj`` in densekit's key names: training-checkpoint wrappers and
    DataParallel's "module." prefix removed; torchvision's legacy "norm.1" names renamed (timm's
    ``_filter_torchvision_pretrained`` in timm/models/densenet.py renames the same ones); a
    ``num_batches_tracked`` of 0 where files older than PyTorch 0.4.1 have none, as BatchNorm's
    own loader adds. timm's DenseNet needs no renaming: its BatchNormAct2d subclasses
    BatchNorm2d so that its keys stay torchvision's (timm/layers/norm_act.py)."""
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
        raise ArgumentError(f"{{pretrained}} {text(where)}: not a state dict (a mapping of tensor names to tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    state = {}
    for key, value in obj.items():
        layer = _LAYER_KEY.match(key)
        legacy = layer and LEGACY_LAYER_KEY.match(layer[2])
        state[f"{layer[1]}{legacy[1]}{legacy[2]}.{legacy[3]}" if legacy else key] = value
    for key in [k for k in state if k.endswith(".running_var")]:
        state.setdefault(key[:-len("running_var")] + "num_batches_tracked", torch.tensor(0))
    return state


def _check_tensors(where: str, state: dict) -> dict[str, torch.Tensor]:
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.dtype not in _KINDS:
            what = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise ArgumentError(f"{{pretrained}} {text(where)}: {text(key[:100])} is {text(what)}, not a "
                                "tensor of weights")
        if value.is_floating_point() and not value.isfinite().all():
            raise ArgumentError(f"{{pretrained}} {text(where)}: {text(key[:100])} holds NaN or infinite values")
    return state


# -- which model ---------------------------------------------------------------------------------


def _mismatch(expected: Mapping[str, torch.Size], state: Mapping[str, torch.Tensor]) -> str | None:
    """How ``state`` first differs from a model's tensor shapes ``expected``; None if it fits."""
    for key, shape in expected.items():
        if key not in state:
            return f"{key} is missing from the file"
        if state[key].shape != shape:
            return f"{key} is {tuple(state[key].shape)} in the file, {tuple(shape)} in the model"
    extra = next((k for k in state if k not in expected), None)
    return None if extra is None else f"{text(extra[:100])} is in the file, not in the model"


def _body(tensors: Mapping[str, torch.Tensor]) -> dict:
    return {k: v for k, v in tensors.items() if not k.startswith(_HEAD)}


def _closest(state: Mapping[str, torch.Tensor]) -> tuple[str, str | None]:
    """The registered model nearest to ``state`` (classifier aside) and how it differs (None: it
    fits). Sizes in closed form (``models.size``) rank all of them without building any; only
    those of exactly the file's parameter count are built, on the meta device, to compare shapes."""
    body = _body(state)
    stem = body.get(_STEM)
    in_chans = stem.shape[1] if stem is not None and stem.dim() > 2 and stem.shape[1] > 0 else 3
    params = sum(v.numel() for k, v in body.items() if k.endswith((".weight", ".bias")))
    sizes = {n: estimate(model_kwargs(n, num_classes=0, in_chans=in_chans), get_variant(n).input_size[1:]).params
             for n in list_models()}
    ranked = sorted(sizes, key=lambda n: abs(sizes[n] - params))  # stable: list_models() order on ties
    first = None
    for name in ranked[:1] + [n for n in ranked[1:] if sizes[n] == params]:
        with torch.device("meta"):
            model = DenseNet(**model_kwargs(name, num_classes=0, in_chans=in_chans))
        miss = _mismatch({k: v.shape for k, v in model.state_dict().items()}, body)
        if miss is None:
            return name, None
        first = first or (name, miss)
    return first


def infer_model(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The registered model whose tensors (the classifier's aside) have exactly these names and
    shapes, any input channels; the first in ``list_models()`` order where several do (a
    stride-2 stem has the same tensors as a stride-1 one)."""
    name, miss = _closest(state_dict)
    if miss:
        raise ArgumentError(f"no registered model fits the weights; the closest, {name}, differs: {miss}")
    return name


# -- building ------------------------------------------------------------------------------------


def _jsonable(kwargs: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def _prune_like(model: DenseNet, state: Mapping[str, torch.Tensor]) -> None:
    """Shrink ``model``'s dense layers and blocks to a pruned run's tensors, as RunDir.build_model
    does from model.json's sizes (which the run's weights were checked against): the kept
    channels load next (a ValueError where the tensors fit no pruning of the model)."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, DenseBlock):
            index = state.get(f"{name}.output_index")
            if index is not None:
                prune_block_outputs_(model, name, torch.arange(index.numel()))
        if not isinstance(layer, DenseLayer):
            continue
        index = state.get(f"{name}.input_index")
        conv1 = state.get(f"{name}.conv1.weight")
        width = conv1.shape[0] if layer.has_bottleneck and conv1 is not None else None
        if index is not None or (width is not None and width != layer.conv1.out_channels):
            layer.prune_(None if index is None else torch.arange(index.numel()),
                         None if width is None or width == layer.conv1.out_channels else torch.arange(width))


def _architecture(weights: Weights, model: str | None, args: dict) -> tuple[str, DenseNet, dict]:
    """The model's name, the model (fresh weights) and its full DenseNet arguments."""
    try:
        if model is None and weights.model_kwargs is not None:  # a run's own model, pruned structure and all
            kwargs = {**weights.model_kwargs, **args}
            net = DenseNet(**kwargs)
            _prune_like(net, weights.state_dict)
            return weights.model, net, kwargs
        if model is None and weights.model is None:
            closest, miss = _closest(weights.state_dict)
            raise ArgumentError(f"{{pretrained}} {text(weights.source)} fits no registered model; the closest, "
                                f"{closest}, differs: {miss}")
        model = model or weights.model
        return model, create_model(model, **args), model_kwargs(model, **args)
    except UserError:
        raise
    except (TypeError, ValueError) as e:  # an unknown model or argument
        raise UserError(str(e)) from e


def _adapt_stem(weights: Weights, state: dict, in_chans: int, report: LoadReport) -> None:
    """Fit the stem convolution to ``in_chans``: summed over RGB for gray input, or a gray
    stem repeated over RGB and divided by 3; either way the same function of a gray image.
    timm's ``adapt_input_conv`` (timm/models/_manipulate.py) treats these two cases alike."""
    w = state.get(_STEM)
    if w is None or w.dim() < 3 or w.shape[1] == in_chans:
        return
    have = w.shape[1]
    if (have, in_chans) == (3, 1):
        state[_STEM] = w.float().sum(1, keepdim=True)
    elif (have, in_chans) == (1, 3):
        state[_STEM] = w.float().repeat(1, 3, *(1,) * (w.dim() - 2)) / 3
    else:
        raise ArgumentError(f"{{pretrained}} {text(weights.source)} has a stem for {have} input channel(s); "
                            f"{{in_chans}} {in_chans} can be made only from 3 (summed to 1) or 1 (repeated to 3)")
    report.adapted.append(_STEM)
    report.changes[_STEM] = f"{have} -> {in_chans} channels"


def build_pretrained(weights: Weights, num_classes: int, in_chans: int, classes: Sequence[str] | None = None,
                     model: str | None = None, model_args: dict | None = None) -> tuple[DenseNet, dict, LoadReport]:
    """The model to fine-tune, its full DenseNet arguments (as model.json stores them) and what
    was loaded. The architecture is ``model`` (with ``model_args``) if given, else the run's, else
    the registered model the tensors fit. Everything but the classifier loads strictly; the
    classifier is kept when it has ``num_classes`` outputs and the same ``classes`` (or the
    weights name none), else starts fresh as the model's own initialisation makes it."""
    args = {**(model_args or {}), "num_classes": num_classes, "in_chans": in_chans}
    name, net, kwargs = _architecture(weights, model, args)
    report = LoadReport([], [], [])
    state = dict(weights.state_dict)
    _adapt_stem(weights, state, in_chans, report)
    own = net.state_dict()
    miss = _mismatch({k: v.shape for k, v in _body(own).items()}, _body(state))
    if miss:
        raise ArgumentError(f"{{pretrained}} {text(weights.source)} does not fit {name}: {miss}")
    head = [k for k in own if k.startswith(_HEAD)]
    same_classes = weights.classes is None or (classes is not None and tuple(classes) == tuple(weights.classes))
    keep = same_classes and {k for k in state if k.startswith(_HEAD)} == set(head) and \
        all(state[k].shape == own[k].shape for k in head)
    if not keep:
        state = {**_body(state), **{k: own[k] for k in head}}  # the fresh head, loaded onto itself
        report.new = head
    net.load_state_dict(state, strict=True)
    report.loaded = [k for k in own if k not in report.new]
    return net, _jsonable(kwargs), report
