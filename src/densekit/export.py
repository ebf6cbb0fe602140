"""Export a DenseNet for inference outside densekit: ONNX (checked in onnxruntime) or a
``torch.export`` program (``.pt2``).

What is exported is the model in eval mode on the plain reference path (torchvision's
concatenating blocks): the fused blocks run native C kernels and autograd functions that
no exporter can see, and in eval mode both paths compute the same function (the parity
tests pin it). For ONNX, a 2D DenseNet's reference path is traced from a copy with its
channel counts padded to a multiple (``export_aligned.py``: the same function, faster in
onnxruntime). The caller's model is never touched: the export works on a copy.

The file carries what a consumer needs besides the weights (docs/design.md, "Export"):
the class names, mean and std, the input size and layout, the model's name and the
densekit version, as ONNX ``metadata_props`` or as the ``.pt2`` archive's extra file
``densekit.json``; :func:`read_metadata` reads either back.

A file is checked before it is published: the exported graph runs on a random batch of
another size than the traced one (which proves the batch axis is free) and its output is
compared with PyTorch's eager output of the caller's model as it runs by default (fused
path included). It is then written to a temporary name in the target folder and linked
into place, which fails if the target exists: an existing file is never replaced, and a
kill at any moment leaves either no file or the whole one (at worst beside a hidden temp file).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import io
import json
import os
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checks
from .errors import UserError
from .export_aligned import ALIGN, aligned_copy
from .models import DenseNet, set_fused
from .results import Result
from .rundir import RunDir, publish, pruned_counts, refuse_existing

__all__ = ["FORMATS", "ExportReport", "export_model", "export_onnx", "export_pt2", "read_metadata"]

FORMATS = ("onnx", "pt2")
SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2"}
INSTALL_HINT = "pip install 'densekit[export]'"

# Opsets each ONNX exporter writes in torch 2.14. The TorchScript-based one supports up to 20
# (asked for more, it warns that 20 is its highest), and BatchNormalization before opset 9
# takes attributes onnxruntime rejects; the torch.export-based one implements 18 and up and,
# asked for less, logs a warning and keeps 18.
OPSETS = {"torchscript": (9, 20), "dynamo": (18, 23)}

# Default tolerance of the check, relative to the largest |output| of the batch: fp32 summed in
# other orders (onnxruntime's own kernels and fusions) differs by about 1e-7 to 1e-6.
RTOL = 1e-4

# The metadata values that are not plain strings are stored as JSON text.
_JSON_KEYS = ("channel_alignment", "model_args", "pruned_layers", "pruned_blocks", "classes", "num_classes", "mean",
              "std", "input_size", "spatial_dims", "outputs", "feature_info")
_PT2_EXTRA = "densekit.json"
_LAYOUTS = {1: "NCL", 2: "NCHW", 3: "NCDHW"}


@dataclass
class _Subject:
    """What is exported: the reference model, the copy to trace, and what describes them."""

    reference: nn.Module     # the caller's model as it runs by default, in eval mode (a copy)
    plain: nn.Module         # the same weights on the reference path (for ONNX perhaps channel-aligned), what is traced
    input_shape: tuple[int, ...]  # (C, *spatial), without the batch
    outputs: list[str]
    metadata: dict[str, str]


# -- arguments ----------------------------------------------------------------------


def _check_batch_size(batch_size) -> int:
    return checks.positive_int("batch_size", batch_size)


def _check_opset(opset, exporter: str) -> int | None:
    if opset is None:
        return None
    low, high = OPSETS[exporter]
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise checks.ArgumentError(f"{{opset}} must be an integer from {low} to {high} for the {exporter} ONNX "
                                   f"exporter, got {checks.quote(opset)}")
    return opset


def _target(path, run: RunDir | None, fmt: str) -> Path:
    """The output path, refused early (before minutes of export) if it cannot be created."""
    if path is None:
        if run is None:
            raise checks.ArgumentError("{path}: needed when exporting a model object "
                                       "(only a run directory has a default)")
        path = run.export_path(SUFFIXES[fmt])
    return refuse_existing(path)


def _require(module: str):
    """Import an optional dependency, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"export needs {module}, which cannot be imported ({e}); {INSTALL_HINT}") from e


# -- what is exported ---------------------------------------------------------------


def _plain_copy(model: nn.Module) -> nn.Module:
    """A CPU fp32 eval copy on the reference path: concatenating blocks, torchvision's
    transition order. A trace cannot see the fused path's native kernels."""
    plain = copy.deepcopy(model).eval()
    set_fused(plain, False)
    return plain


def _input_shape(model: nn.Module, cfg: dict, input_size) -> tuple[int, ...]:
    """(C, *spatial) from ``input_size`` or the model's ``pretrained_cfg``; spatial alone is
    accepted for a DenseNet, which knows its channels."""
    given = cfg.get("input_size") if input_size is None else input_size
    if given is None:
        raise UserError("input_size: needed for a model without pretrained_cfg, e.g. (3, 32, 32) "
                        "(channels, then one size per spatial dimension)")
    size = tuple(given) if isinstance(given, (list, tuple)) else ()
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in size):
        size = ()
    dims = getattr(model, "spatial_dims", None)
    if isinstance(model, DenseNet) and len(size) == dims:
        size = (model.in_chans, *size)
    if not size or min(size) < 1 or (dims is not None and len(size) != dims + 1):
        want = f"{dims + 1} positive integers (channels, then {dims} spatial)" if dims else "positive integers"
        raise UserError(f"input_size must be {want}, got {given!r}")
    if isinstance(model, DenseNet):
        if size[0] != model.in_chans:
            raise UserError(f"input_size has {size[0]} channel(s); the model takes {model.in_chans}")
        if min(size[1:]) < model.min_input_size:
            raise UserError(f"input_size {size}: this model needs every spatial side >= {model.min_input_size}")
    return size


def _output_names(model: nn.Module) -> list[str]:
    if getattr(model, "features_only", False):
        return [f"feature{i}" for i in range(len(model.feature_info))]
    return ["pooled_features"] if getattr(model, "num_classes", 1) == 0 else ["logits"]


def _metadata(model: nn.Module, cfg: dict, input_shape: tuple[int, ...], outputs: list[str], extra) -> dict[str, str]:
    """What a consumer needs besides the weights, as strings (JSON for non-strings)."""
    from . import __version__

    spatial_dims = len(input_shape) - 1
    meta: dict[str, object] = {
        "model": cfg.get("model") or type(model).__name__,
        "densekit_version": __version__,
        "input_size": list(input_shape),
        "input_layout": _LAYOUTS.get(spatial_dims, "NC" + "X" * spatial_dims),
        "spatial_dims": spatial_dims,
        "outputs": outputs,
    }
    if getattr(model, "features_only", False):
        meta["feature_info"] = [{k: d[k] for k in ("num_chs", "reduction")} for d in model.feature_info]
    for key in ("dataset", "classes", "mean", "std"):
        if cfg.get(key) is not None:
            meta[key] = list(cfg[key]) if isinstance(cfg[key], (list, tuple)) else cfg[key]
    if "classes" in meta:
        meta["num_classes"] = len(meta["classes"])
    elif getattr(model, "num_classes", 0) and not getattr(model, "features_only", False):
        meta["num_classes"] = model.num_classes
    if "mean" in meta:
        meta["preprocessing"] = "scale pixels to [0, 1], resize (bilinear, antialiased) to input_size, " \
                                "then (x - mean) / std per channel"
    for key, value in dict(extra or {}).items():
        meta[str(key)] = value
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def _subject(model_or_run_dir, path, fmt: str, input_size, metadata) -> tuple[_Subject, Path]:
    source, described = None, {}
    if isinstance(model_or_run_dir, nn.Module):
        model = model_or_run_dir
    else:
        source = RunDir(model_or_run_dir)
        info = source.read_info()  # is it a run directory at all: said before any complaint about path
        # the registered name alone does not say what was changed from it, or pruned
        if info.model_args:
            described["model_args"] = info.model_args
        if info.pruned:
            described["pruned_layers"], described["pruned_blocks"] = pruned_counts(info.pruned)
        # what turns the logits into probabilities: one class (softmax) or each label on its own (sigmoid)
        described["output_activation"] = "sigmoid" if info.multi_label else "softmax"
    target = _target(path, source, fmt)  # before loading anything: a bad --out costs nothing
    if source is not None:
        model = source.load_model("cpu")
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    reference = copy.deepcopy(model).to("cpu", torch.float32).eval()
    shape = _input_shape(reference, cfg, input_size)
    outputs = _output_names(reference)
    return _Subject(reference, _plain_copy(reference), shape, outputs,
                    _metadata(reference, cfg, shape, outputs, {**described, **dict(metadata or {})})), target


# -- writing ------------------------------------------------------------------------


def _example(subject: _Subject, batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *subject.input_shape), generator=gen)


def _as_list(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _compare(subject: _Subject, x: torch.Tensor, got: list, rtol: float, what: str, runner: str) -> Check:
    """Max abs difference to the eager reference, and that difference relative to the
    largest |output| (the logits' scale); raises if the relative one exceeds ``rtol``."""
    with torch.no_grad():
        want = _as_list(subject.reference(x))
    diff, scale = 0.0, 0.0
    for w, g in zip(want, got):
        g = torch.as_tensor(g)
        if g.shape != w.shape:
            raise RuntimeError(f"{what}: output of shape {tuple(g.shape)}, PyTorch gives {tuple(w.shape)}")
        diff = max(diff, (g - w).abs().max().item())
        scale = max(scale, w.abs().max().item())
    rel = diff / scale if scale > 0 else diff
    if not rel <= rtol:  # also catches NaN
        raise RuntimeError(f"{what} differs from PyTorch: max abs diff {diff:.3g} at output scale {scale:.3g} "
                           f"(relative {rel:.3g} > {rtol:g}); nothing was written (check=False writes it unchecked)")
    return Check(x.shape[0], diff, rel, scale, rtol, runner)


@dataclass
class Check:
    """How the written file compared with PyTorch eager on a batch of another size."""

    check_batch_size: int
    max_abs_diff: float
    max_rel_diff: float   # max_abs_diff / output_scale
    output_scale: float   # the largest |output| of the batch
    rtol: float
    runner: str           # what ran the file: "onnxruntime X.Y" or "torch.export.load"


@dataclass
class ExportReport(Result):
    """What was written, and how it compared with PyTorch (``check`` None: not checked)."""

    path: str
    format: str
    bytes: int
    model: str
    input_shape: list     # ["batch", C, *spatial] with a free batch axis, else the traced batch first
    outputs: list[str]
    traced_batch_size: int
    export_seconds: float
    torch: str
    opset: int | None = None
    exporter: str | None = None
    aligned: int | None = None  # the multiple the ONNX graph's channel counts were padded to, if any
    onnx: str | None = None
    check: Check | None = None

    @property
    def checked(self) -> bool:
        return self.check is not None

    def to_dict(self) -> dict:
        return dict(super().to_dict(), checked=self.checked)


def _report(fmt: str, path: Path, data: bytes, subject: _Subject, traced: int, dynamic: bool,
            seconds: float) -> ExportReport:
    shape = ["batch" if dynamic else traced, *subject.input_shape]
    return ExportReport(path=str(path), format=fmt, bytes=len(data), model=subject.metadata["model"],
                        input_shape=shape, outputs=subject.outputs, traced_batch_size=traced,
                        export_seconds=round(seconds, 3), torch=torch.__version__)


# -- ONNX ---------------------------------------------------------------------------


def _onnx_bytes(subject: _Subject, batch_size: int, opset: int | None, dynamic_batch: bool, dynamo: bool) -> bytes:
    kwargs = dict(input_names=["input"], output_names=subject.outputs, opset_version=opset)
    if dynamo and dynamic_batch:
        kwargs.update(dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    elif dynamic_batch:
        kwargs.update(dynamic_axes={name: {0: "batch"} for name in ["input", *subject.outputs]})
    x = _example(subject, batch_size, seed=0)
    with warnings.catch_warnings():
        # the shape checks in forward are traced as constants (right: the spatial size is
        # fixed) and torch announces the exporter's deprecation: neither concerns the user
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        if dynamo:
            if importlib.util.find_spec("onnxscript") is None:
                raise UserError(f"the dynamo ONNX exporter needs onnxscript; {INSTALL_HINT}")
            # onnxscript's optimizer prints its passes; a library call should not
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                try:
                    program = torch.onnx.export(subject.plain, (x,), None, dynamo=True, verbose=False, **kwargs)
                except ImportError as e:  # an onnxscript too old for this torch lacks the modules it imports
                    raise UserError(f"the dynamo ONNX exporter cannot import what it needs ({e}); "
                                    f"{INSTALL_HINT} --upgrade") from e
            return program.model_proto.SerializeToString()
        buf = io.BytesIO()
        torch.onnx.export(subject.plain, (x,), buf, dynamo=False, **kwargs)
        return buf.getvalue()


def _with_metadata(onnx, data: bytes, subject: _Subject, opset: int | None) -> tuple[bytes, int]:
    proto = onnx.load_from_string(data)
    written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and written != opset:
        raise UserError(f"opset {opset}: the exporter wrote opset {written} instead")
    del proto.metadata_props[:]
    for key, value in subject.metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"densekit {subject.metadata['model']}: input 'input' {subject.metadata['input_layout']}, " \
                       f"outputs {', '.join(subject.outputs)}; see metadata_props"
    proto.graph.name = subject.metadata["model"]
    return proto.SerializeToString(), written


def _check_onnx(onnx, data: bytes, subject: _Subject, batch: int, rtol: float) -> Check:
    ort = _require("onnxruntime")
    onnx.checker.check_model(onnx.load_from_string(data))
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own error types
        if "IR version" in str(e) or "opset" in str(e).lower():  # an onnxruntime older than the file
            raise checks.ArgumentError(f"onnxruntime {ort.__version__} cannot load this file "
                                       f"({checks.text(str(e).splitlines()[0])}); choose a lower {{opset}}, or "
                                       f"{INSTALL_HINT} --upgrade") from e
        raise
    x = _example(subject, batch, seed=1)
    got = session.run(subject.outputs, {"input": x.numpy()})
    return _compare(subject, x, got, rtol, "the ONNX file in onnxruntime", f"onnxruntime {ort.__version__}")


def export_onnx(model_or_run_dir, path=None, *, opset: int | None = None, batch_size: int = 1,
                dynamic_batch: bool = True, check: bool = True, input_size=None, metadata=None,
                dynamo: bool = False, rtol: float = RTOL, align: int | None = ALIGN) -> ExportReport:
    """Export a model or a run directory's model to an ONNX file; returns a report.

    Args:
        model_or_run_dir: a run directory (``densekit train``'s output) or any module built
            from densekit's parts (``create_model(...)``, 1D/2D/3D, ``features_only``).
        path: the file to create; never overwritten. Default ``<run dir>/model.onnx``.
        opset: ONNX opset (default: the exporter's, 20 in torch 2.14); see ``OPSETS``.
        batch_size: the batch of the traced example (the fixed batch if not dynamic).
        dynamic_batch: leave the batch axis free (``batch``) in the graph.
        check: run the file in onnxruntime on a batch of another size than the traced one
            and compare with PyTorch; raise above ``rtol`` (relative to the output's scale).
        input_size: (C, *spatial) or the spatial sizes; default ``model.pretrained_cfg``'s.
        metadata: extra or overriding ``metadata_props`` entries (e.g. ``{"model": name}``).
        dynamo: use torch's torch.export-based exporter (needs onnxscript; opset >= 18)
            instead of the TorchScript-based one, which is 20-30x faster here.
        align: pad a 2D DenseNet's channel counts in the graph to multiples of this (zero
            weights, the same outputs) so that onnxruntime's blocked convolutions keep every
            layer in their layout (``export_aligned.py``); 0 traces the widths as they are,
            None means the default (16). A model already aligned and unpruned, or of another
            kind, is traced as it is. The file records the multiple (``channel_alignment``).

    Returns an :class:`ExportReport`; its ``aligned`` says whether the graph was padded.
    """
    onnx = _require("onnx")
    batch_size = _check_batch_size(batch_size)
    exporter = "dynamo" if dynamo else "torchscript"
    opset = _check_opset(opset, exporter)
    align = ALIGN if align is None else checks.non_negative_int("align", align)
    subject, target = _subject(model_or_run_dir, path, "onnx", input_size, metadata)
    padded = aligned_copy(subject.plain, align)
    if padded is not None:
        subject.plain = padded
        subject.metadata["channel_alignment"] = str(align)
    if dynamo and dynamic_batch:
        batch_size = max(2, batch_size)  # torch.export fixes a dimension it sees at size 1
    start = time.perf_counter()
    data = _onnx_bytes(subject, batch_size, opset, dynamic_batch, dynamo)
    data, written = _with_metadata(onnx, data, subject, opset)
    report = _report("onnx", target, data, subject, batch_size, dynamic_batch, time.perf_counter() - start)
    report.opset, report.exporter, report.onnx = written, exporter, onnx.__version__
    report.aligned = align if padded is not None else None
    if check:
        # another batch size than the traced one proves the batch axis is free
        batch = batch_size + 1 if dynamic_batch else batch_size
        report.check = _check_onnx(onnx, data, subject, batch, rtol)
    publish(target, data)
    return report


# -- torch.export (.pt2) ------------------------------------------------------------


def _pt2_bytes(subject: _Subject, batch: int) -> bytes:
    x = _example(subject, batch, seed=0)
    # min=1: the traced example has 2 or more (a size-1 dimension would be specialized)
    dynamic = ({0: torch.export.Dim("batch", min=1)},)
    with torch.no_grad():
        program = torch.export.export(subject.plain, (x,), dynamic_shapes=dynamic)
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={_PT2_EXTRA: json.dumps(subject.metadata)})
    return buf.getvalue()


def _check_pt2(data: bytes, subject: _Subject, rtol: float) -> Check:
    module = torch.export.load(io.BytesIO(data)).module()
    x = _example(subject, 1, seed=1)  # batch 1: the size torch.export is most tempted to fix
    with torch.no_grad():
        got = _as_list(module(x))
    return _compare(subject, x, got, rtol, "the reloaded .pt2 program", "torch.export.load")


def export_pt2(model_or_run_dir, path=None, *, batch_size: int = 2, check: bool = True, input_size=None,
               metadata=None, rtol: float = RTOL) -> ExportReport:
    """Export a model or a run directory's model as a ``torch.export`` program (``.pt2``),
    with a free batch axis; load it with ``torch.export.load(path).module()``; returns a report.

    TorchScript is deprecated in torch 2.14 (``torch.jit.trace``, ``save`` and ``load`` warn);
    an ExportedProgram is what ``torch.compile``, AOTInductor and ExecuTorch take. The
    metadata travels as the extra file ``densekit.json``. The traced batch is at least 2,
    since torch.export fixes a dimension of size 1; with ``check``, the file is reloaded and
    run on a batch of 1 against PyTorch eager. Other arguments as in :func:`export_onnx`.
    """
    batch = max(2, _check_batch_size(batch_size))
    subject, target = _subject(model_or_run_dir, path, "pt2", input_size, metadata)
    start = time.perf_counter()
    data = _pt2_bytes(subject, batch)
    report = _report("pt2", target, data, subject, batch, True, time.perf_counter() - start)
    if check:
        report.check = _check_pt2(data, subject, rtol)
    publish(target, data)
    return report


def export_model(model_or_run_dir, path=None, *, format: str = "onnx", opset: int | None = None,
                 dynamo: bool = False, align: int | None = None, **kwargs) -> ExportReport:
    """:func:`export_onnx` or :func:`export_pt2` by ``format`` (what ``densekit export`` calls)."""
    checks.one_of("format", format, FORMATS)
    if format == "pt2":
        if opset is not None or dynamo or align is not None:
            raise checks.ArgumentError("{opset}, {dynamo} and {align} apply to the onnx format only")
        return export_pt2(model_or_run_dir, path, **kwargs)
    return export_onnx(model_or_run_dir, path, opset=opset, dynamo=dynamo, align=align, **kwargs)


# -- reading back -------------------------------------------------------------------


def _pt2_extra(path: Path) -> str:
    """densekit.json from a .pt2 zip archive, read without deserializing the program."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith(f"/extra/{_PT2_EXTRA}")), None)
            if name is None:
                raise UserError(f"{path}: no densekit metadata (not written by densekit export)")
            return archive.read(name).decode()
    except zipfile.BadZipFile as e:
        raise UserError(f"{path}: not a .pt2 archive: {e}") from e


def read_metadata(path) -> dict:
    """The densekit metadata of an exported ``.onnx`` or ``.pt2`` file, JSON values decoded."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.suffix == ".onnx":
        onnx = _require("onnx")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # protobuf raises its own decode errors for a foreign file
            raise UserError(f"{path}: cannot read ONNX file: {e}") from e
        raw = {p.key: p.value for p in proto.metadata_props}
    else:
        raw = json.loads(_pt2_extra(path))
    return {k: json.loads(v) if k in _JSON_KEYS else v for k, v in raw.items()}
