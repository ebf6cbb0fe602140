"""Using a trained run: ``evaluate_run`` on a test split, ``predict`` on image files.

Both feed the model exactly as training did: the run's own mean and std (those of its
training images, whatever split is evaluated now), the runtime's device and precision,
and the loader and forward pass that training's evaluation used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..data import DataError, Split, load_dataset, load_images
from ..errors import UserError
from . import checkpoint as ckpt
from .engine import EVAL_BATCH_SIZE, eval_loader, evaluate, predict_logits
from .plots import confusion_png
from .runtime import Runtime, select_runtime

log = logging.getLogger(__name__)

PREDICT_BATCH = 256  # files decoded and run at a time: bounds memory for any number of files


def _load(run_dir: str | os.PathLike, device: str) -> tuple[torch.nn.Module, dict, Runtime]:
    runtime = select_runtime(device)
    model = ckpt.load_run_model(run_dir, runtime.device)
    runtime.prepare(model)
    return model, ckpt.read_model_info(run_dir), runtime


def evaluate_run(run_dir: str | os.PathLike, dataset: str | None = None, data_dir: str | os.PathLike | None = None,
                 device: str = "auto", confusion_path: str | os.PathLike | None = None) -> dict:
    """Accuracy, per-class accuracy and confusion matrix of the run's model on a test split.

    ``dataset`` defaults to the one the run trained on (and ``data_dir`` to where it was
    read from); the confusion matrix is drawn to ``confusion_path`` (default
    ``run_dir/confusion.png``).
    """
    run_dir = Path(run_dir)
    png = Path(confusion_path) if confusion_path is not None else run_dir / ckpt.CONFUSION
    model, info, runtime = _load(run_dir, device)
    # checked before the evaluation, which may take long, rather than when the figure is written
    if png.is_dir():
        raise UserError(f"{png}: is a directory; the confusion matrix needs a file name (e.g. {png / 'confusion.png'})")
    if not png.parent.is_dir():
        raise UserError(f"{png}: folder {png.parent} does not exist")
    pre = info["preprocessing"]
    name = dataset or info["dataset"]
    if data_dir is None and name == info.get("dataset"):
        data_dir = info.get("data_dir")
    h, w = pre["image_size"]
    data = load_dataset(name, data_dir, image_size=h if name == "imagefolder" else None)
    classes = info["classes"]
    if data.num_classes != len(classes):
        raise UserError(f"{name} has {data.num_classes} classes but the model in {run_dir} predicts {len(classes)}")
    if (data.in_chans, *data.image_size) != (pre["in_chans"], h, w):
        raise UserError(f"{name} images are {data.in_chans}x{data.image_size[0]}x{data.image_size[1]} but the model "
                        f"in {run_dir} was trained on {pre['in_chans']}x{h}x{w}")
    if data.classes != classes:
        log.warning("%s class names differ from the run's; reporting the run's names", name)
    with runtime.activated():
        result = evaluate(model, eval_loader(data.test, pre["mean"], pre["std"], runtime), runtime, len(classes))
    title = f"{info['model']} on {name}: {100 * result.accuracy:.2f}% accurate"
    figure = confusion_png(result.confusion, classes, title)
    try:
        ckpt.atomic_write(png, figure)
    except OSError as e:  # a read-only run directory, a full disk
        raise UserError(f"{png}: cannot write the confusion matrix: {e.strerror or e}") from e
    counts = result.confusion.sum(axis=1)
    return dict(
        run=str(run_dir), model=info["model"], dataset=name, split="test",
        accuracy=result.accuracy, correct=result.correct, total=result.total, loss=result.loss,
        per_class=[dict(index=i, label=c, accuracy=a, count=int(n))
                   for i, (c, a, n) in enumerate(zip(classes, result.per_class, counts))],
        confusion=result.confusion.tolist(), confusion_png=str(png),
        **runtime.describe(),
    )


def predict(run_dir: str | os.PathLike, paths: Sequence[str | os.PathLike], top_k: int = 1,
            device: str = "auto") -> Iterator[dict]:
    """One result per image file, in order: ``path``, ``index``, ``label``, ``prob`` and, for
    ``top_k`` > 1, ``top`` (the k best as index/label/prob, best first).

    Every path is checked before any is decoded, so a missing file fails before any output.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UserError(f"top_k must be an integer >= 1, got {top_k!r}")
    model, info, runtime = _load(run_dir, device)
    classes = info["classes"]
    if top_k > len(classes):
        raise UserError(f"top_k is {top_k} but the model knows only {len(classes)} classes")
    for p in paths:
        if Path(p).is_dir():
            raise DataError(f"{p}: is a directory, expected an image file")
        if not Path(p).is_file():
            raise DataError(f"{p}: image file not found")
    return _predict(model, info, runtime, list(paths), top_k)


def _predict(model, info: dict, runtime: Runtime, paths: list, top_k: int) -> Iterator[dict]:
    pre = info["preprocessing"]
    classes = info["classes"]
    size = tuple(pre["image_size"])
    with runtime.activated(), torch.inference_mode():
        for lo in range(0, len(paths), PREDICT_BATCH):
            chunk = paths[lo:lo + PREDICT_BATCH]
            images = load_images(chunk, pre["in_chans"], size)
            split = Split(images=images, labels=torch.zeros(len(chunk), dtype=torch.int64))
            probs = []
            for x, _ in eval_loader(split, pre["mean"], pre["std"], runtime, EVAL_BATCH_SIZE):
                probs.append(predict_logits(model, x, runtime).softmax(1).cpu())
            top_p, top_i = torch.cat(probs).topk(top_k, dim=1)
            for path, ps, ids in zip(chunk, top_p.tolist(), top_i.tolist()):
                row = dict(path=str(path), index=ids[0], label=classes[ids[0]], prob=ps[0])
                if top_k > 1:
                    row["top"] = [dict(index=i, label=classes[i], prob=p) for i, p in zip(ids, ps)]
                yield row
