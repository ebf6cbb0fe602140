"""``RunDir``: a run directory, the only code that knows its files' names and formats.

A run directory holds

- ``model.json``: how to rebuild the model and feed it (:class:`ModelInfo`: registered name,
  the full :class:`~densekit.models.DenseNet` arguments, dataset, class names,
  preprocessing and, for a pruned model, the sizes of its pruned layers);
- ``model.safetensors``: the model's ``state_dict`` (weights and BN statistics);
- ``resume.safetensors``: the resume state, one file so that it is replaced in one step:
  tensors (model, optimizer buffers, RNG states) as safetensors, everything else (epoch,
  step, scheduler, optimizer hyper-parameters, config, metrics so far) as JSON in its
  metadata. No pickle anywhere: reading a run directory cannot run code;
- ``metrics.jsonl``: one object per finished epoch (``epoch`` from 1, ``train_loss`` with
  the recipe's label smoothing, ``train_acc`` on augmented batches, ``test_loss``,
  ``test_acc``, ``lr`` of the epoch's last step, ``seconds`` of training alone);
- ``curves.png``, ``summary.json`` (what :func:`densekit.train.train` returns) and, once
  ``densekit eval`` has run, ``confusion.png``; ``analysis/`` for ``densekit analyze``,
  ``model.onnx`` / ``model.pt2`` for ``densekit export``.

Everything read is checked first (``schema``: types, ranges, and a bound on the model a
model.json may describe), and every failure to read is a :class:`~densekit.errors.UserError`
of one line that names the file and the field.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..checks import ArgumentError, text
from ..errors import UserError
from ..models import DenseBlock, DenseLayer, DenseNet
from ..models.layers import block_reader, check_channel_index, prune_block_outputs_
from ..results import json_text
from . import files, schema
from .schema import FORMAT, FORMAT_VERSION, MAX_JSON_BYTES, MAX_METRICS_BYTES, MAX_SIDE, Fields

log = logging.getLogger(__name__)

_MODEL_JSON = "model.json"
_WEIGHTS = "model.safetensors"
_RESUME = "resume.safetensors"
_METRICS = "metrics.jsonl"
_SUMMARY = "summary.json"
_CURVES = "curves.png"
_CONFUSION = "confusion.png"
_ANALYSIS = "analysis"
_OWN_FILES = (_MODEL_JSON, _WEIGHTS, _RESUME, _METRICS, _SUMMARY, _CURVES, _CONFUSION)
_RESUME_KEY = "densekit.resume"

# What building or loading may raise on a description that passed the checks but is still
# wrong in a way they did not foresee: said as the file's fault, in one line.
_LOAD_ERRORS = (TypeError, ValueError, RuntimeError, OverflowError, RecursionError, MemoryError, IndexError,
                KeyError)


def _weights_limit(params: int) -> int:
    """The most bytes a weights file of a model of ``params`` parameters can hold: float32
    parameters, batch-norm statistics (at most as many again), indices, and a header."""
    return 16 * params + (16 << 20)


def _is_stale_temp(name: str) -> bool:
    """Is ``name`` the temporary file of a write to one of a run's own files?"""
    return name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in _OWN_FILES)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


# -- model.json ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a run's images are fed to its model: ``(x / 255 - mean) / std`` per channel of
    images resized to ``image_size`` (bilinear, antialiased)."""

    in_chans: int
    image_size: tuple[int, int]  # (height, width)
    mean: tuple[float, ...]      # per channel, [0, 1] units, of the training images
    std: tuple[float, ...]
    # None: the whole image resized to image_size (the fixed-size datasets); a number: its short
    # side resized to image_size / crop_pct, then the center image_size cropped (photos)
    crop_pct: float | None = None
    resize: str = "bilinear, antialiased"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """model.json: everything needed to rebuild a run's model and feed it."""

    model: str                 # the registered name
    model_args: dict           # what the user changed from the registered variant
    model_kwargs: dict         # the full DenseNet arguments: rebuilds even if the variant changes
    dataset: str
    data_dir: str | None       # where the training data was read from
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    pruned: dict = dataclasses.field(default_factory=dict)  # {layer: {"inputs": n|None, "width": n|None}}
    val_fraction: float = 0.1  # how the validation split was made, where the dataset has none of its own:
    seed: int = 0              # this fraction of the training images, stratified, chosen by this seed
    multi_label: bool = False  # several labels per image: each class's probability is the sigmoid of its logit
    csv: dict | None = None    # the csv dataset's files and columns (data.csvfile.CsvLayout's fields)
    streamed: bool = False     # image files decoded batch by batch rather than held in memory (evaluation does
                               # the same, so that it frames and colours the images as training did)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def data_options(self, dataset: str | None = None) -> dict:
        """What loading ``dataset`` (default: the run's) again as the run loaded it takes besides
        the directory: the validation split's recipe and, for the run's own image files, the
        CSV layout and whether they were streamed."""
        same = dataset in (None, self.dataset)
        files = self.dataset in ("imagefolder", "csv") and same
        return dict(val_fraction=self.val_fraction, seed=self.seed, csv=self.csv if same else None,
                    stream=self.streamed if files else None)

    def with_pruned(self, structure: dict) -> "ModelInfo":
        return dataclasses.replace(self, pruned=dict(structure))

    def to_json(self) -> dict:
        pre = self.preprocessing
        info = dict(format=FORMAT, format_version=FORMAT_VERSION, model=self.model, model_args=self.model_args,
                    model_kwargs=self.model_kwargs, dataset=self.dataset, data_dir=self.data_dir,
                    classes=list(self.classes), num_classes=self.num_classes,
                    preprocessing=dict(in_chans=pre.in_chans, image_size=list(pre.image_size), mean=list(pre.mean),
                                       std=list(pre.std), crop_pct=pre.crop_pct, resize=pre.resize),
                    val_fraction=self.val_fraction, seed=self.seed, multi_label=self.multi_label, csv=self.csv,
                    streamed=self.streamed)
        if self.pruned:
            info["pruned"] = self.pruned
        return info

    @classmethod
    def from_json(cls, info: dict, source: object) -> "ModelInfo":
        """Every field checked (types, ranges, sizes) and the model it describes bounded, before
        anything is built from it."""
        f = Fields(info, source)
        f.get("format", lambda v: v == FORMAT, f"{FORMAT!r} (not a densekit run description)")
        schema.check_version(f)
        classes = f.get("classes", schema.is_list_of(schema.is_text, 1), "a non-empty list of printable names")
        f.get("num_classes", lambda v: v == len(classes), f"the number of classes ({len(classes)})", None)
        pre = _preprocessing(f.sub("preprocessing"))
        kwargs = f.get("model_kwargs", lambda v: isinstance(v, dict), "a JSON object")
        schema.check_model(kwargs, pre.image_size, len(classes), pre.in_chans, source)
        return cls(
            model=f.get("model", schema.is_slug, "a model name (letters, digits, _ . -)"),
            model_args=f.get("model_args", lambda v: isinstance(v, dict), "a JSON object", {}),
            model_kwargs=kwargs,
            dataset=f.get("dataset", schema.is_dataset, "a dataset densekit reads"),
            data_dir=f.get("data_dir", schema.is_optional(schema.is_name), "a printable path or null", None),
            classes=tuple(classes), preprocessing=pre,
            pruned=schema.check_pruned(f.get("pruned", lambda v: isinstance(v, dict), "a JSON object", {}), source),
            val_fraction=f.get("val_fraction", lambda v: schema.is_number(v, 0) and v < 1, "a number in [0, 1)", 0.1),
            seed=f.get("seed", schema.is_int, "an integer >= 0", 0),
            multi_label=f.get("multi_label", lambda v: isinstance(v, bool), "true or false", False),
            csv=f.get("csv", schema.is_optional(lambda v: isinstance(v, dict) and len(v) <= 16),
                      "null or the CSV layout's fields", None),
            streamed=f.get("streamed", lambda v: isinstance(v, bool), "true or false", False))


def _preprocessing(f: Fields) -> Preprocessing:
    in_chans = f.get("in_chans", lambda v: v in (1, 3) and not isinstance(v, bool), "1 or 3")
    size = f.get("image_size", schema.is_list_of(lambda s: schema.is_int(s, 1, MAX_SIDE), 2, 2),
                 f"[height, width] in pixels (1 to {MAX_SIDE})")
    mean = f.get("mean", schema.is_list_of(schema.is_number, in_chans, in_chans),
                 f"a list of {in_chans} finite number(s)")
    std = f.get("std", schema.is_list_of(lambda v: schema.is_number(v) and v > 0, in_chans, in_chans),
                f"a list of {in_chans} finite number(s) > 0")
    crop_pct = f.get("crop_pct", schema.is_optional(lambda v: schema.is_number(v) and 0.1 <= v <= 1),
                     "null or a number in [0.1, 1]", None)
    resize = f.get("resize", lambda v: isinstance(v, str) and len(v) < 100, "a string", "bilinear, antialiased")
    return Preprocessing(in_chans, (size[0], size[1]), tuple(mean), tuple(std), crop_pct, resize)


def pretrained_cfg(info: ModelInfo, model: DenseNet, run_dir: Path) -> dict:
    """timm's ``pretrained_cfg`` of a trained model, with its classes and where it came from."""
    pre = info.preprocessing
    cfg = model.default_pretrained_cfg(pre.image_size)
    cfg.update(architecture=info.model, model=info.model, run_dir=str(run_dir), dataset=info.dataset,
               classes=list(info.classes), num_classes=info.num_classes, in_chans=pre.in_chans,
               image_size=tuple(pre.image_size), mean=tuple(pre.mean), std=tuple(pre.std),
               crop_pct=pre.crop_pct or 1.0)
    return cfg


# -- the pruned structure -------------------------------------------------------------------------


def pruned_structure(model: nn.Module) -> dict:
    """How far each pruned dense layer and block differs from the stock one, as model.json
    stores it: ``{"features.denseblock1.denselayer2": {"inputs": 20, "width": 36},
    "features.denseblock1": {"outputs": 88}, ...}``; a layer's ``inputs``, the number of
    channels it reads (None: all), and ``width``, its bottleneck's (None: bn_size * k); a
    block's ``outputs``, the channels it returns to the transition or final norm after it.
    Only the sizes: which channels are kept is in the weights (``input_index``, ``output_index``)."""
    structure = {}
    for name, m in model.named_modules():
        if isinstance(m, DenseBlock) and m.output_index is not None:
            structure[name] = {"outputs": m.output_index.numel()}
        if not isinstance(m, DenseLayer):
            continue
        inputs = None if m.input_index is None else m.input_index.numel()
        width = m.conv1.out_channels if m.has_bottleneck else None
        if width == m.bn_size * m.growth_rate:
            width = None
        if inputs is not None or width is not None:
            structure[name] = {"inputs": inputs, "width": width}
    return structure


def pruned_counts(structure: dict) -> tuple[int, int]:
    """(dense layers, dense blocks) that a :func:`pruned_structure` prunes: a block's entry
    gives its ``outputs``, a layer's its inputs and width."""
    blocks = sum(1 for sizes in structure.values() if "outputs" in sizes)
    return len(structure) - blocks, blocks


def _apply_pruned_structure(model: nn.Module, structure: dict, source: object) -> None:
    """Shrink a freshly built model's layers and blocks to ``structure``, so that a pruned
    run's weights load strictly; the kept channels come with the weights."""
    for name, sizes in structure.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if isinstance(module, DenseBlock):
            _apply_block_outputs(model, name, module, sizes, source)
            continue
        if not isinstance(module, DenseLayer) or "outputs" in sizes:
            raise UserError(f"{source}: field 'pruned' names {name[:60]!r}, which is not a dense layer of the "
                            f"model{'' if module is None else ' with those fields'}")
        layer = module
        inputs, width = sizes.get("inputs"), sizes.get("width")
        if width is not None and not layer.has_bottleneck:
            raise UserError(f"{source}: field 'pruned.{name}' prunes the width of a layer without a bottleneck")
        for key, value, most in (("inputs", inputs, layer.norm1.num_features),
                                 ("width", width, layer.norm2.num_features if layer.has_bottleneck else 0)):
            if value is not None and value > most:
                raise UserError(f"{source}: field 'pruned.{name}.{key}' must be at most {most}, got {value}")
        layer.prune_(None if inputs is None else torch.arange(inputs), None if width is None else torch.arange(width))


def _apply_block_outputs(model: nn.Module, name: str, block: DenseBlock, sizes: dict, source: object) -> None:
    outputs = sizes.get("outputs")
    if set(sizes) != {"outputs"} or outputs is None or block_reader(model, name) is None:
        raise UserError(f"{source}: field 'pruned.{name[:60]}' must give only the outputs of a dense block "
                        f"followed by a transition or the final norm")
    if outputs > block.output_channels:
        raise UserError(f"{source}: field 'pruned.{name}.outputs' must be at most {block.output_channels}, "
                        f"got {outputs}")
    prune_block_outputs_(model, name, torch.arange(outputs))


def _check_input_index(model: nn.Module, source: object) -> None:
    """Every pruned layer's ``input_index`` and block's ``output_index`` (loaded from the
    weights) must name channels its block has, each once: a damaged file would otherwise
    fail, or read wrong maps, in forward."""
    for name, m in model.named_modules():
        try:
            if isinstance(m, DenseLayer) and m.input_index is not None:
                check_channel_index(f"{name}.input_index", m.input_index, m.in_channels)
            if isinstance(m, DenseBlock) and m.output_index is not None:
                check_channel_index(f"{name}.output_index", m.output_index, m.out_channels)
        except ValueError as e:
            raise UserError(f"{source}: {e}; the file is damaged") from e


def load_strictly(model: nn.Module, state: dict[str, torch.Tensor], context: str) -> None:
    """``load_state_dict(strict=True)``, with a short account of what differs when it fails
    (torch's own message lists every tensor: thousands of characters for a DenseNet)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    kinds = [k for k in expected if k in state and (state[k].dtype not in _KINDS or
                                                    state[k].is_floating_point() != expected[k].is_floating_point())]
    problems = []
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} tensor(s) of another shape (first: {k} is "
                        f"{list(state[k].shape)} in the file, {list(expected[k].shape)} in the model)")
    if kinds:
        problems.append(f"{len(kinds)} tensor(s) of another kind (first: {kinds[0]} is {state[kinds[0]].dtype})")
    if missing:
        problems.append(f"{len(missing)} missing (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first: {unexpected[0][:100]})")
    if problems:
        raise UserError(f"{context}: {'; '.join(problems)}")
    try:
        model.load_state_dict(state, strict=True)
    except _LOAD_ERRORS as e:  # anything the checks above did not foresee
        raise UserError(f"{context}: {_one_line(e)}") from e


# -- the resume state ----------------------------------------------------------------------------

# The tensor types a run's files may hold: floats torch computes with, and integer indices and counts.
_KINDS = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32)


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    # Buffers come back row-major; give each its parameter's layout (channels-last on CUDA)
    # so that the fused multi-tensor update keeps its fast path.
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][name] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def _optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                     source: object) -> dict:
    """The optimizer state dict a resume state holds, checked against ``optimizer``: the same
    groups with values of the same kind, and per-parameter tensors of their parameter's shape."""
    fresh = optimizer.state_dict()
    groups = meta["optimizer"]["param_groups"]
    if len(groups) != len(fresh["param_groups"]):
        raise UserError(f"{source}: field 'optimizer.param_groups' holds {len(groups)} group(s), "
                        f"the run's optimizer {len(fresh['param_groups'])}")
    for i, (got, want) in enumerate(zip(groups, fresh["param_groups"])):
        # how the update runs (fused, foreach) is the process's choice, not the run's state
        schema.check_like(got, want, source, f"optimizer.param_groups.{i}", free=("fused", "foreach"))
        if got["params"] != want["params"]:
            raise UserError(f"{source}: field 'optimizer.param_groups.{i}.params' lists other parameters")
    shapes = {i: p.shape for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, _, name = key.partition("/")
        fits = schema.is_index(idx) and int(idx) in shapes and value.dtype in _KINDS and (
            value.shape == shapes[int(idx)] or (name == "step" and value.shape == ()))
        if not fits:
            raise UserError(f"{source}: tensor 'optimizer/{key[:60]}' does not fit the run's parameters")
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["optimizer"]["state"].items():
        if int(idx) not in shapes or not all(schema.is_number(v) for v in values.values()):  # keys: is_index
            raise UserError(f"{source}: field 'optimizer.state.{idx[:20]}' does not fit the run's parameters")
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": groups}


def _check_rng(rng: dict[str, torch.Tensor], source: object) -> dict[str, torch.Tensor]:
    """The generator states torch.set_rng_state takes: the CPU's, and 16 bytes per CUDA device."""
    for key, t in rng.items():
        if key == "cpu":
            size = torch.get_rng_state().numel()
        elif key.startswith("cuda") and key[4:].isdigit():
            size = 16
        else:
            size = None
        if size is None or t.dtype != torch.uint8 or t.numel() != size:
            raise UserError(f"{source}: tensor 'rng/{key[:40]}' is not a random generator state")
    return rng


# -- the run directory ----------------------------------------------------------------------------


class RunDir:
    """A run directory at ``path``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def _file(self, name: str) -> Path:
        return self.path / name

    # -- what is there

    def is_empty(self) -> bool:
        """Nothing there, or nothing but what a writer killed inside its first write left."""
        return not self.path.is_dir() or all(_is_stale_temp(p.name) for p in self.path.iterdir())

    def has_resume_state(self) -> bool:
        return self._file(_RESUME).exists()

    def has_model(self) -> bool:
        return self._file(_MODEL_JSON).exists()

    def has_summary(self) -> bool:
        return self._file(_SUMMARY).exists()

    def has_metrics(self) -> bool:
        return self._file(_METRICS).exists()

    @property
    def confusion_path(self) -> Path:
        return self._file(_CONFUSION)

    @property
    def analysis_dir(self) -> Path:
        return self._file(_ANALYSIS)

    def export_path(self, suffix: str) -> Path:
        """Where an export of the run's model goes by default: ``model<suffix>``."""
        return self._file(f"model{suffix}")

    def prepare(self) -> None:
        """Create the folder, and delete what killed writers left (temp files are never read:
        only renames publish)."""
        self.path.mkdir(parents=True, exist_ok=True)
        for tmp in self.path.iterdir():
            if _is_stale_temp(tmp.name) and (tmp.is_symlink() or tmp.is_file()):
                tmp.unlink(missing_ok=True)

    # -- model.json and the model

    def read_info(self) -> ModelInfo:
        if not self.path.is_dir():
            raise UserError(f"{self.path}: run directory not found")
        path = self._file(_MODEL_JSON)
        if not path.exists():
            raise UserError(f"{self.path}: not a densekit run directory (no {_MODEL_JSON})")
        return ModelInfo.from_json(files.read_json(path, MAX_JSON_BYTES), path)

    def write_info(self, info: ModelInfo) -> None:
        files.write_json(self._file(_MODEL_JSON), info.to_json())

    def data_dir(self, info: ModelInfo, dataset: str | None = None) -> str | None:
        """Where the run read its data, for reading ``dataset`` (default: the run's own) when the
        caller names no folder; None for another dataset than the run's, or none recorded."""
        if dataset is not None and dataset != info.dataset:
            return None
        return self.stored_data_dir(info.data_dir, info.dataset)

    def stored_data_dir(self, stored: str | None, dataset: str) -> str | None:
        """A data folder the run recorded (model.json's or its resume state's), used where the
        caller names none: a relative one is the run directory's, and the choice is said in
        the log, since the folder was chosen by whoever wrote the run."""
        if stored is None:
            return None
        folder = self.path / stored  # an absolute folder stays as it is
        log.info("reading %s from %s, where the run in %s read it (give a data folder to read another)",
                 dataset, folder, self.path)
        return str(folder)

    def build_model(self, info: ModelInfo | None = None) -> DenseNet:
        """The model model.json describes, pruned structure included, with fresh weights."""
        info = self.read_info() if info is None else info
        source = self._file(_MODEL_JSON)
        try:
            model = DenseNet(**info.model_kwargs)
        except (UserError, *_LOAD_ERRORS) as e:
            raise UserError(f"{source}: field 'model_kwargs': {_one_line(e)}") from e
        try:
            _apply_pruned_structure(model, info.pruned, source)
        except UserError:
            raise
        except _LOAD_ERRORS as e:
            raise UserError(f"{source}: field 'pruned': {_one_line(e)}") from e
        return model

    def load_model(self, device: str | torch.device = "cpu") -> DenseNet:
        """The trained model in eval mode on ``device``, with ``pretrained_cfg`` (classes,
        input size, mean and std: feed it ``(x / 255 - mean) / std``); float32 weights."""
        info = self.read_info()
        model = self.build_model(info)
        path = self._file(_WEIGHTS)
        state = files.read_tensors(path, _weights_limit(sum(p.numel() for p in model.parameters())))
        load_strictly(model, state, f"{path}: does not match {_MODEL_JSON}")
        _check_input_index(model, path)
        # after loading: a float64 1e300 is finite in the file and infinite in the model
        bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise UserError(f"{path}: {len(bad)} tensor(s) hold NaN or infinite values "
                            f"(first: {bad[0]}); the run diverged or the file is damaged")
        model.pretrained_cfg = pretrained_cfg(info, model, self.path)
        for name, block in model.named_modules():
            reason = block.fused_status() if hasattr(block, "fused_status") else None
            if reason and reason != "fused is off":
                log.info("%s: the reference path runs this block: %s", name, reason)
        return model.to(device).eval()

    def load_weights_into(self, model: nn.Module) -> None:
        """The run's saved weights into ``model`` (the run's own, being trained), strictly."""
        path = self._file(_WEIGHTS)
        state = files.read_tensors(path, _weights_limit(sum(p.numel() for p in model.parameters())))
        load_strictly(model, state, f"{path}: does not match the model")

    def save_weights(self, model: nn.Module) -> None:
        files.write(self._file(_WEIGHTS), files.tensor_bytes(model.state_dict()), replace=True)

    # -- the resume state

    def save_resume(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, rng: dict[str, torch.Tensor],
                    meta: dict) -> None:
        """The whole resume state as one safetensors file (tensors + JSON metadata)."""
        tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
        opt = optimizer.state_dict()
        extra: dict[str, dict] = {}
        for idx, state in opt["state"].items():
            for name, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer/{idx}/{name}"] = value
                else:
                    extra.setdefault(str(idx), {})[name] = value
        tensors.update({f"rng/{k}": v for k, v in rng.items()})
        meta = dict(meta, format_version=FORMAT_VERSION, optimizer={"param_groups": opt["param_groups"], "state": extra},
                    scheduler=scheduler.state_dict())
        # json_text: non-finite numbers (a test loss of an empty split) as null, which JSON has
        files.write(self._file(_RESUME), files.tensor_bytes(tensors, {_RESUME_KEY: json_text(meta)}), replace=True)

    def read_resume_meta(self) -> dict:
        """The JSON part of the resume state, every field checked (cheap: the tensors are not read)."""
        path = self._file(_RESUME)
        raw = files.read_safetensors_metadata(path, _weights_limit(schema.LIMITS.params) * 3, _RESUME_KEY)
        if raw is None:
            raise UserError(f"{path}: not a densekit resume file")
        if len(raw) > schema.MAX_RESUME_META:
            raise UserError(f"{path}: its resume state is {len(raw):,} characters, more than one can hold "
                            f"({schema.MAX_RESUME_META:,}); refusing to read it")
        meta = files.loads(raw, f"{path}: corrupt resume state")
        if not isinstance(meta, dict):
            raise UserError(f"{path}: corrupt resume state: expected a JSON object, found {type(meta).__name__}")
        return schema.check_resume(meta, path)

    def check_resumed_model(self, kwargs: dict, image_size: tuple[int, int], classes: int, in_chans: int) -> None:
        """The model a resume state's config describes (its model_args), bounded as a model.json's is."""
        schema.check_model(kwargs, tuple(image_size), classes, in_chans, f"{self._file(_RESUME)}: config.model_args")

    def load_resume(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[dict, dict[str, torch.Tensor]]:
        """Restore model, optimizer and scheduler, each checked against what this run builds;
        returns (meta, RNG states)."""
        path = self._file(_RESUME)
        meta = self.read_resume_meta()
        params = sum(p.numel() for p in model.parameters())
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in files.read_tensors(path, 3 * _weights_limit(params)).items():
            kind, _, rest = key.partition("/")
            if kind not in ("model", "optimizer", "rng"):
                raise UserError(f"{path}: unexpected tensor {key[:60]!r}")
            groups.setdefault(kind, {})[rest] = value
        rng = _check_rng(groups.get("rng", {}), path)
        opt_state = _optimizer_state(optimizer, groups.get("optimizer", {}), meta, path)
        load_strictly(model, groups.get("model", {}), f"{path}: resume state does not fit this model")
        _check_input_index(model, path)
        fresh = scheduler.state_dict()
        schema.check_like(meta["scheduler"], fresh, path, "scheduler")
        if meta["scheduler"]["base_lrs"] != fresh["base_lrs"] or meta["scheduler"]["last_epoch"] != meta["global_step"]:
            raise UserError(f"{path}: field 'scheduler' does not fit the run (its base learning rates or step)")
        try:
            # how the update runs (fused, foreach) is this process's choice, not the run's state:
            # a run begun on the CPU and resumed on CUDA must keep the fused kernel its graph needs
            how = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
            optimizer.load_state_dict(opt_state)
            for group, kept in zip(optimizer.param_groups, how):
                group.update(kept)
            _match_layouts(optimizer)
            scheduler.load_state_dict(meta["scheduler"])
        except _LOAD_ERRORS as e:
            raise UserError(f"{path}: resume state does not fit this model and optimizer: {_one_line(e)}") from e
        return meta, rng

    # -- records

    def write_metrics(self, history: list[dict]) -> None:
        """Rewrite metrics.jsonl whole from the records the resume state holds, so the two agree."""
        files.write(self._file(_METRICS), "".join(json_text(r) + "\n" for r in history).encode(), replace=True)

    def read_metrics(self) -> list[dict]:
        """The epoch records, one object per finished epoch, each checked."""
        path = self._file(_METRICS)
        if not path.exists():
            raise UserError(f"{path}: file not found (has the run finished an epoch?)")
        records = []
        for n, line in enumerate(files.read_lines(path, MAX_METRICS_BYTES), 1):
            if not line.strip():
                continue
            records.append(files.loads(line, f"{path}: line {n}"))
        return schema.check_records(records, path)

    def write_summary(self, summary: object) -> None:
        files.write_json(self._file(_SUMMARY), summary)

    def read_summary(self) -> dict:
        path = self._file(_SUMMARY)
        return schema.check_summary(files.read_json(path, MAX_JSON_BYTES), path)

    def write_curves(self, png: bytes) -> None:
        files.write(self._file(_CURVES), png, replace=True)

    def write_figure(self, path: str | os.PathLike, png: bytes) -> Path:
        """A figure of the run, replacing the one an earlier run of the same command drew."""
        path = Path(path)
        try:
            files.write(path, png, replace=True)
        except OSError as e:  # a read-only run directory, a full disk
            raise UserError(f"{path}: cannot write the figure: {e.strerror or e}") from e
        return path

    # -- a new run directory, whole

    @classmethod
    def create(cls, out: str | os.PathLike, model: nn.Module, info: ModelInfo, summary: object) -> "RunDir":
        """Write a new run directory (weights, model.json, summary.json) into a hidden sibling
        folder, then rename it to ``out``: a kill leaves no half run there, and a folder that
        someone filled meanwhile is not touched (the rename fails on a non-empty directory)."""
        out = Path(out)
        files.refuse_nonempty(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name[:100]}.", suffix=".new-run", dir=out.parent))
        try:
            os.chmod(tmp, 0o777 & ~files.UMASK)  # mkdtemp makes 0700; give the folder the mode mkdir would
            run = cls(tmp)
            run.save_weights(model)
            run.write_info(info)
            run.write_summary(summary)
            try:
                os.rename(tmp, out)  # replaces an empty folder only
            except OSError as e:
                raise ArgumentError(f"{{out}} {text(out)}: {text(e.strerror or e)}; choose another "
                                    "(densekit never overwrites files)") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(out)
