"""``train``: a whole run, from a config to a run directory (``densekit.rundir`` says what it holds).

Pointed at a directory that already holds a run of the same config, ``train`` continues
it; any other non-empty directory is refused, so nothing a user had is ever overwritten.
Resuming restores model, optimizer, scheduler, RNG states and the position inside the
epoch; the loader redraws that epoch's order and augmentation from (seed, epoch), so a
resumed run takes exactly the steps an uninterrupted one would.

The algorithm is :func:`_train`: resolve the config and open the run, load the data, build
the model and its training step, start or resume, loop over the epochs, finish.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .. import __version__, distributed
from ..checks import ArgumentError, text
from ..data import Dataset, load_dataset
from ..data.batches import loader_for
from ..errors import UserError
from ..models import DenseNet, create_model, model_kwargs
from ..models.frozen import for_inference
from ..models.layers import prunable_norms
from ..models.profile import count_macs, count_params
from ..results import Result
from ..rundir import ModelInfo, Preprocessing, RunDir, pruned_structure
from ..models.size import estimate
from ..plots import curves_png
from .config import CUSTOM_MODEL, TrainConfig, check_config, default_out, open_config
from .engine import Diverged, EpochStats, EvalResult, StepReport, eval_batch_size, evaluate, train_one_epoch
from .finetune import Freezer, pretrained_model, with_pretrained_stats
from .multilabel import MultiLabelLoss, MultiLabelResult, auto_pos_weight
from .recipes import Recipe, augment_for, build_optimizer, build_scheduler, get_recipe
from .runtime import Runtime, RuntimeFacts, rng_state, seed_everything, select_runtime, set_rng_state
from .step import TrainStep

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunStart:
    """Reported once, before the first step: what will run, and where it stands."""

    out: str
    model: str
    dataset: str
    params: int
    macs: int
    epochs: int
    steps_per_epoch: int
    total_steps: int
    global_step: int       # steps already taken (a resumed run)
    stop_at: int           # the step this process will stop at (max_steps or the end)
    runtime: RuntimeFacts


@dataclasses.dataclass
class EpochEnd:
    """Reported after each epoch: its figures, as metrics.jsonl records them."""

    epoch: int             # from 1
    epochs: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    seconds: float
    best: bool             # the best validation score so far: the weights kept with keep="best"
    val_auroc: float | None = None  # multi-label: mean AUROC over the labels (the validation score)
    val_ap: float | None = None     # multi-label: mean average precision


@dataclasses.dataclass
class Evaluating:
    """Reported as an evaluation goes (``split`` "val" or "test"): batches done of ``batches``."""

    split: str
    done: int
    batches: int


# What ``train`` reports as it goes, in this order: one RunStart, then StepReports (every few
# steps) and an EpochEnd after each epoch.
Event = RunStart | StepReport | EpochEnd | Evaluating


@dataclasses.dataclass
class TrainSummary(Result, RuntimeFacts):
    """What a run did and reached, and where (the runtime's fields first); also written to the
    run's summary.json."""

    model: str
    model_args: dict
    init: str | None             # the run directory the weights started from
    pretrained: dict | None      # the weights fine-tuned from: source, kind, and the tensors loaded, new, adapted
    multi_label: bool            # sigmoid outputs, one per label; selection by mean validation AUROC
    dataset: str
    num_classes: int
    input_size: list[int]        # (channels, height, width)
    params: int
    macs: int                    # multiply-accumulates per image, reference path
    epochs: int
    epochs_completed: int
    steps: int
    total_steps: int
    finished: bool
    batch_size: int
    lr: float
    sparsity: float              # the L1 weight on the prunable batch-norm scales (0: none)
    seed: int
    train_limit: int | None
    train_images: int
    train_seconds: float         # training alone: no evaluation, no checkpoint writes
    data_wait_fraction: float    # of train_seconds, waiting for batches: the loader's share of a step
    images_per_second: float
    train_loss: float
    train_acc: float
    val_split: str               # how the validation split was made
    val_images: int
    kept: str                    # "best" (by validation score: accuracy, or mean AUROC) or "last"
    kept_epoch: int              # the epoch those weights are of (0: none finished)
    val_accuracy: float | None   # of the kept weights
    val_loss: float | None
    val_auroc: float | None      # multi-label: the kept weights' mean AUROC on the validation split
    stopped_early: bool          # by patience: that many epochs without a better validation accuracy
    test_accuracy: float | None  # the kept weights on the full test split, scored once at the end (None: the
    test_loss: float | None      # dataset has no test split, or the run has not ended); `densekit eval` reproduces it
    test_correct: int | None
    test_images: int
    test_auroc: float | None     # multi-label: mean AUROC over the labels that have one, and average precision
    test_ap: float | None
    test_auroc_per_label: dict | None  # label -> AUROC (None: one class only among its test images)
    cuda_graph_captured: bool
    world_size: int
    torch: str
    densekit: str
    recipe: dict                 # every number of the recipe, as run
    out: str


def improves(score: float, loss: float, best: dict | None, key: str) -> bool:
    """Whether an epoch's validation ``score`` (accuracy; multi-label: mean AUROC) and ``loss``
    beat ``best``, the best epoch's record so far (its ``key`` and ``val_loss``): a higher
    score, or the same with a lower loss (accuracy on a small validation split often ties, and
    the loss tells those epochs apart). A score that is not a number never wins."""
    if score is None or math.isnan(score):
        return False
    if best is None or best[key] is None or math.isnan(best[key]):
        return True
    if score != best[key]:
        return score > best[key]
    before = best["val_loss"]  # None where a loss that was not a number was stored
    return loss is not None and not math.isnan(loss) and (before is None or math.isnan(before) or loss < before)


@dataclasses.dataclass
class _Progress:
    """Where the run stands; all of it goes into the resume state."""

    epoch: int = 0                # finished epochs
    step_in_epoch: int = 0
    global_step: int = 0
    stats: EpochStats = dataclasses.field(default_factory=EpochStats)
    history: list = dataclasses.field(default_factory=list)
    train_seconds: float = 0.0
    data_seconds: float = 0.0     # of train_seconds, waiting for batches (finished epochs)
    best_epoch: int = 0           # the epoch of the best validation accuracy so far (0: none yet)
    stopped_early: bool = False


def train(config: TrainConfig, on_event: Callable[[Event], None] | None = None, data: Dataset | None = None,
          model: DenseNet | None = None) -> TrainSummary:
    """Run (or continue) training as ``config`` says; returns the summary also written to
    ``summary.json``. Reports progress through ``on_event`` (never prints). ``data`` and
    ``model``, given (``densekit.fit``), are trained on and trained in place of the dataset
    and model the config would name.

    Under torchrun or ``densekit train --nproc N``, this process is one rank of a
    data-parallel job (``densekit.distributed``): it joins the group here and leaves it when
    training ends; rank 0 writes the run directory and reports events."""
    config = check_config(config)
    job = distributed.from_env()
    if job.active and config.cuda_graph:
        raise ArgumentError("{cuda_graph}: CUDA graphs are not used with several processes; drop it or run one")
    device = distributed.rank_device(select_runtime(config.device).device, job)
    emit = on_event if job.is_main and on_event else (lambda event: None)
    with distributed.member(job, device):
        return _train(config, emit, job, device, data, model)


def _train(config: TrainConfig, emit: Callable[[Event], None], job: distributed.Dist, device: torch.device,
           given_data: Dataset | None = None, given_model: DenseNet | None = None) -> TrainSummary:
    # a model given in Python is named by its registered architecture, where it has one
    name = None if given_model is None else \
        (getattr(given_model, "pretrained_cfg", None) or {}).get("architecture") or CUSTOM_MODEL
    run, cfg, meta = _open_run(config, job, device, name)
    runtime = select_runtime(str(device), config.channels_last, bool(cfg["deterministic"]),
                             False if job.active else config.cuda_graph, cfg["precision"])
    data = _load_data(cfg, meta, run, given_data)
    with runtime.activated():
        seed_everything(cfg["seed"])
        session = _Session(run, cfg, data, runtime, job, resumed=meta is not None, given_model=given_model)
        session.start(meta)
        emit(session.start_event(config.max_steps))
        session.loop(config.max_steps, emit)
        session.finish(emit)
    summary = session.summary()
    if job.is_main:
        run.write_summary(summary)
    return summary


def _open_run(config: TrainConfig, job: distributed.Dist, device: torch.device,
              model_name: str | None = None) -> tuple[RunDir, dict, dict | None]:
    """The run directory (one name for every rank), its complete config, its resume state."""
    out = distributed.broadcast_object(Path(config.out) if config.out else default_out(config, device.type))
    run = RunDir(out)
    cfg, meta = open_config(run, config, device.type, model_name)
    distributed.check_batch_split(cfg["batch_size"], job.world_size)
    if meta is not None and meta.get("world_size", 1) != job.world_size:
        log.warning("continuing a run of %d process(es) with %d: the batches are the same, but batch norm "
                    "now sees other shares of them, so the result will not match an uninterrupted run",
                    meta.get("world_size", 1), job.world_size)
    distributed.barrier()  # every rank has read the directory before rank 0 writes to it
    return run, cfg, meta


def _data_facts(data: Dataset) -> dict:
    return dict(train_images=len(data.train), val_images=len(data.val),
                test_images=0 if data.test is None else len(data.test), classes=data.classes,
                image_size=list(data.image_size), in_chans=data.in_chans)


def _load_data(cfg: dict, meta: dict | None, run: RunDir, given: Dataset | None = None) -> Dataset:
    if given is not None:
        data = given
    else:
        data = load_dataset(cfg["dataset"], cfg["data_dir"], cfg["train_limit"], cfg["image_size"],
                            val_fraction=cfg["val_fraction"], seed=cfg["seed"], workers=cfg["workers"],
                            skip_bad_images=cfg["skip_bad_images"], csv=cfg["csv"])
        data = with_pretrained_stats(data, cfg, run, resumed=meta is not None)
    if len(data.val) == 0:
        raise ArgumentError("the validation split is empty: give a {val_fraction} above 0, or a val/ folder")
    log.info("%s: validating on %s (%d images)%s", data.name, data.val_source, len(data.val),
             "" if data.test is None else f"; the test split ({len(data.test)} images) is scored once, at the end")
    if meta is not None and meta["data"] != _data_facts(data):
        diff = [f"{k} {meta['data'].get(k)!r} there, {v!r} here" for k, v in _data_facts(data).items()
                if meta["data"].get(k) != v]
        raise UserError(f"cannot continue the run in {run}: its data differ ({'; '.join(diff)})")
    return data


def _registered_model(cfg: dict, data: Dataset, resumed_from: RunDir | None) -> tuple[DenseNet, dict]:
    """The registered model the config names, for the data; with the arguments that rebuild it.
    A resumed run's config comes from its resume state, a stranger's file: the model it
    describes is bounded (``RunDir.check_resumed_model``) before it is built."""
    args = dict(cfg["model_args"], num_classes=data.num_classes, in_chans=data.in_chans)
    try:
        kwargs = model_kwargs(cfg["model"], **args)
        if resumed_from is not None:
            resumed_from.check_resumed_model(kwargs, data.image_size, data.num_classes, data.in_chans)
        model = create_model(cfg["model"], **args)
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from e
    h, w = data.image_size
    if model.min_input_size > min(h, w):
        raise ArgumentError(
            f"model {cfg['model']} needs images of at least {model.min_input_size}x{model.min_input_size} px "
            f"(it downsamples {model.feature_info[-1]['reduction']}x), but {data.name} images are {h}x{w}; "
            "give a larger {image_size} or a CIFAR-style model (e.g. densenet_bc_100_k12)")
    # JSON has no tuples: store the kwargs as they will read back
    return model, {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def _init_model(init: str, data: Dataset) -> tuple[DenseNet, dict]:
    """The model of run directory ``init``, pruned structure and weights included, ready to
    train on ``data``; with the DenseNet arguments that rebuild it."""
    source = RunDir(init)
    model = source.load_model("cpu")
    h, w = data.image_size
    problems = []
    if model.num_classes != data.num_classes:
        problems.append(f"it predicts {model.num_classes} classes, {data.name} has {data.num_classes}")
    if model.in_chans != data.in_chans:
        problems.append(f"it takes {model.in_chans} channels, {data.name} images have {data.in_chans}")
    if model.min_input_size > min(h, w):
        problems.append(f"it needs images of at least {model.min_input_size} px, {data.name} images are {h}x{w}")
    if problems:
        raise ArgumentError(f"{{init}} {text(init)}: its model does not fit the data: {text('; '.join(problems))}")
    return model.train(), source.read_info().model_kwargs


def _given_model(model: DenseNet, data: Dataset) -> tuple[DenseNet, dict]:
    """A model given in Python, checked against the data; with the arguments that rebuild it."""
    if not isinstance(model, DenseNet):
        raise ArgumentError(f"{{model}} must be a densekit DenseNet (densekit.create_model), got "
                            f"{type(model).__name__}")
    if (model.num_classes, model.in_chans) != (data.num_classes, data.in_chans):
        raise ArgumentError(f"{{model}} takes {model.in_chans} channel(s) and predicts {model.num_classes} "
                            f"classes; the data has {data.in_chans} and {data.num_classes}: create it with "
                            f"in_chans={data.in_chans}, num_classes={data.num_classes}, or call "
                            f"model.reset_classifier({data.num_classes})")
    return model.train(), dict(model.init_kwargs)


def _model(cfg: dict, data: Dataset, run: RunDir, resumed: bool,
           given: DenseNet | None = None) -> tuple[DenseNet, dict, dict | None]:
    """The model to train, the DenseNet arguments that rebuild it and, for pretrained weights,
    what was loaded. A resumed run started from ``init`` or ``pretrained`` is rebuilt from its
    own model.json (pruned structure included): its weights come from its resume state, so the
    run or file it started from may be gone by now."""
    loaded = None
    started_from = cfg["init"] or cfg["pretrained"]
    if given is not None:  # trained in place; a resumed run's weights come from its resume state
        model, kwargs = _given_model(given, data)
    elif started_from is None:
        model, kwargs = _registered_model(cfg, data, run if resumed else None)
    elif resumed and run.has_model():
        info = run.read_info()
        model, kwargs = run.build_model(info), info.model_kwargs
        loaded = dict(source=cfg["pretrained"], kind="resumed", loaded=[], new=[], adapted=[]) \
            if cfg["pretrained"] else None
    elif cfg["pretrained"] is not None:
        model, kwargs, loaded = pretrained_model(cfg, data)
    else:
        model, kwargs = _init_model(cfg["init"], data)
    blocked = {name: block.fused_status() for name, block in model.named_modules()
               if hasattr(block, "fused_status") and block.fused_status() not in (None, "fused is off")}
    if blocked:
        # those blocks take the reference path: checkpoint it, so that training memory stays
        # lean (only there: in a fused block memory_efficient recomputes the bottlenecks)
        for name in blocked:
            model.get_submodule(name).set_grad_checkpointing(True)
        name, reason = next(iter(blocked.items()))
        log.info("%d dense block(s) take the reference path with gradient checkpointing (%s: %s)",
                 len(blocked), name, reason)
    return model, kwargs, loaded


def _all_finite(model: nn.Module) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


class _Session:
    """One training process's run: the model, its data and training step, and the progress,
    with the operations the algorithm takes (start, loop, checkpoint, finish)."""

    def __init__(self, run: RunDir, cfg: dict, data: Dataset, runtime: Runtime, job: distributed.Dist,
                 resumed: bool, given_model: DenseNet | None = None) -> None:
        self.run, self.cfg, self.data, self.runtime, self.job = run, cfg, data, runtime, job
        self.main = job.is_main  # the rank that writes the run directory
        self.recipe: Recipe = get_recipe(cfg["recipe"])
        self.model, self.kwargs, self.pretrained = _model(cfg, data, run, resumed, given_model)
        runtime.prepare(self.model)
        self.augment = augment_for(self.recipe, data.name)
        self.train_loader = self._loader(data.train, cfg["batch_size"], train=True)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ArgumentError(f"{{batch_size}} {cfg['batch_size']} is larger than the {len(data.train)} "
                                "training images; lower it")
        self.total_steps = cfg["epochs"] * self.steps_per_epoch
        self.eval_batch = eval_batch_size(estimate(self.kwargs, data.image_size).activations)
        self.freezer = Freezer(self.model, cfg)
        # a CUDA graph replays fused SGD on a fixed set of gradients: not AdamW, not a changing freeze
        graph = runtime.cuda_graph and self.recipe.optimizer == "sgd" and not self.freezer.used
        head = {id(p) for p in self.model.get_classifier().parameters()} if cfg["backbone_lr_scale"] != 1 else None
        self.optimizer = build_optimizer(self.model, self.recipe, cfg["lr"], fused=graph, head=head,
                                         backbone_lr_scale=cfg["backbone_lr_scale"])
        self.scheduler = build_scheduler(self.optimizer, self.recipe, self.steps_per_epoch, self.total_steps)
        self.step = TrainStep(distributed.wrap(self.model, runtime.device), self.optimizer, self._criterion(),
                              runtime, cuda_graph=graph, sparsity=self._sparsity())
        self.progress = _Progress()
        self.reports = 0  # step reports this process has passed on
        self.kept_eval: EvalResult | None = None   # the kept weights on the validation split
        self.test_eval: EvalResult | None = None

    def _sparsity(self) -> tuple[list[torch.Tensor], float] | None:
        """The batch-norm scales network slimming ranks channels by, and the L1 weight on them."""
        lam = self.cfg["sparsity"]
        if not lam:
            return None
        scales = [bn.weight for _, _, bn in prunable_norms(self.model)]
        log.info("sparsity training: L1 penalty %g on %d batch-norm scales (network slimming)", lam,
                 sum(p.numel() for p in scales))
        return scales, lam

    def _criterion(self) -> nn.Module:
        if not self.data.multi_label:
            return nn.CrossEntropyLoss(label_smoothing=self.recipe.label_smoothing)
        weight = auto_pos_weight(self.data.train.labels) if self.cfg["pos_weight"] == "auto" else None
        if weight is not None:
            log.info("positive weights (negatives / positives): %s", ", ".join(
                f"{c} {w:.2f}" for c, w in zip(self.data.classes, weight.tolist())))
        return MultiLabelLoss(None if weight is None else weight.to(self.runtime.device))

    def _loader(self, split, batch_size: int, train: bool):
        job, cfg = self.job, self.cfg
        return loader_for(self.data, split, batch_size, train=train, device=self.runtime.device, seed=cfg["seed"],
                          channels_last=self.runtime.channels_last,
                          shard=(job.rank, job.world_size) if job.active else None,
                          augment=self.augment, workers=cfg["workers"],
                          skip_bad_images=cfg["skip_bad_images"])

    def _evaluate(self, split, name: str, emit: Callable[[Event], None],
                  model: nn.Module | None = None) -> EvalResult | MultiLabelResult:
        loader = self._loader(split, self.eval_batch, train=False)
        return evaluate(self.model if model is None else model, loader, self.runtime, self.data.num_classes,
                        report=lambda done: emit(Evaluating(name, done, len(loader))),
                        multi_label=self.data.multi_label)

    # -- the run directory

    def checkpoint(self) -> None:
        """The resume state as the run stands; refuses (Diverged) to save non-finite weights."""
        p = self.progress
        if not _all_finite(self.model):  # on every rank: they all hold the same weights and stop together
            raise Diverged(f"the weights became non-finite by step {p.global_step}", p.global_step)
        if self.main:
            self.run.save_resume(self.model, self.optimizer, self.scheduler, rng_state(), dict(
                config=self.cfg, data=_data_facts(self.data), epoch=p.epoch, step_in_epoch=p.step_in_epoch,
                global_step=p.global_step, steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                stats=dataclasses.asdict(p.stats), history=p.history, train_seconds=p.train_seconds,
                data_seconds=p.data_seconds, best_epoch=p.best_epoch, stopped_early=p.stopped_early,
                world_size=self.job.world_size))

    def _model_info(self) -> ModelInfo:
        d, cfg = self.data, self.cfg
        data_dir = None if cfg["data_dir"] is None else str(Path(cfg["data_dir"]).resolve())
        return ModelInfo(cfg["model"], cfg["model_args"], self.kwargs, d.name, data_dir, tuple(d.classes),
                         Preprocessing(d.in_chans, tuple(d.image_size), tuple(d.mean), tuple(d.std),
                                       crop_pct=d.crop_pct),
                         pruned_structure(self.model), val_fraction=cfg["val_fraction"], seed=cfg["seed"],
                         multi_label=d.multi_label, csv=cfg["csv"], streamed=d.streaming)

    def start(self, meta: dict | None) -> None:
        """A fresh run's first checkpoint, or a resumed run's state restored."""
        if meta is not None:
            if (meta["steps_per_epoch"], meta["total_steps"]) != (self.steps_per_epoch, self.total_steps):
                raise UserError(f"cannot continue the run in {self.run}: it took {meta['steps_per_epoch']} steps an "
                                f"epoch, the data and batch size give {self.steps_per_epoch}")
            meta, rng = self.run.load_resume(self.model, self.optimizer, self.scheduler)
            set_rng_state(rng)
            self.progress = _Progress(meta["epoch"], meta["step_in_epoch"], meta["global_step"],
                                      EpochStats(**meta["stats"]), meta["history"], meta["train_seconds"],
                                      meta["data_seconds"], meta["best_epoch"], meta["stopped_early"])
            log.info("resuming %s at epoch %d, step %d of %d", self.run, self.progress.epoch + 1,
                     self.progress.step_in_epoch, self.steps_per_epoch)
        if self.main:
            self.run.prepare()  # removes what killed writers left, even a first save that never landed
        if meta is None:
            self.checkpoint()  # first, so that the directory is recognized as this run from now on
        if self.main:
            if not self.run.has_model():  # a run killed right after its first save lacks it
                self.run.write_info(self._model_info())
            self.run.write_metrics(self.progress.history)  # on resume: the checkpoint's records are the true ones
        self.params = count_params(self.model)
        self.macs = count_macs(self.model, (self.data.in_chans, *self.data.image_size))

    def start_event(self, max_steps: int | None) -> RunStart:
        return RunStart(out=str(self.run), model=self.cfg["model"], dataset=self.data.name, params=self.params,
                        macs=self.macs, epochs=self.cfg["epochs"], steps_per_epoch=self.steps_per_epoch,
                        total_steps=self.total_steps, global_step=self.progress.global_step,
                        stop_at=min(self.total_steps, max_steps or self.total_steps),
                        runtime=RuntimeFacts(**self.runtime.describe()))

    # -- training

    def _stopped(self, max_steps: int | None) -> bool:
        return self.progress.stopped_early or (max_steps is not None and self.progress.global_step >= max_steps)

    def _save_within_epoch(self, step_in_epoch: int, global_step: int) -> None:
        self.progress.step_in_epoch, self.progress.global_step = step_in_epoch, global_step
        self.checkpoint()

    def train_epoch(self, max_steps: int | None, emit: Callable[[Event], None]) -> bool:
        """Train the current epoch from where it stands; True if it ran to its end."""
        p = self.progress
        self.step.model = self.freezer.apply(self.freezer.frozen(p.epoch), self.step.model, self.runtime.device)
        p.step_in_epoch, p.global_step = train_one_epoch(
            self.step, self.train_loader, self.scheduler, epoch=p.epoch, start_step=p.step_in_epoch,
            global_step=p.global_step, stats=p.stats, max_steps=max_steps, save_every=self.cfg["save_every"],
            save=self._save_within_epoch, report=lambda r: self._report(r, max_steps, emit),
            eval_modules=self.freezer.eval_modules())
        return p.step_in_epoch == self.steps_per_epoch

    def _report(self, report: StepReport, max_steps: int | None, emit: Callable[[Event], None]) -> None:
        """Pass the report on; at the second of this process (the first has the warm-up in it),
        log how long the rest of the training steps will take at this speed."""
        self.reports += 1
        left = min(self.total_steps, max_steps or self.total_steps) - report.global_step
        if self.reports == 2 and self.main and left > 0:
            seconds = left * self.cfg["batch_size"] / max(report.images_per_s, 1e-9)
            took = f"{seconds:.0f} s" if seconds < 120 else (f"{seconds / 60:.0f} min" if seconds < 7200
                                                                else f"{seconds / 3600:.1f} h")
            log.info("%.0f img/s: the remaining %d training steps take about %s (evaluation not counted)",
                     report.images_per_s, left, took)
        emit(report)

    def end_epoch(self, emit: Callable[[Event], None]) -> None:
        """Score the epoch's model on the validation split, record it, keep it if it is the best,
        checkpoint, and stop early where patience says so."""
        p = self.progress
        distributed.share_buffers(self.model)  # every rank scores rank 0's model, the one saved
        result = self._evaluate(self.data.val, "val", emit)
        key = "val_auroc" if self.data.multi_label else "val_acc"  # the score the kept weights are chosen by
        best = not p.history or improves(result.score, result.loss,
                                         next((r for r in p.history if r["epoch"] == p.best_epoch), None), key)
        record = dict(epoch=p.epoch + 1, train_loss=p.stats.loss, train_acc=p.stats.acc, val_loss=result.loss,
                      val_acc=result.accuracy, lr=p.stats.lr, seconds=p.stats.seconds)
        if self.data.multi_label:
            record.update(val_auroc=result.mean_auroc, val_ap=result.mean_average_precision)
        p.history.append(record)
        p.train_seconds += p.stats.seconds
        p.data_seconds += p.stats.data_seconds
        p.epoch, p.step_in_epoch, p.stats = p.epoch + 1, 0, EpochStats()
        if best:
            p.best_epoch = p.epoch
        patience = self.cfg["patience"]
        p.stopped_early = patience is not None and p.epoch - p.best_epoch >= patience and p.epoch < self.cfg["epochs"]
        if self.main and (best or self.cfg["keep"] == "last"):
            self.run.save_weights(self.model)  # the weights the run keeps, as they become so
        self.checkpoint()
        if self.main:
            self.run.write_metrics(p.history)
        emit(EpochEnd(epochs=self.cfg["epochs"], best=best, **record))
        if p.stopped_early:
            log.info("stopping early: %d epoch(s) without a better validation score than epoch %d's",
                     patience, p.best_epoch)

    def loop(self, max_steps: int | None, emit: Callable[[Event], None]) -> None:
        """Train epoch after epoch until the run ends, ``max_steps`` stops it (resumably) or
        patience does."""
        try:
            while self.progress.epoch < self.cfg["epochs"] and not self._stopped(max_steps):
                if not self.train_epoch(max_steps, emit):  # stopped by max_steps inside the epoch
                    self.checkpoint()
                    return
                self.end_epoch(emit)
        except Diverged as e:
            good = self.run.read_resume_meta()["global_step"]
            raise ArgumentError(f"{text(e)}; training stopped. The last good checkpoint (step {good}) is kept in "
                                f"{text(self.run)}; try a lower {{lr}}") from e

    def _keep(self) -> int:
        """Put the kept weights in the model; returns their epoch (0: no epoch ended)."""
        p = self.progress
        kept = (p.epoch if self.cfg["keep"] == "last" else p.best_epoch) if p.history else 0
        if kept and (kept != p.epoch or p.step_in_epoch):  # the model has moved on since: the saved ones
            self.run.load_weights_into(self.model)
        return kept

    def finish(self, emit: Callable[[Event], None]) -> None:
        """The kept weights: scored on the validation split and, once, on the test split; the curves."""
        distributed.share_buffers(self.model)
        kept = self._keep()
        if self.main and not kept:  # no epoch ended: the weights as they are, so that the run loads
            self.run.save_weights(self.model)
        distributed.check_in_sync(self.model)
        self.kept_epoch = kept
        self.kept_eval = self._evaluate(self.data.val, "val", emit) if kept else None
        if self.data.test is not None and self.finished:
            # once, at the end: a run stopped on the way is not scored on it, so that where to
            # stop is never chosen by looking at the test split
            # by the copy `densekit eval` runs (on the CPU an inference copy, whose head rounds
            # differently from the training model's), so that it reproduces this number
            self.test_eval = self._evaluate(self.data.test, "test", emit,
                                            model=for_inference(self.model, self.runtime.device))
        if self.main and self.progress.history:  # drawn once at the end: a figure costs more than a small epoch
            self.run.write_curves(curves_png(self.progress.history, f"{self.cfg['model']} on {self.data.name}"))

    @property
    def finished(self) -> bool:
        p = self.progress
        return p.global_step >= self.total_steps or p.stopped_early

    def summary(self) -> TrainSummary:
        p, cfg, d = self.progress, self.cfg, self.data
        seconds = p.train_seconds + p.stats.seconds
        last = p.history[-1] if p.history else dict(train_loss=p.stats.loss, train_acc=p.stats.acc)
        v, t = self.kept_eval, self.test_eval
        multi = d.multi_label
        return TrainSummary(
            model=cfg["model"], model_args=cfg["model_args"], init=cfg["init"], pretrained=self.pretrained,
            multi_label=multi, dataset=d.name,
            num_classes=d.num_classes, input_size=[d.in_chans, *d.image_size], params=self.params, macs=self.macs,
            epochs=cfg["epochs"], epochs_completed=len(p.history), steps=p.global_step, total_steps=self.total_steps,
            finished=self.finished, batch_size=cfg["batch_size"],
            lr=cfg["lr"], sparsity=cfg["sparsity"], seed=cfg["seed"], train_limit=cfg["train_limit"],
            train_images=len(d.train),
            train_seconds=seconds, data_wait_fraction=(p.data_seconds + p.stats.data_seconds) / max(seconds, 1e-9),
            images_per_second=p.global_step * cfg["batch_size"] / max(seconds, 1e-9),
            train_loss=last["train_loss"], train_acc=last["train_acc"], val_split=d.val_source,
            val_images=len(d.val), kept=cfg["keep"], kept_epoch=self.kept_epoch,
            val_accuracy=None if v is None else v.accuracy, val_loss=None if v is None else v.loss,
            val_auroc=v.mean_auroc if multi and v is not None else None,
            stopped_early=p.stopped_early, test_accuracy=None if t is None else t.accuracy,
            test_loss=None if t is None else t.loss, test_correct=None if t is None else t.correct,
            test_images=0 if d.test is None else len(d.test),
            test_auroc=t.mean_auroc if multi and t is not None else None,
            test_ap=t.mean_average_precision if multi and t is not None else None,
            test_auroc_per_label=dict(zip(d.classes, t.auroc)) if multi and t is not None else None,
            **self.runtime.describe(),
            cuda_graph_captured=self.step.captured, world_size=self.job.world_size, torch=torch.__version__,
            densekit=__version__, recipe=dict(self.recipe.to_dict(), epochs=cfg["epochs"],
                                              batch_size=cfg["batch_size"], lr=cfg["lr"]),
            out=str(self.run))
