"""``analyze``: run the analyses on a run directory or a registered model, write JSON + PNGs.

The one place that turns a target (a trained run, or a model name for an untrained
network) into the inputs each analysis needs, and that owns the output folder: every file
it would write is checked before anything is computed, and none is ever overwritten.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import load_dataset
from ..data.batches import loader_for
from .. import checks
from ..checks import ArgumentError
from ..errors import UserError
from ..models import DenseNet, create_model, get_variant, list_models
from ..results import Result
from ..rundir import RunDir, publish, publish_json
from .cost import activation_memory, cost_row, cost_table
from .gradients import gradient_flow, gradients_png
from .overfit import check_records, overfit_png, overfitting
from .reuse import feature_reuse, reuse_png

log = logging.getLogger(__name__)

ANALYSES = ("reuse", "gradients", "cost", "overfit")
# The files each analysis writes into the output folder.
OUTPUTS = {
    "reuse": ("reuse.json", "reuse.png"),
    "gradients": ("gradients.json", "gradients.png"),
    "cost": ("cost.json",),
    "overfit": ("overfit.json", "overfit.png"),
}
GRADIENT_BATCH = 64
_UNTRAINED = ("untrained: the weights are the initialization, so the map shows no learned reuse "
              "(a baseline to compare a trained run with)")


@dataclass
class Target:
    """What was asked about, and where it came from; the model is built on first use, so
    that a mistake in the other arguments is reported before any weights are read."""

    label: str
    run_dir: Path | None
    dataset: str
    data_dir: str | None
    image_size: int | None  # a run's: the side its images were fed at (None: the dataset's own)
    input_size: tuple[int, ...]
    options: dict = field(default_factory=dict)  # a run's: how it loaded its data (val split, ...)

    @cached_property
    def model(self) -> DenseNet:
        """The run's trained weights, or a model name's initial weights (seed 0)."""
        if self.run_dir is not None:
            return RunDir(self.run_dir).load_model("cpu")
        torch.manual_seed(0)
        return create_model(self.label, in_chans=self.input_size[0]).eval()


def resolve_target(target: str, data_dir: str | os.PathLike | None = None) -> Target:
    """A run directory (trained weights) or a registered model name (initial weights)."""
    path = Path(target)
    data_dir = None if data_dir is None else str(data_dir)
    if path.is_dir():
        run = RunDir(path)
        info = run.read_info()
        pre = info.preprocessing
        return Target(info.model, path, info.dataset, data_dir or run.data_dir(info), pre.image_size[0],
                      (pre.in_chans, *pre.image_size), info.data_options())
    if target in list_models():
        return Target(target, None, "fashion-mnist", data_dir, None, get_variant(target).input_size)
    what = "is not a directory" if path.exists() else "is neither a run directory nor a registered model"
    raise UserError(f"{target}: {what}; give a run directory or one of: {', '.join(list_models())}")


def parse_what(text: str | None, target: Target) -> list[str]:
    """The analyses asked for (default: every one that applies to the target)."""
    if text is None:
        # overfit reads the run's metrics.jsonl, which a pruned run's directory does not have
        return [a for a in ANALYSES if a != "overfit" or
                (target.run_dir is not None and RunDir(target.run_dir).has_metrics())]
    asked = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in asked if w not in ANALYSES]
    if unknown or not asked:
        raise ArgumentError(f"{{what}}: unknown analysis {checks.quote(unknown[0] if unknown else text)}; "
                            f"choose from {', '.join(ANALYSES)} (comma-separated)")
    if "overfit" in asked and target.run_dir is None:
        raise ArgumentError(f"{{what}} overfit needs a run directory (its training records); "
                            f"{checks.text(target.label)} is a model name")
    return list(dict.fromkeys(asked))


def output_paths(target: Target, what: list[str], out: str | os.PathLike | None) -> dict[str, Path]:
    """Where each file goes; refuses an output folder that is a file or already holds one of them."""
    if out is None:
        if target.run_dir is None:
            raise ArgumentError(f"{{out}} is needed when the target is a model name ({checks.text(target.label)})")
        out = RunDir(target.run_dir).analysis_dir
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    paths = {name: out / name for a in what for name in OUTPUTS[a]}
    taken = [p for p in paths.values() if p.exists()]
    if taken:
        raise ArgumentError(f"{checks.text(taken[0])}: already exists; refusing to overwrite it "
                            "(choose another {out})")
    return paths


def gradient_batch(target: Target, n: int = GRADIENT_BATCH) -> tuple[DenseNet, torch.Tensor, torch.Tensor]:
    """The target's architecture for the dataset's images, and the first ``n`` validation images
    (normalized with the training set's statistics) with their labels."""
    data = load_dataset(target.dataset, target.data_dir, image_size=target.image_size, **target.options)
    model = target.model
    if target.run_dir is None:  # a model name: fit its stem and head to the dataset
        torch.manual_seed(0)
        model = create_model(target.label, in_chans=data.in_chans, num_classes=data.num_classes)
    # normalized with the training set's statistics, at the target's image size (which a model
    # name takes at its smallest input if the dataset's images are smaller: an ImageNet stem on 28 px)
    x, labels = next(iter(loader_for(data, data.val, n, train=False, device=torch.device("cpu"))))
    if min(x.shape[2:]) < model.min_input_size:
        x = F.interpolate(x, size=model.min_input_size, mode="bilinear", align_corners=False)
    return model, x, labels


def _reuse(target: Target) -> tuple[dict, dict[str, bytes]]:
    result = feature_reuse(target.model)
    result["trained"] = target.run_dir is not None
    if not result["trained"]:
        log.warning("%s: %s", target.label, _UNTRAINED)
        result["note"] = _UNTRAINED
    title = f"feature reuse, {target.label}{'' if result['trained'] else ' (untrained)'}"
    return result, {"reuse.png": reuse_png(result, title)}


def _gradients(target: Target) -> tuple[dict, dict[str, bytes]]:
    model, images, labels = gradient_batch(target)
    result = dict(model=target.label, dataset=target.dataset, **gradient_flow(model, images, labels))
    title = f"gradient flow at initialization, {target.label}, one {target.dataset} batch of {len(labels)}"
    return result, {"gradients.png": gradients_png(result, title)}


def _cost(target: Target) -> tuple[dict, dict[str, bytes]]:
    return dict(model_cost=cost_row(target.label, target.model, target.input_size), references=cost_table(),
                activations=activation_memory()), {}


def _overfit(target: Target) -> tuple[dict, dict[str, bytes]]:
    result = overfitting(check_records(RunDir(target.run_dir).read_metrics(), target.run_dir))
    return result, {"overfit.png": overfit_png(result, f"generalization gap, {target.label}")}


_RUNNERS = {"reuse": _reuse, "gradients": _gradients, "cost": _cost, "overfit": _overfit}


@dataclass
class ReuseHeadline:
    """Feature reuse in one dense block (reuse.json has the whole map)."""

    block: str
    older_share: float | None             # weight on sources before the previous layer (layers 2..L)
    older_channel_fraction: float | None  # what equal weights on every input channel would give
    block_input_share: float              # weight on the block's input


@dataclass
class Headlines(Result):
    """Each analysis in a few numbers; the JSON files hold the rest."""

    target: str
    trained: bool
    out: str
    files: list[str]
    reuse: list[ReuseHeadline] | None = None
    gradient_ratio_dense: float | None = None   # first/last layer gradient norm at initialization
    gradient_ratio_chain: float | None = None   # the same layers chained
    params: int | None = None
    macs: int | None = None
    input_size: list[int] | None = None
    best_val_acc: float | None = None
    best_epoch: int | None = None
    final_acc_gap: float | None = None          # train - validation accuracy at the last epoch
    final_loss_gap: float | None = None         # validation - train loss at the last epoch


@dataclass
class AnalyzeReport(Result):
    """The analyses run on a target, and the files they wrote."""

    target: str
    trained: bool          # a run's trained weights (False: a model name's initialization)
    out: str
    files: list[str]
    results: dict          # analysis name -> what its JSON file holds

    def headlines(self) -> Headlines:
        r = self.results
        h = Headlines(self.target, self.trained, self.out, self.files)
        if "reuse" in r:
            h.reuse = [ReuseHeadline(b["block"], b["summary"]["older_share"], b["summary"]["older_channel_fraction"],
                                     b["summary"]["block_input_share"]) for b in r["reuse"]["blocks"]]
        if "gradients" in r:
            h.gradient_ratio_dense = r["gradients"]["dense"]["first_last_ratio"]
            h.gradient_ratio_chain = r["gradients"]["chain"]["first_last_ratio"]
        if "cost" in r:
            row = r["cost"]["model_cost"]
            h.params, h.macs, h.input_size = row["params"], row["macs"], row["input_size"]
        if "overfit" in r:
            s = r["overfit"]["summary"]
            h.best_val_acc, h.best_epoch = s["best_val_acc"], s["best_epoch"]
            h.final_acc_gap, h.final_loss_gap = s["final_acc_gap"], s["final_loss_gap"]
        return h


def analyze(target: str, what: str | None = None, out: str | os.PathLike | None = None,
            data_dir: str | os.PathLike | None = None) -> AnalyzeReport:
    """Run the analyses in ``what`` (comma-separated; default all that apply) on ``target``
    and write each one's JSON and figure into ``out`` (default: the run directory's
    analysis folder). Nothing is ever overwritten, not even a file that appears meanwhile."""
    resolved = resolve_target(target, data_dir)
    analyses = parse_what(what, resolved)
    paths = output_paths(resolved, analyses, out)
    results, figures = {}, {}
    for name in analyses:  # everything is computed before the first file is written
        results[name], pngs = _RUNNERS[name](resolved)
        figures.update(pngs)
    folder = next(iter(paths.values())).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{folder}: cannot write the analysis: {e.strerror or e}") from e
    for name in analyses:
        publish_json(paths[f"{name}.json"], dict(target=resolved.label, **results[name]))
    for file, png in figures.items():
        publish(paths[file], png)
    return AnalyzeReport(target=resolved.label, trained=resolved.run_dir is not None, out=str(folder),
                         files=[str(p) for p in paths.values()], results=results)
