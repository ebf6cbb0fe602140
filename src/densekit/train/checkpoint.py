"""Run directories: what a training run writes, and how it is read back.

A run directory holds

- ``model.json``: how to rebuild the model and feed it (registered name, the full
  :class:`~densekit.models.DenseNet` arguments, dataset, class names, preprocessing) and,
  for a pruned model (``densekit prune``), ``pruned``: the sizes of its pruned layers;
- ``model.safetensors``: the model's ``state_dict`` (weights and BN statistics);
- ``resume.safetensors``: the resume state, one file so that it is replaced in one step;
  tensors (model, optimizer buffers, RNG states) as safetensors, everything else (epoch,
  step, scheduler, optimizer hyper-parameters, config, metrics so far) as JSON in its
  metadata. No pickle anywhere: loading a run dir cannot run code;
- ``metrics.jsonl``: one object per finished epoch: ``epoch`` (from 1), ``train_loss``
  (with the recipe's label smoothing), ``train_acc`` (on augmented batches), ``test_loss``,
  ``test_acc`` (full test split), ``lr`` (of the epoch's last step), ``seconds`` (training
  only: no evaluation, no checkpoint writes);
- ``curves.png``: loss and accuracy against epoch, drawn when the run ends or stops;
- ``summary.json``: model, dataset, params, macs, epochs, steps, finished, train_seconds,
  test_accuracy (fraction of the full test split; ``densekit eval`` reproduces it),
  device, precision, torch version, the recipe with every number, ...;
- ``confusion.png``, once ``densekit eval`` has run.

Every file is written to a temporary name in the same directory, flushed, fsynced and
renamed over the old one, so a kill at any moment leaves the previous version whole.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import tempfile
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from ..errors import UserError
from ..models import DenseLayer, DenseNet
from ..models.layers import check_channel_index

log = logging.getLogger(__name__)

MODEL_JSON = "model.json"
WEIGHTS = "model.safetensors"
RESUME = "resume.safetensors"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CURVES = "curves.png"
CONFUSION = "confusion.png"

FORMAT = "densekit.run"
FORMAT_VERSION = 2  # the newest run files this densekit reads; 2 added model.json's "pruned"
# What files without a pruned model are written as: densekit 0.1 reads them. A pruned run's
# model.json says 2, so that an older densekit refuses it as newer instead of failing on shapes.
_PLAIN_VERSION = 1
_RESUME_KEY = "densekit.resume"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()


# -- atomic writes ------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, data: bytes, replace: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a part.

    With ``replace=False`` an existing ``path`` is never replaced, not even one that appears
    while the data are written: the finished temp file is hard-linked into place, which fails
    if anything is there (FileExistsError)."""
    path = Path(path)
    # the temp name must fit where the name fits: a long name's temp keeps only its start
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600; give the file the mode open() would
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
    # the rename itself lives in the directory: sync it too, or a power cut may undo it
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


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


_RUN_FILES = (MODEL_JSON, WEIGHTS, RESUME, METRICS, SUMMARY, CURVES, CONFUSION)


def is_stale_temp(name: str) -> bool:
    """Whether ``name`` is the temporary file of an ``atomic_write`` to one of a run's files."""
    return name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in _RUN_FILES)


def remove_stale_temps(run_dir: Path) -> None:
    """Delete temp files a killed writer left behind (never read: only renames publish)."""
    for tmp in run_dir.iterdir():
        if is_stale_temp(tmp.name):
            tmp.unlink(missing_ok=True)


def _plain(obj: object) -> object:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN; strict readers (jq, browsers) reject Python's "NaN"
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def dumps(obj: object, indent: int | None = None) -> str:
    """JSON text with non-finite numbers as null."""
    return json.dumps(_plain(obj), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, obj: object, replace: bool = True) -> None:
    atomic_write(path, (dumps(obj, indent=2) + "\n").encode(), replace=replace)


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """Rewrite metrics.jsonl whole from the records the resume state holds, so the two agree."""
    atomic_write(run_dir / METRICS, "".join(dumps(r) + "\n" for r in history).encode())


def _tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    # safetensors stores dense row-major data: channels-last weights are copied to that layout
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return safetensors.torch.save(plain, metadata=metadata)


def save_weights(path: str | os.PathLike, model: nn.Module) -> None:
    atomic_write(path, _tensor_bytes(model.state_dict()))


# -- model.json and loading a trained model -----------------------------------------


def model_info(name: str, model_args: dict, kwargs: dict, dataset, data_dir: str | None,
               pruned: dict | None = None) -> dict:
    """The content of model.json: everything needed to rebuild the model and feed it;
    ``pruned`` (see :func:`pruned_structure`) is written only for a pruned model."""
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if pruned else _PLAIN_VERSION,
        "model": name,
        "model_args": model_args,   # what the user changed from the registered variant
        "model_kwargs": kwargs,     # the full DenseNet arguments: rebuilds even if the variant changes
        "dataset": dataset.name,
        "data_dir": data_dir,
        "classes": list(dataset.classes),
        "num_classes": dataset.num_classes,
        "preprocessing": {
            "in_chans": dataset.in_chans,
            "image_size": list(dataset.image_size),
            "mean": list(dataset.mean),  # per channel, [0, 1] units, of the training images
            "std": list(dataset.std),
            "resize": "bilinear, antialiased",
        },
    }
    return with_pruned(info, pruned)


def with_pruned(info: dict, pruned: dict | None) -> dict:
    """model.json ``info`` describing its model pruned to ``pruned`` (:func:`pruned_structure`;
    empty or None: not pruned), with the format version that such a file needs."""
    info = {k: v for k, v in info.items() if k != "pruned"}
    if pruned:
        info.update(pruned=pruned, format_version=FORMAT_VERSION)
    return info


def read_model_info(run_dir: str | os.PathLike) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run directory not found")
    path = run_dir / MODEL_JSON
    if not path.is_file():
        raise UserError(f"{run_dir}: not a densekit run directory (no {MODEL_JSON})")
    info = read_json(path)
    if info.get("format") != FORMAT:
        raise UserError(f"{path}: not a densekit run description (format {info.get('format')!r})")
    _check_version(info, path)
    # model.json travels between people and editors: check every field the loaders use, so
    # that a damaged one is named here rather than failing deep inside inference
    _field(info, "model", str, path)
    _field(info, "model_kwargs", dict, path)
    classes = _field(info, "classes", list, path)
    if not classes or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{path}: field 'classes' must be a non-empty list of names")
    pre = _field(info, "preprocessing", dict, path)
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
    return info


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_KINDS = {dict: "a JSON object", list: "a list", str: "a string", int: "an integer", float: "a number"}


def _field(obj: dict, key: str, kind: type, path: Path):
    if key not in obj:
        raise UserError(f"{path}: missing field {key!r}")
    value = obj[key]
    ok = _is_number(value) if kind is float else _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        raise UserError(f"{path}: field {key!r} must be {_KINDS[kind]}, got {type(value).__name__}")
    return value


def _check_version(obj: dict, path: Path) -> None:
    version = obj.get("format_version", 0)
    if not _is_int(version):
        raise UserError(f"{path}: field 'format_version' must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise UserError(f"{path}: written by a newer densekit (format version {version})")


def _check_fits(model: DenseNet, info: dict, path: Path) -> None:
    """The model model.json builds must take the images and give the classes it describes."""
    pre = info["preprocessing"]
    problems = []
    if model.features_only or model.spatial_dims != 2:
        problems.append("it is not a 2D classifier")
    if model.num_classes != len(info["classes"]):
        problems.append(f"it has {model.num_classes} outputs for {len(info['classes'])} classes")
    if model.in_chans != pre["in_chans"]:
        problems.append(f"it takes {model.in_chans} channels, the preprocessing gives {pre['in_chans']}")
    if model.min_input_size > min(pre["image_size"]):
        problems.append(f"it needs images of at least {model.min_input_size} px, the preprocessing gives "
                        f"{'x'.join(map(str, pre['image_size']))}")
    if problems:
        raise UserError(f"{path}: the model does not fit its own description: {'; '.join(problems)}")


def _load_strictly(model: nn.Module, state: dict[str, torch.Tensor], context: str) -> None:
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


def build_model(info: dict, source: object = MODEL_JSON) -> DenseNet:
    """The model model.json describes, pruned structure included, with fresh weights."""
    try:
        model = DenseNet(**info["model_kwargs"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: cannot rebuild the model: {e}") from e
    apply_pruned_structure(model, info.get("pruned") or {}, source)
    return model


# -- pruned structure ---------------------------------------------------------------


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


def apply_pruned_structure(model: nn.Module, structure: object, source: object = MODEL_JSON) -> None:
    """Shrink a freshly built model's layers to ``structure`` (from :func:`pruned_structure`),
    so that a pruned run's weights load strictly; the kept channels come with the weights."""
    if not isinstance(structure, dict):
        raise UserError(f"{source}: field 'pruned' must be a JSON object, got {type(structure).__name__}")
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


def pretrained_cfg(info: dict, run_dir: Path) -> dict:
    """What a caller needs to feed the model, in timm's ``pretrained_cfg`` spirit."""
    pre = info["preprocessing"]
    h, w = pre["image_size"]
    return dict(
        model=info["model"],
        run_dir=str(run_dir),
        dataset=info.get("dataset"),
        classes=list(info["classes"]),
        num_classes=len(info["classes"]),
        in_chans=pre["in_chans"],
        image_size=(h, w),
        input_size=(pre["in_chans"], h, w),
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise UserError(f"{path}: cannot read safetensors file: {e}") from e


def load_run_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> DenseNet:
    """Rebuild a trained model from ``run_dir`` in eval mode, ready for inference.

    The returned model carries ``model.pretrained_cfg``, a dict with ``classes``,
    ``in_chans``, ``image_size`` (H, W), ``input_size`` (C, H, W), ``mean`` and ``std``
    (per channel, for inputs scaled to [0, 1]): feed it ``(x / 255 - mean) / std``.
    ``device`` is "cpu", "cuda", "cuda:N" or "auto"; the weights are float32.
    """
    from .runtime import select_runtime

    run_dir = Path(run_dir)
    info = read_model_info(run_dir)
    model = build_model(info, run_dir / MODEL_JSON)
    _check_fits(model, info, run_dir / MODEL_JSON)
    state = read_state_dict(run_dir / WEIGHTS)
    _load_strictly(model, state, f"{run_dir / WEIGHTS}: does not match {MODEL_JSON}")
    _check_input_index(model, run_dir / WEIGHTS)
    bad = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise UserError(f"{run_dir / WEIGHTS}: {len(bad)} tensor(s) hold NaN or infinite values "
                        f"(first: {bad[0]}); the run diverged or the file is damaged")
    model.pretrained_cfg = pretrained_cfg(info, run_dir)
    return model.to(select_runtime(str(device)).device).eval()


# -- resume state -------------------------------------------------------------------


def save_resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, rng: dict[str, torch.Tensor],
                meta: dict) -> None:
    """Write the whole resume state as one safetensors file (tensors + JSON metadata)."""
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
    meta = dict(meta, format_version=_PLAIN_VERSION,
                optimizer={"param_groups": opt["param_groups"], "state": extra},
                scheduler=scheduler.state_dict())
    atomic_write(path, _tensor_bytes(tensors, {_RESUME_KEY: json.dumps(meta)}))


def read_resume_meta(path: Path) -> dict:
    """The JSON part of a resume file (cheap: the tensors are not read)."""
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
    return meta


# What the trainer reads from a resume state's JSON, and its type.
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


def load_resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore model, optimizer and scheduler from ``path``; returns (meta, RNG states)."""
    meta = read_resume_meta(path)
    tensors = read_state_dict(path)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        kind, _, rest = key.partition("/")
        groups.setdefault(kind, {})[rest] = value
    _load_strictly(model, groups.get("model", {}), f"{path}: resume state does not fit this model")
    _check_input_index(model, path)
    try:
        state: dict[int, dict] = {}
        for key, value in groups.get("optimizer", {}).items():
            idx, _, name = key.partition("/")
            state.setdefault(int(idx), {})[name] = value
        for idx, values in meta["optimizer"]["state"].items():
            state.setdefault(int(idx), {}).update(values)
        # how the update runs (fused, foreach) is this process's choice, not the run's state:
        # a run begun on the CPU and resumed on CUDA must keep the fused kernel its graph needs
        how = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
        for group, kept in zip(optimizer.param_groups, how):
            group.update(kept)
        _match_layouts(optimizer)
        scheduler.load_state_dict(meta["scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{path}: resume state does not fit this model and optimizer: {e}") from e
    return meta, groups.get("rng", {})
