"""Structured pruning of a trained DenseNet by network slimming.

Liu, Li, Shen, Huang, Yan and Zhang, "Learning Efficient Convolutional Networks through
Network Slimming" (ICCV 2017): each channel is scaled by the gamma of the batch norm that
reads it, so |gamma| ranks how much the channel can still pass on; one threshold over the
whole network removes the requested fraction of the lowest-ranked channels, and a short
fine-tuning (``densekit train --init``) recovers the accuracy.

In a dense block the batch norm that reads a channel sits inside the layer that reads it:
every layer has its own norm1 over the block's concatenation, so layers drop inputs
independently (``DenseLayer.input_index``) and the block's buffer and every other layer
stay as they were. Three kinds of channel are prunable:

- a dense layer's inputs (norm1's channels): norm1 and conv1's input shrink;
- a bottleneck's width (norm2's channels): conv1's output, norm2 and conv2's input shrink;
- a dense block's outputs, as the module after it reads them (the transition's norm, or the
  final norm): the block returns only the kept channels (``DenseBlock.output_index``), and the
  transition's norm and convolution, or the final norm and the classifier, shrink with it.

What goes is decided per channel or per map (``unit``). Per channel, each batch norm loses
exactly the channels ranked below the threshold (then rounded, :data:`ROUND_TO`). Per map,
the default of ``densekit prune``, a layer's inputs and a block's outputs go in whole maps:
the block input, or the ``growth_rate`` maps one earlier layer added, goes where at least
half of its channels rank below the threshold and stays whole otherwise (bottleneck widths
still go by channel; a layer or norm outside a dense block, too). The ONNX export pads each
map to a multiple of 16 channels for onnxruntime's blocked convolutions and reads it whole
(``export_aligned``), so there a layer that keeps one channel of a map pays for all of it,
and only maps dropped whole make a pruned export cheaper (figures: docs/performance.md,
"Pruning whole maps").

The amount asked is the fraction of prunable channels that go. Rounding and whole maps make
that differ from the fraction ranked below the threshold (whole maps removed 37% of a sparse
run's channels where 40% were marked, and about 21% on random scales), so
:func:`prune_model` moves the threshold until what goes is nearest the amount
(:func:`marked_for`); :func:`slimming_plan` takes the marked fraction itself.

A block's feature buffer itself keeps every layer's maps: a map could only leave it when no
later layer and no reader after the block reads it, which in a DenseNet, where every map is
read by every later layer of its block, is rare (7 of 216 on the ``make run`` model trained
with ``--sparsity 5e-4`` and pruned by 0.4), and would leave a 3x3 convolution with 11 output
channels instead of 12, no faster (docs/performance.md#pruning). Every batch norm keeps at
least one channel. A channel whose gamma is 0 and beta <= 0 is always 0 after its ReLU, so
pruning only such channels leaves the function unchanged (the tests pin it).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .checks import fraction, one_of, positive_int
from .data import load_dataset
from .errors import UserError
from .models.frozen import for_inference
from .models.layers import DenseBlock, prunable_norms, prune_block_outputs_
from .models.profile import count_macs, count_params
from .results import Result
from .rundir import ModelInfo, RunDir, pruned_counts, pruned_structure, refuse_nonempty
from .rundir.schema import is_number
from .models.size import estimate
from .data.batches import loader_for
from .train.engine import eval_batch_size, evaluate
from .train.inference import runtime_for

METHOD = "network slimming: |gamma| of the batch norm that reads each channel, one global threshold"
UNITS = ("map", "channel")  # what a layer's inputs and a block's outputs lose: whole maps, or channels
KINDS = ("inputs", "width", "outputs")  # a layer's inputs and width (DenseLayer.prune_), a block's outputs

# What ``densekit prune`` rounds each batch norm's kept channels to by default: a dense
# layer's inputs and a block's outputs to ROUND_TO where it prunes them per channel (``unit``
# "channel"; per map they go in whole maps), a bottleneck's width to ROUND_WIDTH either way.
# onnxruntime's CPU convolutions run channels in blocks (its NCHWc layout: 8, or 16 with
# AVX-512) and fall back to a several times slower kernel for a 3x3 convolution whose input
# channels are not a multiple of 8: measured on the `make run` model pruned by 0.4 with and
# without rounding, onnxruntime ran it 1.0x as fast as its parent unrounded and 1.4-1.6x
# rounded to 8, at 0.540x MACs against 0.534x. Inputs in multiples of 16 ran faster still, in
# onnxruntime and in PyTorch's gathers and bf16 products; a width rounded to 16 did not pay
# (onnxruntime pads it to 16 anyway, and the native 3x3 convolution costs per channel). On a
# Zen 4 EPYC, pruning one sparse run by 0.4 three ways (same process, alternating): inputs
# and widths to 8, onnxruntime 1.37-1.41x its parent, PyTorch bf16 1.33x, float32 1.54-1.58x;
# both to 16, 1.46-1.53x, 1.32-1.35x, 1.49x; inputs to 16 and widths to 8, 1.43-1.48x,
# 1.37x, 1.57x (docs/performance.md#pruning).
ROUND_TO = 16
ROUND_WIDTH = 8


@dataclasses.dataclass
class Channels:
    prunable: int
    kept: int
    removed: int
    removed_fraction: float
    marked_fraction: float  # ranked below the threshold: what whole maps and rounding turned into removed_fraction


@dataclasses.dataclass
class PruneReport(Result):
    """What pruning removed and what it cost, before and after on the run's test split."""

    source: str
    out: str
    model: str
    dataset: str
    method: str
    amount: float
    unit: str              # "map": a layer's inputs and a block's outputs went in whole maps; "channel": by channel
    round_to: int          # with unit "channel", each layer's kept inputs and block's kept outputs a multiple of this
    round_width: int       # each bottleneck's kept width a multiple of this (or all of it)
    channels: Channels
    input_size: list[int]
    split: str             # the split the accuracies are of: "test", or "val" where the dataset has no test split
    test_images: int
    params_before: int
    macs_before: int
    test_accuracy_before: float
    params_after: int
    macs_after: int
    test_accuracy_after: float
    params_ratio: float
    macs_ratio: float
    pruned_layers: int             # dense layers that read fewer inputs or have a narrower bottleneck
    pruned_blocks: int             # dense blocks that return fewer channels to their transition or final norm
    reference_path_blocks: int     # dense blocks that cannot run fused once pruned
    speed_batch: int | None        # inference speed (None: not measured): images per forward pass,
    images_per_second_before: float | None  # random inputs, in this process, as the runtime runs
    images_per_second_after: float | None   # them (autocast and memory format)
    speedup: float | None          # median over rounds of the parent's time over the pruned model's
    fine_tune_lr: float | None     # suggested for `train --init`: a quarter of the run's peak lr (FINE_TUNE_LR_SCALE)
    device: str
    torch: str
    densekit: str


def _check_amount(amount) -> float:
    return fraction("amount", amount)


def _map_ids(model: nn.Module, name: str, kind: str, bn: nn.Module) -> torch.Tensor | None:
    """The map of its dense block (0: the block input, i: layer i's new maps) that each
    channel of ``bn`` normalizes, for a layer's inputs or a block's outputs; else None."""
    if kind == "width":
        return None
    if kind == "inputs":
        block = model.get_submodule(name.rpartition(".")[0])  # "": the model itself
        index = model.get_submodule(name).input_index
    else:
        block = model.get_submodule(name)
        index = block.output_index
    if not isinstance(block, DenseBlock):
        return None
    logical = torch.arange(bn.num_features) if index is None else index.cpu()
    return torch.where(logical < block.in_channels, 0, 1 + (logical - block.in_channels) // block.growth_rate)


def _map_vote(gone: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """``gone`` widened to whole maps (``maps``: each channel's map): a map goes where at least
    half of its channels were marked, and stays whole otherwise."""
    marked, size = torch.bincount(maps, weights=gone.float()), torch.bincount(maps)
    return (2 * marked >= size)[maps]


def slimming_plan(model: nn.Module, amount: float, round_to: int = 1,
                  round_width: int | None = None, unit: str = "channel") -> dict[str, dict[str, torch.Tensor | None]]:
    """Which channels each dense layer and block keeps when ``amount`` of all prunable channels
    rank below the threshold.

    Channels are ranked by |gamma| across the whole network (a stable sort, so ties go in
    module order) and exactly ``round(amount * total)`` are marked; a batch norm that would
    lose all its channels keeps its largest (per map: the map whose middle channel ranks
    highest, the one the vote would drop last). With ``round_to`` > 1 each batch norm then keeps
    its largest channels in a count rounded to the nearest multiple of ``round_to`` (at least
    one multiple, at most all), and each bottleneck's width to one of ``round_width`` (default:
    ``round_to``): convolution kernels that work on blocks of channels run pruned layers at
    their full speed only then (see :data:`ROUND_TO`). Returns ``{name:
    {"inputs": kept or None, "width": kept or None, "outputs": kept or None}}`` (a layer's
    inputs and width, a block's outputs: :func:`prunable_norms`), None where nothing of that
    kind goes. With ``unit="map"`` (the default of :func:`prune_run`; here the exact
    per-channel rule is the default) a layer's inputs and a block's outputs go in whole maps
    instead, a map where at least half of its channels were marked (see the module's
    docstring), not rounded; widths as above. Rounding and whole maps make the fraction that
    goes differ from the fraction marked: :func:`marked_for` finds the fraction to mark for a
    fraction to remove.
    """
    amount = _check_amount(amount)
    planner = _Planner(model, round_to, round_width, unit)
    return planner.plan(round(amount * planner.total))[0]


def marked_for(model: nn.Module, amount: float, round_to: int = 1, round_width: int | None = None,
               unit: str = "channel") -> float:
    """The fraction to mark (``slimming_plan``'s ``amount``) whose plan removes the nearest
    to ``amount`` of all prunable channels, given the rounding and the unit
    (:meth:`_Planner.marking`)."""
    amount = _check_amount(amount)
    planner = _Planner(model, round_to, round_width, unit)
    return planner.marking(round(amount * planner.total)) / planner.total if planner.total else 0.0


class _Planner:
    """The ranking of one model's prunable channels, planned for any number of marked channels."""

    def __init__(self, model: nn.Module, round_to: int, round_width: int | None, unit: str):
        self.round_to = positive_int("round_to", round_to)
        self.round_width = self.round_to if round_width is None else positive_int("round_width", round_width)
        unit = one_of("unit", unit, UNITS)
        self.groups = prunable_norms(model)
        self.maps = [_map_ids(model, name, kind, bn) if unit == "map" else None for name, kind, bn in self.groups]
        self.scores = torch.cat([bn.weight.detach().abs().float().cpu() for _, _, bn in self.groups]) \
            if self.groups else torch.zeros(0)
        self.order = torch.argsort(self.scores, stable=True)
        self.total = self.scores.numel()
        rank = torch.empty_like(self.order)
        rank[self.order] = torch.arange(self.total)
        # where every map of a norm would go, the one that would go last stays: the map whose
        # middle channel (the ceil(size/2)-th lowest) ranks highest, so that marking more never
        # removes less
        self.last = []
        start = 0
        for (_, _, bn), ids in zip(self.groups, self.maps):
            n = bn.num_features
            if ids is not None:
                r = rank[start:start + n]
                maps = ids.unique()
                middle = [r[ids == m].sort().values[(int((ids == m).sum()) - 1) // 2] for m in maps]
                self.last.append(maps[int(torch.stack(middle).argmax())])
            else:
                self.last.append(None)
            start += n

    def marking(self, target: int) -> int:
        """How many channels to mark for a plan that removes the nearest to ``target``: the
        fewest whose plan removes at least ``target``, or one fewer where that removes nearer (a
        tie goes to the smaller removal). What a plan removes grows with what it marks (a map
        goes once half of it is marked, a rounded count shrinks as more is marked), so a
        bisection over the marked count finds it in about log2(total) plans."""
        if target == 0:
            return 0
        lo, hi = 0, self.total - 1  # marking all is not a fraction below 1
        below, above = 0, self.plan(hi)[1]  # what lo and hi remove
        if above < target:  # every norm keeps a channel: as near as it gets
            return hi
        while hi - lo > 1:  # below < target <= above
            mid = (lo + hi) // 2
            removed = self.plan(mid)[1]
            if removed >= target:
                hi, above = mid, removed
            else:
                lo, below = mid, removed
        return lo if target - below <= above - target else hi

    def plan(self, marked: int) -> tuple[dict[str, dict[str, torch.Tensor | None]], int]:
        """The plan with the ``marked`` lowest-ranked channels marked, and how many channels it removes."""
        removed = torch.zeros(self.total, dtype=torch.bool)
        removed[self.order[:marked]] = True
        plan: dict[str, dict[str, torch.Tensor | None]] = {}
        start = count = 0
        for (name, kind, bn), ids, last in zip(self.groups, self.maps, self.last):
            n = bn.num_features
            gone, gammas = removed[start:start + n].clone(), self.scores[start:start + n]
            start += n
            if ids is not None:
                gone = _map_vote(gone, ids)
            if gone.all():  # keep the largest channel, or the map that would go last
                gone[gammas.argmax() if ids is None else ids == last] = False
            step = self.round_width if kind == "width" else self.round_to
            if step > 1 and gone.any() and ids is None:  # whole maps are not rounded
                kept = min(n, max(step, (int(n - gone.sum()) + step // 2) // step * step))
                gone[:] = True
                gone[torch.argsort(gammas, descending=True, stable=True)[:kept]] = False
            count += int(gone.sum())
            plan.setdefault(name, dict.fromkeys(KINDS))[kind] = torch.nonzero(~gone).flatten() if gone.any() else None
        return plan, count


def apply_plan(model: nn.Module, plan: dict[str, dict[str, torch.Tensor | None]]) -> None:
    """Shrink each layer and block of ``model`` to what ``plan`` (from :func:`slimming_plan`)
    keeps, in place: a block's kept outputs shrink the module that reads them too."""
    for name, keep in plan.items():
        if keep.get("outputs") is not None:
            prune_block_outputs_(model, name, keep["outputs"])
        layer = {kind: keep.get(kind) for kind in ("inputs", "width")}
        if any(v is not None for v in layer.values()):
            model.get_submodule(name).prune_(**layer)


def prune_model(model: nn.Module, amount: float, round_to: int = 1, round_width: int | None = None,
                unit: str = "channel") -> Channels:
    """Network-slim ``model`` in place, removing the nearest to ``amount`` of its prunable
    channels that the rounding and the unit allow (the plan of :func:`slimming_plan` for the
    fraction :func:`marked_for` finds); returns the channel counts before and after."""
    amount = _check_amount(amount)
    planner = _Planner(model, round_to, round_width, unit)
    before = planner.total  # the prunable channels
    marked = planner.marking(round(amount * before))
    apply_plan(model, planner.plan(marked)[0])
    after = _channel_count(model)
    return Channels(prunable=before, kept=after, removed=before - after,
                    removed_fraction=(before - after) / before if before else 0.0,
                    marked_fraction=marked / before if before else 0.0)


def _channel_count(model: nn.Module) -> int:
    return sum(bn.num_features for _, _, bn in prunable_norms(model))


# The peak learning rate ``densekit prune`` suggests for fine-tuning (2 epochs with the run's
# recipe), as a fraction of the run's own. Measured on the sparse `make run` model pruned by
# 0.4 (docs/performance.md, "The amount is what goes"): validation accuracy 89.40% after 1
# epoch at the run's lr (0.2), 90.73% after 2; after 2 epochs at 0.1, 0.05 and 0.02 (a half,
# a quarter, a tenth), 90.73%, 91.05% and 90.73%.
FINE_TUNE_LR_SCALE = 0.25
FINE_TUNE_EPOCHS = 2

SPEED_BATCH = 64
SPEED_ROUNDS = 15


def alternate(calls, rounds: int, sync=None) -> tuple[list[float], float]:
    """Median seconds of each of ``calls`` and the median over rounds of the first's time over
    the second's: one warm-up call each, then ``rounds`` rounds of one call each in turn, so
    that all see the same machine state. ``sync`` (e.g. a CUDA synchronize) runs before each
    clock reading."""
    sync = sync or (lambda: None)
    for call in calls:
        call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for i, call in enumerate(calls):
            sync()
            t0 = time.perf_counter()
            call()
            sync()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times], statistics.median(a / b for a, b in zip(times[0], times[1]))


def inference_speed(before: nn.Module, after: nn.Module, size: tuple[int, ...], device: torch.device,
                    batch: int = SPEED_BATCH, rounds: int = SPEED_ROUNDS,
                    memory_format: torch.memory_format = torch.contiguous_format) -> tuple[float, float, float]:
    """(images/s before, images/s after, speedup) of two models in eval mode on one random
    batch, timed by :func:`alternate`: the rates from each model's median time, the speedup
    the median of the rounds' ratios."""
    x = torch.randn(batch, *size, device=device).contiguous(memory_format=memory_format)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    with torch.no_grad():
        (t_before, t_after), ratio = alternate([lambda m=m: m(x) for m in (before.eval(), after.eval())], rounds,
                                               sync)
    return batch / t_before, batch / t_after, ratio


def _accuracy(model: nn.Module, info: ModelInfo, data, split, runtime) -> float:
    """Accuracy on a whole split, fed as the run was trained (its own mean and std)."""
    pre = info.preprocessing
    batch = eval_batch_size(estimate(info.model_kwargs, pre.image_size).activations)
    data = dataclasses.replace(data, mean=tuple(pre.mean), std=tuple(pre.std))
    loader = loader_for(data, split, batch, train=False, device=runtime.device, channels_last=runtime.channels_last)
    with runtime.activated():
        return evaluate(model, loader, runtime, info.num_classes, multi_label=info.multi_label).accuracy


def _fine_tune_lr(source: RunDir) -> float | None:
    """:data:`FINE_TUNE_LR_SCALE` of the peak learning rate the run trained at, where its
    summary says (None for a run without one, such as one ``prune`` wrote)."""
    try:
        lr = source.read_summary().get("lr") if source.has_summary() else None
    except UserError:
        return None
    return lr * FINE_TUNE_LR_SCALE if is_number(lr) and lr > 0 else None  # as a run's config checks it


def prune_run(run_dir: str | os.PathLike, out: str | os.PathLike, amount: float, device: str = "auto",
              data_dir: str | os.PathLike | None = None, speed: bool = True, round_to: int = ROUND_TO,
              round_width: int | None = None, unit: str = "map") -> PruneReport:
    """Prune the model of ``run_dir`` by ``amount`` into a new run directory ``out``: each layer's
    inputs and each block's outputs in whole maps (``unit="map"``) or in a multiple of
    ``round_to`` channels (``"channel"``), each bottleneck's width in a multiple of
    ``round_width`` (default: ``round_to``, at most ``ROUND_WIDTH``) channels (:func:`slimming_plan`).

    ``out`` gets the weights, model.json (with the pruned structure, so that ``densekit.load``,
    ``eval``, ``predict`` and ``train --init`` take it) and summary.json: channels, parameters,
    MACs and full-test-set accuracy before and after, on the run's test split (read from
    ``data_dir``, default where the run read it), and with ``speed`` the inference speed of
    both models (:func:`inference_speed`). Returns the summary.
    """
    amount = _check_amount(amount)
    round_to = positive_int("round_to", round_to)
    round_width = min(round_to, ROUND_WIDTH) if round_width is None else positive_int("round_width", round_width)
    unit = one_of("unit", unit, UNITS)
    refuse_nonempty(out)
    source = RunDir(run_dir)
    runtime = runtime_for(source, device)  # as `densekit eval` scores the run (and timed so)
    info = source.read_info()
    model = source.load_model(runtime.device)
    runtime.prepare(model)
    pre = info.preprocessing
    h, w = pre.image_size
    if data_dir is None:
        data_dir = source.data_dir(info)
    data = load_dataset(info.dataset, data_dir, image_size=h, **info.data_options())
    split = data.test if data.test is not None else data.val  # scored, not selected on
    if data.num_classes != info.num_classes or (data.in_chans, *data.image_size) != (pre.in_chans, h, w):
        raise UserError(f"{info.dataset} as found now does not fit the model of {source}")
    size = (pre.in_chans, h, w)
    params, macs, acc = count_params(model), count_macs(model, size), _accuracy(model, info, data, split, runtime)
    parent = copy.deepcopy(model) if speed else None
    channels = prune_model(model, amount, round_to, round_width, unit)
    structure = pruned_structure(model)
    rates = (None, None, None)
    if parent is not None:
        with runtime.activated(), runtime.autocast():
            rates = inference_speed(for_inference(parent, runtime.device), for_inference(model, runtime.device), size,
                                    runtime.device, memory_format=runtime.memory_format)
        del parent
    params_after, macs_after = count_params(model), count_macs(model, size)
    layers, blocks = pruned_counts(structure)
    report = PruneReport(
        source=str(source), out=str(out), model=info.model, dataset=info.dataset, method=METHOD, amount=amount,
        unit=unit, round_to=round_to, round_width=round_width,
        channels=channels, input_size=list(size), split="test" if data.test is not None else "val",
        test_images=len(split), params_before=params,
        macs_before=macs, test_accuracy_before=acc, params_after=params_after,
        macs_after=macs_after, test_accuracy_after=_accuracy(model, info, data, split, runtime),
        params_ratio=params_after / params, macs_ratio=macs_after / macs,
        pruned_layers=layers, pruned_blocks=blocks,
        reference_path_blocks=sum(1 for m in model.modules() if hasattr(m, "fused_status") and m.fused_status()),
        speed_batch=SPEED_BATCH if speed else None, images_per_second_before=rates[0],
        images_per_second_after=rates[1], speedup=rates[2], fine_tune_lr=_fine_tune_lr(source),
        device=str(runtime.device), torch=torch.__version__, densekit=__version__)
    # the pruned run records where its data are, from wherever it is: absolute
    folder = None if data_dir is None else str(Path(data_dir).resolve())
    RunDir.create(out, model, dataclasses.replace(info.with_pruned(structure), data_dir=folder), report)
    return report
