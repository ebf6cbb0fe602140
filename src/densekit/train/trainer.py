"""``train``: a whole run, from a config to a run directory (see ``checkpoint`` for its files).

A run is identified by its config (model, dataset, recipe, epochs, batch size, lr,
seed, ...). Pointed at a directory that already holds a run of the same config, ``train``
continues it; any other non-empty directory is refused, so nothing a user had is ever
overwritten. Resuming restores model, optimizer, scheduler, RNG states and the position
inside the epoch; the loader redraws that epoch's order and augmentation from
(seed, epoch), so a resumed run takes exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .. import __version__, distributed
from ..data import DeviceLoader, load_dataset
from ..errors import UserError
from ..models import DenseNet, create_model, model_kwargs
from ..models.profile import count_macs, count_params
from . import checkpoint as ckpt
from .engine import Diverged, EpochStats, eval_loader, evaluate, train_one_epoch
from .plots import curves_png
from .recipes import augment_for, build_optimizer, build_scheduler, get_recipe
from .runtime import rng_state, seed_everything, select_runtime, set_rng_state
from .step import TrainStep

log = logging.getLogger(__name__)

DEFAULT_MODEL = "densenet_bc_100_k12"
DEFAULT_DATASET = "fashion-mnist"
DEFAULT_RECIPE = "fast"
DEFAULT_SAVE_EVERY = 200

# The fields that define a run: a directory can only be resumed with the same values.
IDENTITY = ("model", "model_args", "dataset", "image_size", "recipe", "epochs", "batch_size", "lr",
            "seed", "train_limit", "init")
# Identity fields added later, with the value that runs stored before them had.
_IDENTITY_DEFAULTS = {"init": None}


@dataclasses.dataclass
class TrainConfig:
    """What to train. None means: the stored run's value when resuming, else the default
    (the recipe's for epochs, batch_size and lr)."""

    model: str | None = None
    model_args: dict | None = None      # DenseNet arguments that override the variant's
    init: str | None = None             # a run directory to start from: its model, structure and weights
                                        # (fine-tuning after `densekit prune`); sets model and dataset
    dataset: str | None = None
    data_dir: str | None = None
    image_size: int | None = None       # imagefolder only
    recipe: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int | None = None
    train_limit: int | None = None
    deterministic: bool | None = None
    device: str = "auto"
    channels_last: bool | None = None   # None: the runtime decides (on CUDA only)
    cuda_graph: bool | None = None      # None: the runtime decides (on CUDA only)
    out: str | None = None              # None: runs/<dataset>-<model>-<time>
    resume: bool = False                # the directory must hold a run to continue
    max_steps: int | None = None        # stop (resumably) after this many steps of the run
    save_every: int | None = None       # steps between mid-epoch checkpoints


@dataclasses.dataclass
class Event:
    """What ``train`` reports as it goes: kind is "start", "step" or "epoch"."""

    kind: str
    info: dict


def _positive(name: str, value, kind=int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or not value > 0:
        raise UserError(f"{name} must be a positive {'number' if kind is float else 'integer'}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise UserError(f"{name} must be finite, got {value!r}")


def _check(config: TrainConfig) -> None:
    for name in ("epochs", "batch_size", "train_limit", "image_size", "max_steps", "save_every"):
        _positive(name, getattr(config, name))
    _positive("lr", config.lr, float)
    if config.seed is not None and (isinstance(config.seed, bool) or not isinstance(config.seed, int)
                                    or config.seed < 0):
        raise UserError(f"seed must be an integer >= 0, got {config.seed!r}")
    if config.model_args is not None and not isinstance(config.model_args, dict):
        raise UserError(f"model_args must be a dict, got {type(config.model_args).__name__}")
    if config.init is not None and (config.model is not None or config.model_args):
        raise UserError("--init takes the model, its structure and weights from the run directory; "
                        "drop --model and --model-arg")
    for key in ("num_classes", "in_chans", "features_only", "out_indices"):
        if key in (config.model_args or {}):
            raise UserError(f"model argument {key!r} cannot be set: "
                            + ("it comes from the dataset" if key in ("num_classes", "in_chans")
                               else "training needs the classifier"))


def _resolve(config: TrainConfig, stored: dict | None) -> dict:
    """The complete config: given values, else the stored run's, else the defaults."""
    given = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(config, f.name) is not None}
    if stored is not None:
        base = dict(stored)
    else:
        base = dict(model=DEFAULT_MODEL, model_args={}, dataset=DEFAULT_DATASET, data_dir=None, image_size=None,
                    recipe=DEFAULT_RECIPE, seed=0, train_limit=None, deterministic=False,
                    save_every=DEFAULT_SAVE_EVERY, init=None)
        if config.init is not None:
            base.update(_init_defaults(config.init, config.dataset))
    cfg = {**base, **{k: v for k, v in given.items() if k in base or k in IDENTITY}}
    recipe = get_recipe_or_error(cfg["recipe"])
    for key in ("epochs", "batch_size", "lr"):
        if cfg.get(key) is None:
            cfg[key] = getattr(recipe, key)
    # as JSON will read it back, so that a stored run compares equal: (1, 1) -> [1, 1]
    cfg["model_args"] = json.loads(json.dumps(cfg.get("model_args") or {}))
    return cfg


def _init_defaults(init: str, dataset: str | None = None) -> dict:
    """What a run started from ``init`` takes from it unless told otherwise: its model (name and
    arguments, for the records; the model itself is rebuilt from the run) and, unless another
    ``dataset`` is asked for, its data (folder and image size: another dataset's files are
    looked for where that dataset's are, never in the init run's folder)."""
    info = ckpt.read_model_info(init)
    defaults = dict(model=info["model"], model_args=info.get("model_args") or {})
    if dataset is None or dataset == info.get("dataset"):
        defaults.update(dataset=info.get("dataset"), data_dir=info.get("data_dir"))
        if info.get("dataset") == "imagefolder":
            defaults["image_size"] = info["preprocessing"]["image_size"][0]
    return {k: v for k, v in defaults.items() if v is not None}


def get_recipe_or_error(name: str):
    try:
        return get_recipe(name)
    except ValueError as e:
        raise UserError(str(e)) from None


def _differences(a: dict, b: dict) -> list[str]:
    return [f"{k} is {b.get(k)!r} there, {a.get(k)!r} here" for k in IDENTITY if a.get(k) != b.get(k)]


def _open_run_dir(out: Path, config: TrainConfig) -> tuple[dict, dict | None]:
    """Decide between a fresh run and a resumed one; returns (config, resume meta or None)."""
    resume_path = out / ckpt.RESUME
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    # a run killed inside its very first checkpoint write leaves only that write's temp file
    nonempty = out.is_dir() and any(not ckpt.is_stale_temp(p.name) for p in out.iterdir())
    if not nonempty:
        if config.resume:
            raise UserError(f"--resume: {out} holds no run to resume")
        return _resolve(config, None), None
    if not resume_path.is_file():
        raise UserError(f"--out {out}: directory is not empty and holds no densekit run; "
                        "choose another --out (densekit never overwrites files)")
    meta = ckpt.read_resume_meta(resume_path)
    stored = {**_IDENTITY_DEFAULTS, **meta["config"]}
    lacking = [k for k in (*IDENTITY, "data_dir", "deterministic", "save_every") if k not in stored]
    if lacking:
        raise UserError(f"{resume_path}: corrupt resume state: its config lacks {', '.join(lacking)}")
    cfg = _resolve(config, stored if config.resume else None)
    diff = _differences(cfg, stored)
    if diff:
        if config.resume:
            raise UserError(f"--resume: cannot continue the run in {out} with another config: {'; '.join(diff)}")
        raise UserError(f"--out {out}: holds a run with another config ({'; '.join(diff)}); "
                        "choose another --out, or pass --resume to continue that run as it was")
    if meta["global_step"] >= meta["total_steps"] and (out / ckpt.SUMMARY).is_file() and not config.resume:
        raise UserError(f"--out {out}: holds a finished run of this config; choose another --out")
    return cfg, meta


def _build_model(cfg: dict, dataset, resumed_from: Path | None = None) -> tuple[DenseNet, dict]:
    """The model to train and the DenseNet arguments that rebuild it. ``resumed_from``: the
    run directory being resumed, whose own model.json (pruned structure included) rebuilds a
    model started from ``--init``; the weights then come from its resume state, so the init
    run may be gone by now."""
    if cfg["init"] is not None:
        if resumed_from is not None and (resumed_from / ckpt.MODEL_JSON).is_file():
            info = ckpt.read_model_info(resumed_from)
            return ckpt.build_model(info, resumed_from / ckpt.MODEL_JSON), info["model_kwargs"]
        return _init_model(cfg["init"], dataset)
    args = dict(cfg["model_args"], num_classes=dataset.num_classes, in_chans=dataset.in_chans)
    try:
        model = create_model(cfg["model"], **args)
        kwargs = model_kwargs(cfg["model"], **args)  # what rebuilds it, stored in model.json
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from e
    h, w = dataset.image_size
    if model.min_input_size > min(h, w):
        raise UserError(
            f"model {cfg['model']} needs images of at least {model.min_input_size}x{model.min_input_size} px "
            f"(it downsamples {model.feature_info[-1]['reduction']}x), but {dataset.name} images are {h}x{w}; "
            "pick a CIFAR-style model (e.g. densenet_bc_100_k12)")
    # JSON has no tuples: store the kwargs as they will read back
    return model, {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def _init_model(init: str, dataset) -> tuple[DenseNet, dict]:
    """The model of run directory ``init``, pruned structure and weights included, ready to
    train on ``dataset``; with the DenseNet arguments that rebuild it."""
    model = ckpt.load_run_model(init, "cpu")
    del model.pretrained_cfg  # the new run describes its own preprocessing
    h, w = dataset.image_size
    problems = []
    if model.num_classes != dataset.num_classes:
        problems.append(f"it predicts {model.num_classes} classes, {dataset.name} has {dataset.num_classes}")
    if model.in_chans != dataset.in_chans:
        problems.append(f"it takes {model.in_chans} channels, {dataset.name} images have {dataset.in_chans}")
    if model.min_input_size > min(h, w):
        problems.append(f"it needs images of at least {model.min_input_size} px, {dataset.name} images are {h}x{w}")
    if problems:
        raise UserError(f"--init {init}: its model does not fit the data: {'; '.join(problems)}")
    return model.train(), ckpt.read_model_info(init)["model_kwargs"]


def default_out(config: TrainConfig) -> Path:
    """runs/<dataset>-<model>-<time>, named by what the run will train (``--init``'s if not given)."""
    names = _init_defaults(config.init, config.dataset) if config.init is not None else {}
    dataset = config.dataset or names.get("dataset", DEFAULT_DATASET)
    model = config.model or names.get("model", DEFAULT_MODEL)
    return Path("runs") / f"{dataset}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def _all_finite(model: nn.Module) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


def train(config: TrainConfig, on_event: Callable[[Event], None] | None = None) -> dict:
    """Run (or continue) training as ``config`` says; returns the summary also written to
    ``summary.json``. Reports progress through ``on_event`` (never prints)."""
    _check(config)
    if config.init is not None:  # the identity of a run: the same directory from any working directory
        config = dataclasses.replace(config, init=str(Path(config.init).resolve()))
    # Under torchrun or `densekit train --nproc N`, this process is one rank of a data-parallel
    # job (densekit.distributed): it joins the group here and leaves it when training ends.
    job = distributed.from_env()
    if job.active and config.cuda_graph:
        raise UserError("--cuda-graph: CUDA graphs are not used with several processes; drop it or run one")
    device = _rank_device(config.device, job)
    joined = job.active and not distributed.current().active
    distributed.init(job, device)
    try:
        return _train(config, on_event if job.is_main and on_event else (lambda event: None), job, device)
    finally:
        if joined:
            distributed.shutdown()


def _rank_device(device: str, job: distributed.Dist) -> torch.device:
    """The device of this rank: the one asked for, or with several ranks on CUDA, GPU LOCAL_RANK."""
    dev = select_runtime(device).device
    if job.active and dev.type == "cuda":
        if job.local_rank >= torch.cuda.device_count():
            raise UserError(f"rank {job.rank} needs GPU {job.local_rank}, but only {torch.cuda.device_count()} "
                            "CUDA device(s) exist; start fewer processes")
        dev = torch.device("cuda", job.local_rank)
    return dev


def _train(config: TrainConfig, emit: Callable[[Event], None], job: distributed.Dist,
           device: torch.device) -> dict:
    main = job.is_main  # the rank that writes the run directory
    out = Path(config.out) if config.out else default_out(config)
    out = distributed.broadcast_object(out)  # a default name comes from rank 0's clock
    cfg, meta = _open_run_dir(out, config)
    distributed.check_batch_split(cfg["batch_size"], job.world_size)
    if meta is not None and meta.get("world_size", 1) != job.world_size:
        log.warning("continuing a run of %d process(es) with %d: the batches are the same, but batch norm "
                    "now sees other shares of them, so the result will not match an uninterrupted run",
                    meta.get("world_size", 1), job.world_size)
    distributed.barrier()  # every rank has read the directory before rank 0 writes to it
    recipe = get_recipe_or_error(cfg["recipe"])
    runtime = select_runtime(str(device), config.channels_last, bool(cfg["deterministic"]),
                             False if job.active else config.cuda_graph)
    shard = (job.rank, job.world_size) if job.active else None
    dataset = load_dataset(cfg["dataset"], cfg["data_dir"], cfg["train_limit"], cfg["image_size"])
    data_facts = dict(train_images=len(dataset.train), test_images=len(dataset.test), classes=dataset.classes,
                      image_size=list(dataset.image_size), in_chans=dataset.in_chans)
    if meta is not None and meta["data"] != data_facts:
        diff = [f"{k} {meta['data'].get(k)!r} there, {v!r} here" for k, v in data_facts.items()
                if meta["data"].get(k) != v]
        raise UserError(f"cannot continue the run in {out}: its data differ ({'; '.join(diff)})")

    with runtime.activated():
        seed_everything(cfg["seed"])
        model, kwargs = _build_model(cfg, dataset, None if meta is None else out)
        runtime.prepare(model)
        train_loader = DeviceLoader(dataset.train, cfg["batch_size"], mean=dataset.mean, std=dataset.std,
                                    device=runtime.device, shuffle=True, augment=augment_for(recipe, dataset.name),
                                    drop_last=True, seed=cfg["seed"], channels_last=runtime.channels_last,
                                    shard=shard)
        steps_per_epoch = len(train_loader)
        if steps_per_epoch == 0:
            raise UserError(f"batch size {cfg['batch_size']} is larger than the {len(dataset.train)} training "
                            "images; lower --batch-size")
        total_steps = cfg["epochs"] * steps_per_epoch
        test_loader = eval_loader(dataset.test, dataset.mean, dataset.std, runtime, shard=shard)
        optimizer = build_optimizer(model, recipe, cfg["lr"], fused=runtime.cuda_graph)
        scheduler = build_scheduler(optimizer, recipe, steps_per_epoch, total_steps)
        criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
        train_step = TrainStep(distributed.wrap(model, runtime.device), optimizer, criterion, runtime,
                               cuda_graph=runtime.cuda_graph)
        resume_path = out / ckpt.RESUME

        if meta is None:
            epoch, start_step, global_step = 0, 0, 0
            stats, history, train_seconds = EpochStats(), [], 0.0
        else:
            meta, rng = ckpt.load_resume(resume_path, model, optimizer, scheduler)
            set_rng_state(rng)
            epoch, start_step, global_step = meta["epoch"], meta["step_in_epoch"], meta["global_step"]
            stats, history, train_seconds = EpochStats(**meta["stats"]), meta["history"], meta["train_seconds"]
            log.info("resuming %s at epoch %d, step %d of %d", out, epoch + 1, start_step, steps_per_epoch)

        def save(epoch: int, step_in_epoch: int, global_step: int) -> None:
            if not _all_finite(model):  # on every rank: they all hold the same weights and stop together
                raise Diverged(f"the weights became non-finite by step {global_step}", global_step)
            if main:
                ckpt.save_resume(resume_path, model, optimizer, scheduler, rng_state(), dict(
                    config=cfg, data=data_facts, epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step,
                    steps_per_epoch=steps_per_epoch, total_steps=total_steps, stats=dataclasses.asdict(stats),
                    history=history, train_seconds=train_seconds, world_size=job.world_size))

        if main:
            out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temps(out)  # what killed writers left, even that of a first save that never landed
        if meta is None:
            save(0, 0, 0)  # first, so that the directory is recognized as this run from now on
        if main and not (out / ckpt.MODEL_JSON).is_file():  # a run killed right after its first save lacks it
            ckpt.write_json(out / ckpt.MODEL_JSON, ckpt.model_info(
                cfg["model"], cfg["model_args"], kwargs, dataset,
                None if cfg["data_dir"] is None else str(Path(cfg["data_dir"]).resolve()),
                ckpt.pruned_structure(model)))
        if main:
            ckpt.write_metrics(out, history)  # on resume: the checkpoint's records are the true ones

        params = count_params(model)
        macs = count_macs(model, (dataset.in_chans, *dataset.image_size))
        emit(Event("start", dict(out=str(out), model=cfg["model"], dataset=dataset.name, params=params, macs=macs,
                                 epochs=cfg["epochs"], steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                                 global_step=global_step, runtime=runtime.describe(),
                                 stop_at=min(total_steps, config.max_steps or total_steps))))

        last_eval = None
        stopped = config.max_steps is not None and global_step >= config.max_steps
        try:
            while epoch < cfg["epochs"] and not stopped:
                step, global_step = train_one_epoch(
                    train_step, train_loader, scheduler,
                    epoch=epoch, start_step=start_step, global_step=global_step, stats=stats,
                    max_steps=config.max_steps, save_every=cfg["save_every"],
                    save=lambda s, g: save(epoch, s, g),
                    report=lambda r: emit(Event("step", dataclasses.asdict(r))))
                if step < steps_per_epoch:  # stopped by max_steps inside the epoch
                    save(epoch, step, global_step)
                    stopped = True
                    break
                distributed.share_buffers(model)  # every rank scores rank 0's model, the one saved
                last_eval = evaluate(model, test_loader, runtime, dataset.num_classes)
                record = dict(epoch=epoch + 1, train_loss=stats.loss, train_acc=stats.acc, test_loss=last_eval.loss,
                              test_acc=last_eval.accuracy, lr=stats.lr, seconds=stats.seconds)
                history.append(record)
                train_seconds += stats.seconds
                epoch, start_step, stats = epoch + 1, 0, EpochStats()
                save(epoch, 0, global_step)
                if main:
                    ckpt.write_metrics(out, history)
                    ckpt.save_weights(out / ckpt.WEIGHTS, model)
                emit(Event("epoch", dict(record, epochs=cfg["epochs"])))
                stopped = config.max_steps is not None and global_step >= config.max_steps
        except Diverged as e:
            good = ckpt.read_resume_meta(resume_path)["global_step"]
            raise UserError(f"{e}; training stopped. The last good checkpoint ({resume_path}, step {good}) "
                            "is kept; try a lower --lr") from e

        distributed.share_buffers(model)
        if last_eval is None:
            last_eval = evaluate(model, test_loader, runtime, dataset.num_classes)
        distributed.check_in_sync(model)
        if main:
            ckpt.save_weights(out / ckpt.WEIGHTS, model)
        if main and history:  # drawn once at the end: a figure costs more than a small model's epoch
            ckpt.atomic_write(out / ckpt.CURVES, curves_png(history, f"{cfg['model']} on {dataset.name}"))

    finished = global_step >= total_steps
    summary = dict(
        model=cfg["model"], model_args=cfg["model_args"], init=cfg["init"], dataset=dataset.name,
        num_classes=dataset.num_classes,
        input_size=[dataset.in_chans, *dataset.image_size], params=params, macs=macs,
        epochs=cfg["epochs"], epochs_completed=len(history), steps=global_step, total_steps=total_steps,
        finished=finished, batch_size=cfg["batch_size"], lr=cfg["lr"], seed=cfg["seed"],
        train_limit=cfg["train_limit"], train_images=len(dataset.train),
        train_seconds=train_seconds + stats.seconds,
        images_per_second=global_step * cfg["batch_size"] / max(train_seconds + stats.seconds, 1e-9),
        train_loss=history[-1]["train_loss"] if history else stats.loss,
        train_acc=history[-1]["train_acc"] if history else stats.acc,
        test_accuracy=last_eval.accuracy, test_loss=last_eval.loss, test_correct=last_eval.correct,
        test_images=last_eval.total,
        **runtime.describe(), cuda_graph_captured=train_step.captured, world_size=job.world_size,
        torch=torch.__version__, densekit=__version__,
        recipe=dict(recipe.to_dict(), epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"]),
        out=str(out),
    )
    if main:
        ckpt.write_json(out / ckpt.SUMMARY, summary)
    return summary
