"""The run directory: what a training run writes, and the one place that reads it back.

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

Every file is written to a temporary name in the same folder, flushed, fsynced and renamed
over the old one, so a kill at any moment leaves the previous version whole. Files that are
not the run's own (an export, an analysis, a new pruned run) are *published*: linked into
place only where nothing is, so nothing a user had is ever replaced.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from .checks import ArgumentError, text
from .errors import UserError
from .models import DenseLayer, DenseNet
from .models.layers import check_channel_index
from .results import json_text

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

FORMAT = "densekit.run"
FORMAT_VERSION = 1  # the newest run files this densekit reads
_RESUME_KEY = "densekit.resume"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


# -- writing files --------------------------------------------------------------------


def _write(path: Path, data: bytes, replace: bool) -> None:
    """Put ``data`` at ``path`` so that readers see the old file or the new one, never a part.

    ``replace=False`` never replaces anything, not even a file that appears while the data are
    written: the finished temp file is hard-linked into place, which fails if a name is there."""
    # the temp name must fit where the name fits: a long name's temp keeps only its start
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _link_new(tmp: str, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:  # named by the target, not the temp file os.link reports
        raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
    except OSError:  # a filesystem without hard links: check, then rename (a tiny race)
        if path.exists() or path.is_symlink():
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
        os.replace(tmp, path)
        return
    Path(tmp).unlink()


def _sync_folder(folder: Path) -> None:
    # a rename lives in the folder: sync it too, or a power cut may undo it
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` only if nothing is there, never as a half file: not even a
    file that appeared since the caller last looked is replaced. Returns the path."""
    path = Path(path)
    try:
        _write(path, data, replace=False)
    except FileExistsError:
        raise UserError(f"{path}: already exists; refusing to overwrite it") from None
    except OSError as e:  # a read-only folder, a full disk: the user's to fix
        raise UserError(f"{path}: cannot write: {e.strerror or e}") from e
    return path


def publish_json(path: str | os.PathLike, obj: object) -> Path:
    return publish(path, (json_text(obj, indent=2) + "\n").encode())


def refuse_existing(path: str | os.PathLike) -> Path:
    """Fail early, before minutes of work, where :func:`publish` would fail at the end."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a file name")
    if path.exists() or path.is_symlink():
        raise UserError(f"{path}: already exists; refusing to overwrite it (remove it or choose another name)")
    if not path.parent.is_dir():
        raise UserError(f"{path.parent}: folder does not exist (for {path.name})")
    return path


def _is_stale_temp(name: str) -> bool:
    """Is ``name`` the temporary file of a write to one of a run's own files?"""
    return name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in _OWN_FILES)


# -- reading files ----------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise UserError(f"{path}: cannot read safetensors file: {e}") from e


def _tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    # safetensors stores dense row-major data: channels-last weights are copied to that layout
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return safetensors.torch.save(plain, metadata=metadata)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_KINDS = {dict: "a JSON object", list: "a list", str: "a string", int: "an integer", float: "a number"}


def _field(obj: dict, key: str, kind: type, path: object):
    if key not in obj:
        raise UserError(f"{path}: missing field {key!r}")
    value = obj[key]
    ok = _is_number(value) if kind is float else _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        raise UserError(f"{path}: field {key!r} must be {_KINDS[kind]}, got {type(value).__name__}")
    return value


def _check_version(obj: dict, path: object) -> None:
    version = obj.get("format_version", 0)
    if not _is_int(version):
        raise UserError(f"{path}: field 'format_version' must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise UserError(f"{path}: written by a newer densekit (format version {version})")


# -- model.json -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a run's images are fed to its model: ``(x / 255 - mean) / std`` per channel of
    images resized to ``image_size`` (bilinear, antialiased)."""

    in_chans: int
    image_size: tuple[int, int]  # (height, width)
    mean: tuple[float, ...]      # per channel, [0, 1] units, of the training images
    std: tuple[float, ...]
    resize: str = "bilinear, antialiased"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """model.json: everything needed to rebuild a run's model and feed it."""

    model: str                 # the registered name
    model_args: dict           # what the user changed from the registered variant
    model_kwargs: dict         # the full DenseNet arguments: rebuilds even if the variant changes
    dataset: str
    data_dir: str | None       # where the training data was read from (absolute)
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    pruned: dict = dataclasses.field(default_factory=dict)  # {layer: {"inputs": n|None, "width": n|None}}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def with_pruned(self, structure: dict) -> "ModelInfo":
        return dataclasses.replace(self, pruned=dict(structure))

    def to_json(self) -> dict:
        pre = self.preprocessing
        info = dict(format=FORMAT, format_version=FORMAT_VERSION, model=self.model, model_args=self.model_args,
                    model_kwargs=self.model_kwargs, dataset=self.dataset, data_dir=self.data_dir,
                    classes=list(self.classes), num_classes=self.num_classes,
                    preprocessing=dict(in_chans=pre.in_chans, image_size=list(pre.image_size), mean=list(pre.mean),
                                       std=list(pre.std), resize=pre.resize))
        if self.pruned:
            info["pruned"] = self.pruned
        return info

    @classmethod
    def from_json(cls, info: dict, path: object) -> "ModelInfo":
        """Checks every field the loaders use, so that a damaged one is named here rather
        than failing deep inside inference (model.json travels between people and editors)."""
        if info.get("format") != FORMAT:
            raise UserError(f"{path}: not a densekit run description (format {info.get('format')!r})")
        _check_version(info, path)
        model = _field(info, "model", str, path)
        kwargs = _field(info, "model_kwargs", dict, path)
        model_args = info.get("model_args") or {}
        if not isinstance(model_args, dict):
            raise UserError(f"{path}: field 'model_args' must be a JSON object, got {type(model_args).__name__}")
        dataset = _field(info, "dataset", str, path)
        data_dir = info.get("data_dir")
        if data_dir is not None and not isinstance(data_dir, str):
            raise UserError(f"{path}: field 'data_dir' must be a string or null, got {type(data_dir).__name__}")
        classes = _field(info, "classes", list, path)
        if not classes or not all(isinstance(c, str) for c in classes):
            raise UserError(f"{path}: field 'classes' must be a non-empty list of names")
        pruned = info.get("pruned") or {}
        if not isinstance(pruned, dict):
            raise UserError(f"{path}: field 'pruned' must be a JSON object, got {type(pruned).__name__}")
        return cls(model, model_args, kwargs, dataset, data_dir, tuple(classes),
                   _preprocessing(_field(info, "preprocessing", dict, path), path), pruned)


def _preprocessing(pre: dict, path: object) -> Preprocessing:
    in_chans = pre.get("in_chans")
    if in_chans not in (1, 3) or isinstance(in_chans, bool):
        raise UserError(f"{path}: field 'preprocessing.in_chans' must be 1 or 3, got {in_chans!r}")
    size = pre.get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(s) and s >= 1 for s in size)):
        raise UserError(f"{path}: field 'preprocessing.image_size' must be [height, width] in pixels, got {size!r}")
    for key, low in (("mean", -math.inf), ("std", 0.0)):
        values = pre.get(key)
        if not (isinstance(values, list) and len(values) == in_chans
                and all(_is_number(v) and math.isfinite(v) and v > low for v in values)):
            raise UserError(f"{path}: field 'preprocessing.{key}' must list {in_chans} finite number(s)"
                            f"{' > 0' if low == 0 else ''}, got {values!r}")
    return Preprocessing(in_chans, (size[0], size[1]), tuple(pre["mean"]), tuple(pre["std"]))


def pretrained_cfg(info: ModelInfo, model: DenseNet, run_dir: Path) -> dict:
    """timm's ``pretrained_cfg`` of a trained model, with its classes and where it came from."""
    pre = info.preprocessing
    cfg = model.default_pretrained_cfg(pre.image_size)
    cfg.update(architecture=info.model, model=info.model, run_dir=str(run_dir), dataset=info.dataset,
               classes=list(info.classes), num_classes=info.num_classes, in_chans=pre.in_chans,
               image_size=tuple(pre.image_size), mean=tuple(pre.mean), std=tuple(pre.std), crop_pct=1.0)
    return cfg


# -- the pruned structure -----------------------------------------------------------------


def pruned_structure(model: nn.Module) -> dict:
    """How far each pruned dense layer differs from the stock one, as model.json stores it:
    ``{"features.denseblock1.denselayer2": {"inputs": 20, "width": 36}, ...}``, ``inputs`` the
    number of channels it reads (None: all), ``width`` its bottleneck's (None: bn_size * k).
    Only the sizes: which channels a layer reads is its ``input_index``, in the weights."""
    structure = {}
    for name, m in model.named_modules():
        if not isinstance(m, DenseLayer):
            continue
        inputs = None if m.input_index is None else m.input_index.numel()
        width = m.conv1.out_channels if m.has_bottleneck else None
        if width == m.bn_size * m.growth_rate:
            width = None
        if inputs is not None or width is not None:
            structure[name] = {"inputs": inputs, "width": width}
    return structure


def _apply_pruned_structure(model: nn.Module, structure: dict, source: object) -> None:
    """Shrink a freshly built model's layers to ``structure``, so that a pruned run's weights
    load strictly; the kept channels come with the weights."""
    for name, sizes in structure.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            layer = None
        if not isinstance(layer, DenseLayer) or not isinstance(sizes, dict):
            raise UserError(f"{source}: field 'pruned' names {name!r}, which is not a dense layer of the model")
        keep = {key: sizes.get(key) for key in ("inputs", "width")}
        if not all(v is None or (_is_int(v) and v >= 1) for v in keep.values()):
            raise UserError(f"{source}: field 'pruned.{name}' must give inputs and width as integers >= 1 or null, "
                            f"got {sizes!r}")
        try:
            layer.prune_(*(None if v is None else torch.arange(v) for v in keep.values()))
        except ValueError as e:
            raise UserError(f"{source}: cannot rebuild the pruned layer {name}: {e}") from e


def _check_input_index(model: nn.Module, source: object) -> None:
    """Every pruned layer's ``input_index`` (loaded from the weights) must name channels its
    block has, each once: a damaged file would otherwise fail, or read wrong maps, in forward."""
    for name, m in model.named_modules():
        if isinstance(m, DenseLayer) and m.input_index is not None:
            try:
                check_channel_index(f"{name}.input_index", m.input_index, m.in_channels)
            except ValueError as e:
                raise UserError(f"{source}: {e}; the file is damaged") from e


def load_strictly(model: nn.Module, state: dict[str, torch.Tensor], context: str) -> None:
    """``load_state_dict(strict=True)``, with a short account of what differs when it fails
    (torch's own message lists every tensor: thousands of characters for a DenseNet)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} tensor(s) of another shape (first: {k} is "
                        f"{list(state[k].shape)} in the file, {list(expected[k].shape)} in the model)")
    if missing:
        problems.append(f"{len(missing)} missing (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    if problems:
        raise UserError(f"{context}: {'; '.join(problems)}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # anything the checks above did not foresee
        raise UserError(f"{context}: {e}") from e


# -- the resume state ---------------------------------------------------------------------

# What a resume state's JSON holds, and its type.
_RESUME_FIELDS = dict(config=dict, data=dict, epoch=int, step_in_epoch=int, global_step=int, steps_per_epoch=int,
                      total_steps=int, stats=dict, history=list, train_seconds=float, optimizer=dict, scheduler=dict)


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    # Buffers come back row-major; give each its parameter's layout (channels-last on CUDA)
    # so that the fused multi-tensor update keeps its fast path.
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][name] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, _, name = key.partition("/")
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["optimizer"]["state"].items():
        state.setdefault(int(idx), {}).update(values)
    # how the update runs (fused, foreach) is this process's choice, not the run's state: a
    # run begun on the CPU and resumed on CUDA must keep the fused kernel its graph needs
    how = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    for group, kept in zip(optimizer.param_groups, how):
        group.update(kept)
    _match_layouts(optimizer)


# -- the run directory ---------------------------------------------------------------------


class RunDir:
    """A run directory at ``path``: the only code that knows its files' names and formats."""

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
        return self._file(_RESUME).is_file()

    def has_model(self) -> bool:
        return self._file(_MODEL_JSON).is_file()

    def has_summary(self) -> bool:
        return self._file(_SUMMARY).is_file()

    def has_metrics(self) -> bool:
        return self._file(_METRICS).is_file()

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
            if _is_stale_temp(tmp.name):
                tmp.unlink(missing_ok=True)

    # -- model.json and the model

    def read_info(self) -> ModelInfo:
        if not self.path.is_dir():
            raise UserError(f"{self.path}: run directory not found")
        path = self._file(_MODEL_JSON)
        if not path.is_file():
            raise UserError(f"{self.path}: not a densekit run directory (no {_MODEL_JSON})")
        return ModelInfo.from_json(_read_json(path), path)

    def write_info(self, info: ModelInfo) -> None:
        _write(self._file(_MODEL_JSON), (json_text(info.to_json(), indent=2) + "\n").encode(), replace=True)

    def build_model(self, info: ModelInfo | None = None) -> DenseNet:
        """The model model.json describes, pruned structure included, with fresh weights."""
        info = self.read_info() if info is None else info
        source = self._file(_MODEL_JSON)
        try:
            model = DenseNet(**info.model_kwargs)
        except (TypeError, ValueError) as e:
            raise UserError(f"{source}: cannot rebuild the model: {e}") from e
        _apply_pruned_structure(model, info.pruned, source)
        _check_fits(model, info, source)
        return model

    def load_model(self, device: str | torch.device = "cpu") -> DenseNet:
        """The trained model in eval mode on ``device``, with ``pretrained_cfg`` (classes,
        input size, mean and std: feed it ``(x / 255 - mean) / std``); float32 weights."""
        info = self.read_info()
        model = self.build_model(info)
        path = self._file(_WEIGHTS)
        state = _read_tensors(path)
        load_strictly(model, state, f"{path}: does not match {_MODEL_JSON}")
        _check_input_index(model, path)
        bad = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise UserError(f"{path}: {len(bad)} tensor(s) hold NaN or infinite values "
                            f"(first: {bad[0]}); the run diverged or the file is damaged")
        model.pretrained_cfg = pretrained_cfg(info, model, self.path)
        for name, block in model.named_modules():
            reason = block.fused_status() if hasattr(block, "fused_status") else None
            if reason and reason != "fused is off":
                log.info("%s: the reference path runs this block: %s", name, reason)
        return model.to(device).eval()

    def save_weights(self, model: nn.Module) -> None:
        _write(self._file(_WEIGHTS), _tensor_bytes(model.state_dict()), replace=True)

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
        _write(self._file(_RESUME), _tensor_bytes(tensors, {_RESUME_KEY: json.dumps(meta)}), replace=True)

    def read_resume_meta(self, config_keys: tuple[str, ...] = ()) -> dict:
        """The JSON part of the resume state (cheap: the tensors are not read); its config
        must hold ``config_keys``."""
        path = self._file(_RESUME)
        try:
            with safetensors.safe_open(path, framework="pt") as f:
                raw = (f.metadata() or {}).get(_RESUME_KEY)
        except FileNotFoundError:
            raise UserError(f"{path}: file not found") from None
        except Exception as e:
            raise UserError(f"{path}: cannot read the resume state: {e}") from e
        if raw is None:
            raise UserError(f"{path}: not a densekit resume file")
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: corrupt resume state: {e}") from e
        if not isinstance(meta, dict):
            raise UserError(f"{path}: corrupt resume state: expected a JSON object, found {type(meta).__name__}")
        _check_version(meta, path)
        for key, kind in _RESUME_FIELDS.items():
            _field(meta, key, kind, path)
        lacking = [k for k in config_keys if k not in meta["config"]]
        if lacking:
            raise UserError(f"{path}: corrupt resume state: its config lacks {', '.join(lacking)}")
        return meta

    def load_resume(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[dict, dict[str, torch.Tensor]]:
        """Restore model, optimizer and scheduler; returns (meta, RNG states)."""
        path = self._file(_RESUME)
        meta = self.read_resume_meta()
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in _read_tensors(path).items():
            kind, _, rest = key.partition("/")
            groups.setdefault(kind, {})[rest] = value
        load_strictly(model, groups.get("model", {}), f"{path}: resume state does not fit this model")
        _check_input_index(model, path)
        try:
            _restore_optimizer(optimizer, groups.get("optimizer", {}), meta)
            scheduler.load_state_dict(meta["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"{path}: resume state does not fit this model and optimizer: {e}") from e
        return meta, groups.get("rng", {})

    # -- records

    def write_metrics(self, history: list[dict]) -> None:
        """Rewrite metrics.jsonl whole from the records the resume state holds, so the two agree."""
        _write(self._file(_METRICS), "".join(json_text(r) + "\n" for r in history).encode(), replace=True)

    def read_metrics(self) -> list[dict]:
        """The epoch records, one object per finished epoch."""
        path = self._file(_METRICS)
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            raise UserError(f"{path}: file not found (has the run finished an epoch?)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read: {e}") from e
        records = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {n} is not JSON: {e}") from e
            if not isinstance(record, dict):
                raise UserError(f"{path}: line {n} is not a JSON object")
            records.append(record)
        return records

    def write_summary(self, summary: object) -> None:
        _write(self._file(_SUMMARY), (json_text(summary, indent=2) + "\n").encode(), replace=True)

    def read_summary(self) -> dict:
        return _read_json(self._file(_SUMMARY))

    def write_curves(self, png: bytes) -> None:
        _write(self._file(_CURVES), png, replace=True)

    def write_figure(self, path: str | os.PathLike, png: bytes) -> Path:
        """A figure of the run, replacing the one an earlier run of the same command drew."""
        path = Path(path)
        try:
            _write(path, png, replace=True)
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
        refuse_nonempty(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name[:100]}.", suffix=".new-run", dir=out.parent))
        try:
            os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; give the folder the mode mkdir would
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


def refuse_nonempty(out: str | os.PathLike, argument: str = "out") -> Path:
    """Refuse a folder that holds anything (or a file where a folder should go); ``argument``
    names what gave the folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"{{{argument}}} {text(out)}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ArgumentError(f"{{{argument}}} {text(out)}: directory is not empty; choose another "
                            "(densekit never overwrites files)")
    return out


def _check_fits(model: DenseNet, info: ModelInfo, path: object) -> None:
    """The model model.json builds must take the images and give the classes it describes."""
    pre = info.preprocessing
    problems = []
    if model.features_only or model.spatial_dims != 2:
        problems.append("it is not a 2D classifier")
    if model.num_classes != info.num_classes:
        problems.append(f"it has {model.num_classes} outputs for {info.num_classes} classes")
    if model.in_chans != pre.in_chans:
        problems.append(f"it takes {model.in_chans} channels, the preprocessing gives {pre.in_chans}")
    if model.min_input_size > min(pre.image_size):
        problems.append(f"it needs images of at least {model.min_input_size} px, the preprocessing gives "
                        f"{'x'.join(map(str, pre.image_size))}")
    if problems:
        raise UserError(f"{path}: the model does not fit its own description: {'; '.join(problems)}")
