"""Using a trained run: ``evaluate_run`` on a test split, ``predict`` on image files.

Both feed the model exactly as training did: the run's own mean and std (those of its
training images, whatever split is evaluated now), the runtime's device and precision,
and the loader and forward pass that training's evaluation used.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from .. import checks
from ..checks import ArgumentError, positive_int
from ..data import DataError, Split, load_dataset, load_images
from ..data.batches import loader_for
from ..errors import UserError
from ..results import Result
from ..rundir import ModelInfo, RunDir
from ..models.frozen import for_inference
from ..models.size import estimate
from .engine import EVAL_BYTES, eval_batch_size, eval_loader, evaluate, predict_logits
from ..plots import confusion_png, roc_png
from .multilabel import roc_curves
from .runtime import Runtime, RuntimeFacts, select_runtime

log = logging.getLogger(__name__)

PREDICT_BATCH = 256  # files decoded and run at a time (fewer for large images): bounds memory for any number


@dataclasses.dataclass
class ClassAccuracy:
    index: int
    label: str
    accuracy: float | None  # None: no test image of this class
    count: int


@dataclasses.dataclass
class LabelScore:
    index: int
    label: str
    auroc: float | None              # None: its known targets are all one value
    average_precision: float | None
    positives: int
    known: int                       # images whose target for this label is known


@dataclasses.dataclass
class EvalReport(Result, RuntimeFacts):
    """A run's model scored on a test split, and where (the runtime's fields first). A
    multi-label model's report has the per-label AUROC and average precision instead of the
    per-class accuracy and confusion matrix; its accuracy is the exact-match ratio."""

    run: str
    model: str
    dataset: str
    split: str
    accuracy: float
    correct: int
    total: int
    loss: float                      # mean cross-entropy
    per_class: list[ClassAccuracy]
    confusion: list[list[int]] | None  # rows: true class, columns: predicted (up to 1000 classes)
    confusion_png: str | None
    multi_label: bool = False
    mean_auroc: float | None = None
    mean_average_precision: float | None = None
    per_label: list[LabelScore] | None = None
    roc_png: str | None = None


@dataclasses.dataclass
class Ranked:
    index: int
    label: str
    prob: float


@dataclasses.dataclass
class LabelsPrediction(Result):
    """A multi-label model's view of one image: every label's probability, and the labels at
    or above the threshold."""

    path: str
    labels: list[str]
    probs: dict[str, float]


@dataclasses.dataclass
class Prediction(Result):
    """One image's class: the most likely one and, with top_k > 1, the k best (best first)."""

    path: str
    index: int
    label: str
    prob: float
    top: list[Ranked] | None = None

    def to_dict(self) -> dict:
        out = super().to_dict()
        if self.top is None:
            del out["top"]
        return out


def _load(run: RunDir, device: str, precision: str = "auto") -> tuple[torch.nn.Module, ModelInfo, Runtime]:
    runtime = runtime_for(run, device, precision)
    model = run.load_model(runtime.device)
    runtime.prepare(model)
    return for_inference(model, runtime.device), run.read_info(), runtime


def runtime_for(run: RunDir, device: str, precision: str = "auto") -> Runtime:
    """The runtime that scores ``run``'s model: ``select_runtime``'s, except that "auto" scores
    a run trained in float32 (by request, or before bf16 was the default here) in float32, as
    it was trained, so that eval, predict and prune repeat its summary's figures."""
    if precision == "auto" and _trained_precision(run) == "fp32":
        precision = "fp32"
    return select_runtime(device, precision=precision)


def _trained_precision(run: RunDir) -> str | None:
    """The precision the run trained in, as its summary.json records it (None: not recorded)."""
    try:
        precision = run.read_summary().get("precision")
    except UserError:  # no summary (a run stopped early, a stranger's directory): the device decides
        return None
    return precision if precision in ("fp32", "bf16") else None


def _batch(info: ModelInfo) -> int:
    """The evaluation batch of the run's model at its image size (small for large images)."""
    return eval_batch_size(estimate(info.model_kwargs, info.preprocessing.image_size).activations)


def _eval_data(info: ModelInfo, run: RunDir, dataset: str | None, data_dir, skip_bad_images: bool = False):
    """The dataset to score on: ``dataset`` (default the run's), from ``data_dir`` (default
    where the run read it), checked against what the model was trained on."""
    pre = info.preprocessing
    name = dataset or info.dataset
    if name == "python":
        raise ArgumentError(f"{checks.text(run)} was trained on datasets given in Python (densekit.fit), which it "
                            "cannot read again: give {dataset} and {data_dir} to score it on files")
    if data_dir is None:
        data_dir = run.data_dir(info, name)
    h, w = pre.image_size
    data = load_dataset(name, data_dir, image_size=h, skip_bad_images=skip_bad_images, **info.data_options(name))
    if data.num_classes != info.num_classes:
        raise UserError(f"{name} has {data.num_classes} classes but the model in {run} predicts {info.num_classes}")
    if (data.in_chans, *data.image_size) != (pre.in_chans, h, w):
        raise UserError(f"{name} images are {data.in_chans}x{data.image_size[0]}x{data.image_size[1]} but the model "
                        f"in {run} was trained on {pre.in_chans}x{h}x{w}")
    if list(data.classes) != list(info.classes):
        log.warning("%s class names differ from the run's; reporting the run's names", name)
    # fed as the run was trained: its own mean and std (those of its training images)
    return dataclasses.replace(data, mean=tuple(pre.mean), std=tuple(pre.std))


def _figure_path(run: RunDir, confusion_path, multi_label: bool = False) -> Path:
    # checked before the evaluation, which may take long, rather than when the figure is written
    default = run.path / "roc.png" if multi_label else run.confusion_path
    png = Path(confusion_path) if confusion_path is not None else default
    if png.is_dir():
        raise UserError(f"{png}: is a directory; the confusion matrix needs a file name (a .png)")
    if not png.parent.is_dir():
        raise UserError(f"{png}: folder {png.parent} does not exist")
    return png


def evaluate_run(run_dir: str | os.PathLike, dataset: str | None = None, data_dir: str | os.PathLike | None = None,
                 device: str = "auto", confusion_path: str | os.PathLike | None = None,
                 split: str | None = None, skip_bad_images: bool = False, precision: str = "auto") -> EvalReport:
    """Accuracy, per-class accuracy and confusion matrix of the run's model on a split:
    ``split`` "test" (the default where the dataset has one) or "val" (the run's validation
    split, made again as the run made it).

    ``dataset`` defaults to the one the run trained on (and ``data_dir`` to where it was
    read from); the confusion matrix is drawn to ``confusion_path`` (default: the run
    directory's confusion.png). ``skip_bad_images``: image files that do not decode are left
    out, with a warning, as training left them out. ``precision``: as ``densekit train``'s
    (``select_runtime``), except that "auto" scores a run trained in fp32 in fp32.
    """
    checks.optional(lambda name, v: checks.one_of(name, v, ("test", "val")), "split", split)
    run = RunDir(run_dir)
    model, info, runtime = _load(run, device, precision)
    png = _figure_path(run, confusion_path, info.multi_label)
    data = _eval_data(info, run, dataset, data_dir, skip_bad_images)
    split = split or ("test" if data.test is not None else "val")
    if split == "test" and data.test is None:
        raise ArgumentError(f"{{split}} test: {checks.text(data.name)} has no test split here; give {{split}} val")
    loader = loader_for(data, data.test if split == "test" else data.val, _batch(info), train=False,
                        device=runtime.device, channels_last=runtime.channels_last)
    with runtime.activated():
        result = evaluate(model, loader, runtime, info.num_classes, multi_label=info.multi_label)
    if info.multi_label:
        return _multi_label_report(run, info, data.name, split, result, png, runtime)
    title = f"{info.model} on {data.name}: {100 * result.accuracy:.2f}% accurate"
    if result.confusion is not None:
        run.write_figure(png, confusion_png(result.confusion, list(info.classes), title))
    return EvalReport(
        run=str(run), model=info.model, dataset=data.name, split=split, accuracy=result.accuracy,
        correct=result.correct, total=result.total, loss=result.loss,
        per_class=[ClassAccuracy(i, c, a, int(n))
                   for i, (c, a, n) in enumerate(zip(info.classes, result.per_class, result.counts))],
        confusion=None if result.confusion is None else result.confusion.tolist(),
        confusion_png=None if result.confusion is None else str(png), **runtime.describe())


def _multi_label_report(run: RunDir, info: ModelInfo, dataset: str, split: str, result, png: Path,
                        runtime: Runtime) -> EvalReport:
    none = lambda v: None if math.isnan(v) else v  # noqa: E731
    known = ~np.isnan(result.targets)
    per_label = [LabelScore(i, c, none(a), none(ap), int((result.targets[:, i] == 1).sum()), int(known[:, i].sum()))
                 for i, (c, a, ap) in enumerate(zip(info.classes, result.auroc, result.average_precision))]
    title = f"{info.model} on {dataset} ({split}): mean AUROC {result.mean_auroc:.3f}"
    run.write_figure(png, roc_png(roc_curves(result, list(info.classes)), title))
    return EvalReport(
        run=str(run), model=info.model, dataset=dataset, split=split, accuracy=result.accuracy,
        correct=result.correct, total=result.total, loss=result.loss, per_class=[], confusion=None,
        confusion_png=None, multi_label=True, mean_auroc=none(result.mean_auroc),
        mean_average_precision=none(result.mean_average_precision), per_label=per_label, roc_png=str(png),
        **runtime.describe())


def predict(run_dir: str | os.PathLike, paths: Sequence[str | os.PathLike], top_k: int = 1,
            device: str = "auto", threshold: float = 0.5,
            precision: str = "auto") -> Iterator[Prediction | LabelsPrediction]:
    """One :class:`Prediction` per image file, in order; a multi-label model's is a
    :class:`LabelsPrediction` (every label's probability, those >= ``threshold`` named).

    Every path is checked before any is decoded, so a missing file fails before any output.
    """
    positive_int("top_k", top_k)
    checks.fraction("threshold", threshold, high_included=True)
    model, info, runtime = _load(RunDir(run_dir), device, precision)
    if top_k > info.num_classes:
        raise ArgumentError(f"{{top_k}} is {top_k} but the model knows only {info.num_classes} classes")
    for p in paths:
        if Path(p).is_dir():
            raise DataError(f"{p}: is a directory, expected an image file")
        if not Path(p).is_file():
            raise DataError(f"{p}: image file not found")
    return _predict(model, info, runtime, list(paths), top_k, threshold)


def _predict(model, info: ModelInfo, runtime: Runtime, paths: list, top_k: int,
             threshold: float) -> Iterator[Prediction | LabelsPrediction]:
    pre, classes = info.preprocessing, info.classes
    decoded = pre.in_chans * pre.image_size[0] * pre.image_size[1]
    files_at_once = max(1, min(PREDICT_BATCH, EVAL_BYTES // decoded))
    with runtime.activated(), torch.inference_mode():
        for lo in range(0, len(paths), files_at_once):
            chunk = paths[lo:lo + files_at_once]
            images = load_images(chunk, pre.in_chans, tuple(pre.image_size), crop_pct=pre.crop_pct)
            split = Split(images=images, labels=torch.zeros(len(chunk), dtype=torch.int64))
            probs = []
            for x, _ in eval_loader(split, pre.mean, pre.std, runtime, _batch(info)):
                logits = predict_logits(model, x, runtime)
                probs.append((logits.sigmoid() if info.multi_label else logits.softmax(1)).cpu())
            if info.multi_label:
                for path, ps in zip(chunk, torch.cat(probs).tolist()):
                    yield LabelsPrediction(str(path), [c for c, p in zip(classes, ps) if p >= threshold],
                                           dict(zip(classes, ps)))
                continue
            top_p, top_i = torch.cat(probs).topk(top_k, dim=1)
            for path, ps, ids in zip(chunk, top_p.tolist(), top_i.tolist()):
                top = [Ranked(i, classes[i], p) for i, p in zip(ids, ps)] if top_k > 1 else None
                yield Prediction(str(path), ids[0], classes[ids[0]], ps[0], top)
