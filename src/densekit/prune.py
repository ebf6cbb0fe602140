"""Structured pruning of a trained DenseNet by network slimming.

Liu, Li, Shen, Huang, Yan and Zhang, "Learning Efficient Convolutional Networks through
Network Slimming" (ICCV 2017): each channel is scaled by the gamma of the batch norm that
reads it, so |gamma| ranks how much the channel can still pass on; one threshold over the
whole network removes the requested fraction of the lowest-ranked channels, and a short
fine-tuning (``densekit train --init``) recovers the accuracy.

In a dense block the batch norm that reads a channel sits inside the layer that reads it:
every layer has its own norm1 over the block's concatenation, so layers drop inputs
independently (``DenseLayer.input_index``) and the block's buffer and every other layer
stay as they were. Two kinds of channel are prunable:

- a dense layer's inputs (norm1's channels): norm1 and conv1's input shrink;
- a bottleneck's width (norm2's channels): conv1's output, norm2 and conv2's input shrink.

Transitions and the final norm are left whole: their batch norm reads the block's whole
output, which every later layer of a block shares. Every batch norm keeps at least one
channel. A channel whose gamma is 0 and beta <= 0 is always 0 after its ReLU, so pruning
only such channels leaves the function unchanged (the tests pin it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .data import load_dataset
from .errors import UserError
from .models import DenseLayer
from .models.profile import count_macs, count_params
from .train import checkpoint as ckpt
from .train.engine import eval_loader, evaluate
from .train.runtime import select_runtime

METHOD = "network slimming: |gamma| of the batch norm that reads each channel, one global threshold"
KINDS = ("inputs", "width")  # the keywords of DenseLayer.prune_


def _check_amount(amount) -> float:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount < 1:
        raise UserError(f"amount must be a fraction in [0, 1), got {amount!r}")
    return float(amount)


def prunable_norms(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(layer name, kind, batch norm) for every group of prunable channels, in module order."""
    groups = []
    for name, m in model.named_modules():
        if isinstance(m, DenseLayer):
            groups.append((name, "inputs", m.norm1))
            if m.has_bottleneck:
                groups.append((name, "width", m.norm2))
    return groups


def slimming_plan(model: nn.Module, amount: float) -> dict[str, dict[str, torch.Tensor | None]]:
    """Which channels each dense layer keeps when ``amount`` of all prunable channels go.

    Channels are ranked by |gamma| across the whole network (a stable sort, so ties go in
    module order) and exactly ``round(amount * total)`` are marked; a batch norm that would
    lose all its channels keeps its largest. Returns ``{layer: {"inputs": kept or None,
    "width": kept or None}}``, None where nothing of that kind goes.
    """
    amount = _check_amount(amount)
    groups = prunable_norms(model)
    if not groups:
        return {}
    scores = torch.cat([bn.weight.detach().abs().float().cpu() for _, _, bn in groups])
    removed = torch.zeros(scores.numel(), dtype=torch.bool)
    removed[torch.argsort(scores, stable=True)[:round(amount * scores.numel())]] = True
    plan: dict[str, dict[str, torch.Tensor | None]] = {}
    start = 0
    for name, kind, bn in groups:
        n = bn.num_features
        gone, gammas = removed[start:start + n].clone(), scores[start:start + n]
        start += n
        if gone.all():
            gone[gammas.argmax()] = False
        plan.setdefault(name, dict.fromkeys(KINDS))[kind] = torch.nonzero(~gone).flatten() if gone.any() else None
    return plan


def apply_plan(model: nn.Module, plan: dict[str, dict[str, torch.Tensor | None]]) -> None:
    """Shrink each layer of ``model`` to what ``plan`` (from :func:`slimming_plan`) keeps, in place."""
    for name, keep in plan.items():
        model.get_submodule(name).prune_(**keep)


def prune_model(model: nn.Module, amount: float) -> dict:
    """Network-slim ``model`` in place; returns the channel counts before and after."""
    before = _channel_count(model)
    apply_plan(model, slimming_plan(model, amount))
    after = _channel_count(model)
    return dict(prunable=before, kept=after, removed=before - after,
                removed_fraction=(before - after) / before if before else 0.0)


def _channel_count(model: nn.Module) -> int:
    return sum(bn.num_features for _, _, bn in prunable_norms(model))


def _check_out(out: Path) -> None:
    """Refuse an ``out`` that holds anything: nothing a user had is overwritten."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out}: directory is not empty; choose another --out (densekit never overwrites files)")


def _test_accuracy(model: nn.Module, info: dict, test, runtime) -> float:
    """Accuracy on the whole test split, fed as the run was trained (its own mean and std)."""
    pre = info["preprocessing"]
    with runtime.activated():
        result = evaluate(model, eval_loader(test, pre["mean"], pre["std"], runtime), runtime, len(info["classes"]))
    return result.accuracy


def prune_run(run_dir: str | os.PathLike, out: str | os.PathLike, amount: float, device: str = "auto") -> dict:
    """Prune the model of ``run_dir`` by ``amount`` into a new run directory ``out``.

    ``out`` gets model.safetensors, model.json (with the pruned structure, so that
    ``densekit.load``, ``eval``, ``predict`` and ``train --init`` take it) and summary.json:
    channels, parameters, MACs and full-test-set accuracy before and after. Returns the summary.
    """
    amount = _check_amount(amount)
    run_dir, out = Path(run_dir), Path(out)
    _check_out(out)
    runtime = select_runtime(device)
    info = ckpt.read_model_info(run_dir)
    model = ckpt.load_run_model(run_dir, runtime.device)
    runtime.prepare(model)
    pre = info["preprocessing"]
    h, w = pre["image_size"]
    data = load_dataset(info["dataset"], info.get("data_dir"),
                        image_size=h if info["dataset"] == "imagefolder" else None)
    if data.num_classes != len(info["classes"]) or (data.in_chans, *data.image_size) != (pre["in_chans"], h, w):
        raise UserError(f"{info['dataset']} as found now does not fit the model of {run_dir}")
    size = (pre["in_chans"], h, w)
    before = dict(params=count_params(model), macs=count_macs(model, size),
                  test_accuracy=_test_accuracy(model, info, data.test, runtime))
    channels = prune_model(model, amount)
    after = dict(params=count_params(model), macs=count_macs(model, size),
                 test_accuracy=_test_accuracy(model, info, data.test, runtime))
    summary = dict(
        source=str(run_dir), out=str(out), model=info["model"], dataset=info["dataset"], method=METHOD,
        amount=amount, channels=channels, input_size=list(size), test_images=len(data.test),
        **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
        params_ratio=after["params"] / before["params"], macs_ratio=after["macs"] / before["macs"],
        pruned_layers=len(ckpt.pruned_structure(model)), device=str(runtime.device), torch=torch.__version__,
        densekit=__version__)
    _write_run(out, model, ckpt.with_pruned(info, ckpt.pruned_structure(model)), summary)
    return summary


def _write_run(out: Path, model: nn.Module, info: dict, summary: dict) -> None:
    """Write the run into a hidden sibling folder, then rename it to ``out``: a kill leaves no
    half run there, and a folder that someone filled meanwhile is not touched (the rename
    fails on a non-empty directory)."""
    _check_out(out)  # again: the evaluations took a while
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name[:100]}.", suffix=".prune-tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~ckpt.UMASK)  # mkdtemp makes 0700; give the folder the mode mkdir would
        ckpt.save_weights(tmp / ckpt.WEIGHTS, model)
        ckpt.write_json(tmp / ckpt.MODEL_JSON, info)
        ckpt.write_json(tmp / ckpt.SUMMARY, summary)
        try:
            os.rename(tmp, out)  # replaces an empty folder only
        except OSError as e:
            raise UserError(f"--out {out}: {e.strerror or e}; choose another --out "
                            "(densekit never overwrites files)") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
