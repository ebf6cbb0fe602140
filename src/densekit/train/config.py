"""What to train: the config a user gives, checked, and the complete config a run keeps.

A run is identified by its config (model, dataset, recipe, epochs, batch size, lr, seed,
...): a run directory can only be continued with the same values. Values left as None
come from the stored run when resuming, else from the defaults (the recipe's for epochs,
batch size and lr; ``init``'s model and data when starting from another run).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from .. import checks
from ..checks import ArgumentError
from ..data.datasets import FIXED_SIZE
from ..models import get_variant, list_models, model_kwargs
from ..models.size import estimate
from ..rundir import RunDir
from ..rundir.schema import LATER_CONFIG, MAX_SIDE
from .recipes import get_recipe

log = logging.getLogger(__name__)

DEFAULT_MODEL = "densenet_bc_100_k12"   # on a GPU: the paper's BC-100, 0.77M parameters on Fashion-MNIST
# On a CPU, where DenseNet-BC-100 trains at tens of images a second: `make run`'s model and length,
# which reach 91% on Fashion-MNIST in about five minutes on 2 cores (docs/performance.md).
CPU_MODEL, CPU_EPOCHS = "densenet_bc_40_k12_s2", 3
DEFAULT_DATASET = "fashion-mnist"
CUSTOM_MODEL = "custom"  # the name of a model given in Python (densekit.fit) with no registered architecture
DEFAULT_RECIPE = "fast"
DEFAULT_SAVE_EVERY = 200
DEFAULT_VAL_FRACTION = 0.1
KEEP = ("best", "last")

# The fields that define a run: a directory can only be resumed with the same values.
IDENTITY = ("model", "model_args", "dataset", "image_size", "recipe", "epochs", "batch_size", "lr",
            "seed", "train_limit", "init", "val_fraction", "keep", "patience", "pretrained", "freeze_backbone",
            "head_epochs", "backbone_lr_scale", "pos_weight", "csv", "sparsity")
# Fields added since runs were first stored: a stored config without them had these values.
LATER = LATER_CONFIG
POS_WEIGHT = ("auto",)
# What a resumed run keeps of its stored config besides its identity (unless given again).
KEPT = ("data_dir", "deterministic", "save_every", "workers", "skip_bad_images", "precision")


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
    precision: str | None = None        # "fp32", "bf16" (autocast) or "auto": bf16 where the device has bf16
                                        # arithmetic (None: auto, or what a resumed run was started with)
    cuda_graph: bool | None = None      # None: the runtime decides (on CUDA only)
    out: str | None = None              # None: runs/<dataset>-<model>-<time>
    resume: bool = False                # the directory must hold a run to continue
    max_steps: int | None = None        # stop (resumably) after this many steps of the run
    save_every: int | None = None       # steps between mid-epoch checkpoints
    val_fraction: float | None = None   # of the training images held out for validation, where the dataset
                                        # has no validation split of its own (default 0.1)
    keep: str | None = None             # the weights a run keeps: "best" (by validation accuracy) or "last"
                                        # (default: the recipe's)
    patience: int | None = None         # stop after this many epochs without a better validation accuracy
    workers: int | None = None          # processes decoding streamed images (default: one per core, at most 8)
    skip_bad_images: bool | None = None  # skip files that do not decode, with a warning, instead of stopping
    pretrained: str | None = None       # weights to start from: a torchvision/timm file or a run directory
                                        # (models.pretrained); the classifier is new where the classes differ
    freeze_backbone: bool | None = None  # train the classifier only (a linear probe of the pretrained features)
    head_epochs: int | None = None      # the first N epochs train the classifier only, then everything
    backbone_lr_scale: float | None = None  # the backbone's learning rate as a fraction of the classifier's
    pos_weight: str | None = None       # multi-label: "auto" weighs each label's positives by negatives/positives
    csv: dict | None = None             # the csv dataset: its CSV files and columns (data.csvfile.CsvLayout's fields)
    sparsity: float | None = None       # L1 weight on the prunable batch-norm scales (network slimming's lambda)


def check_config(config: TrainConfig) -> TrainConfig:
    """The config with every given value checked, and ``init`` made absolute (a run's
    identity: the same directory from any working directory)."""
    for name in ("epochs", "batch_size", "train_limit", "image_size", "max_steps", "save_every", "patience"):
        checks.optional(checks.positive_int, name, getattr(config, name))
    if config.image_size is not None and config.image_size > MAX_SIDE:
        raise ArgumentError(f"{{image_size}} {config.image_size} is above the largest side a run keeps ({MAX_SIDE})")
    checks.optional(checks.positive_number, "lr", config.lr)
    checks.optional(checks.non_negative_int, "seed", config.seed)
    checks.optional(checks.non_negative_int, "workers", config.workers)
    checks.optional(checks.non_negative_int, "head_epochs", config.head_epochs)
    checks.optional(checks.positive_number, "backbone_lr_scale", config.backbone_lr_scale)
    checks.optional(checks.fraction, "sparsity", config.sparsity)
    checks.optional(lambda name, v: checks.one_of(name, v, POS_WEIGHT), "pos_weight", config.pos_weight)
    if config.pretrained is not None and config.init is not None:
        raise ArgumentError("{pretrained} and {init} both say where to start from; give one")
    if config.sparsity and config.freeze_backbone:
        raise ArgumentError("{sparsity} acts on the backbone's batch-norm scales, which {freeze_backbone} keeps "
                            "fixed: give one")
    if config.freeze_backbone and config.head_epochs:
        raise ArgumentError("{freeze_backbone} trains the classifier alone in every epoch; {head_epochs} only "
                            "in the first ones: give one")
    if config.val_fraction is not None:
        checks.fraction("val_fraction", config.val_fraction)
    checks.optional(lambda name, v: checks.one_of(name, v, KEEP), "keep", config.keep)
    if config.model is not None and config.model not in list_models():
        raise ArgumentError(f"{{model}}: unknown model {checks.quote(config.model)}; known: "
                            f"{', '.join(list_models())}")
    if config.model_args is not None and not isinstance(config.model_args, dict):
        raise ArgumentError(f"{{model_args}} must be a dict, got {type(config.model_args).__name__}")
    if config.init is not None and (config.model is not None or config.model_args):
        raise ArgumentError("{init} takes the model, its structure and weights from the run directory; "
                            "drop {model} and {model_args}")
    for key in ("num_classes", "in_chans", "features_only", "out_indices", "global_pool"):
        if key in (config.model_args or {}):
            raise ArgumentError(f"{{model_args}}: {checks.quote(key)} cannot be set: " +
                                ("it comes from the dataset" if key in ("num_classes", "in_chans")
                                 else "training needs the classifier"))
    if config.resume and not config.out:
        raise ArgumentError("{resume} needs {out}, the run to continue")
    if config.init is not None:
        config = dataclasses.replace(config, init=str(Path(config.init).resolve()))
    if config.csv is not None:
        from ..data.csvfile import CsvLayout, layout_from_dict

        layout = config.csv if isinstance(config.csv, CsvLayout) else layout_from_dict(config.csv)
        config = dataclasses.replace(config, csv=json.loads(json.dumps(dataclasses.asdict(layout))))
    if config.pretrained is not None and Path(config.pretrained).exists():  # a bare name stays a name
        config = dataclasses.replace(config, pretrained=str(Path(config.pretrained).resolve()))
    return config


def init_defaults(init: str, dataset: str | None = None, data_dir: str | None = None) -> dict:
    """What a run started from ``init`` takes from it unless told otherwise: its model (name and
    arguments, for the records; the model itself is rebuilt from the run) and, unless another
    ``dataset`` is asked for, its data (folder and image size: another dataset's files are
    looked for where that dataset's are, never in the init run's folder; and the init run's
    folder only when no ``data_dir`` is given)."""
    source = RunDir(init)
    info = source.read_info()
    defaults = dict(model=info.model, model_args=info.model_args, image_size=info.preprocessing.image_size[0])
    if dataset is None or dataset == info.dataset:
        defaults.update(dataset=info.dataset, data_dir=source.data_dir(info) if data_dir is None else None)
    return {k: v for k, v in defaults.items() if v is not None}


def default_model(device_type: str) -> str:
    return CPU_MODEL if device_type == "cpu" else DEFAULT_MODEL


def natural_size(model: str, dataset: str) -> int | None:
    """The image side a model is trained at unless told: its own for the ImageNet variants
    (224); for the CIFAR-style ones, None on a fixed-size dataset (its images' own side: 28 for
    Fashion-MNIST, 32 for CIFAR), else the variant's (32)."""
    variant = get_variant(model)
    if variant.stem == "imagenet":
        return variant.input_size[-1]
    return None if dataset in FIXED_SIZE else variant.input_size[-1]


def _defaults(config: TrainConfig, device_type: str, model_name: str | None = None) -> dict:
    base = dict(model=default_model(device_type), model_args={}, dataset=DEFAULT_DATASET, data_dir=None,
                image_size=None, recipe=DEFAULT_RECIPE, seed=0, train_limit=None, deterministic=False,
                save_every=DEFAULT_SAVE_EVERY, init=None, val_fraction=DEFAULT_VAL_FRACTION, keep=None,
                patience=None, workers=None, skip_bad_images=False, **LATER)
    if model_name is not None:  # a model given in Python
        base.update(model=model_name)
    elif config.init is not None:
        base.update(init_defaults(config.init, config.dataset, config.data_dir))
    elif config.pretrained is not None:
        from .finetune import pretrained_defaults

        base.update(pretrained_defaults(config.pretrained, bool(config.freeze_backbone)))
        if config.recipe is None:
            log.info("the %s recipe: %s (give a recipe to choose)", base["recipe"],
                     "a linear probe of the frozen backbone" if config.freeze_backbone else "fine-tuning")
    elif config.model is None and device_type == "cpu" and config.epochs is None:
        base["epochs"] = CPU_EPOCHS
        log.info("no model given: training %s for %d epochs, sized for a CPU (give a model and epochs to choose)",
                 CPU_MODEL, CPU_EPOCHS)
    return base


def resolve(config: TrainConfig, stored: dict | None, device_type: str = "cpu", model_name: str | None = None) -> dict:
    """The complete config: given values, else the stored run's, else the defaults (some by
    the device: a smaller model and fewer epochs on a CPU). ``model_name`` names a model
    given in Python, which the config then trains (and which its data is checked against)."""
    base = dict(LATER, **stored) if stored is not None else _defaults(config, device_type, model_name)
    given = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(config, f.name) is not None}
    cfg = {**base, **{k: v for k, v in given.items() if k in base or k in IDENTITY}}
    try:
        recipe = get_recipe(cfg["recipe"])
    except ValueError as e:
        raise ArgumentError(checks.text(e)) from None
    for key in ("epochs", "batch_size", "lr", "keep"):
        if cfg.get(key) is None:
            cfg[key] = getattr(recipe, key)
    if cfg.get("sparsity") and recipe.optimizer != "sgd":
        # Adam divides each gradient by its running scale: lam * sign(gamma) would move a scale by
        # about lr whatever lam is, so lam would mean nothing
        raise ArgumentError(f"{{sparsity}} needs an SGD recipe (fast, paper, sprint, long), not {recipe.name}, "
                            f"whose {recipe.optimizer} scales the penalty away")
    if cfg.get("image_size") is None and stored is None:
        cfg["image_size"] = natural_size(cfg["model"], cfg["dataset"])
    # as JSON will read it back, so that a stored run compares equal: (1, 1) -> [1, 1]
    cfg["model_args"] = json.loads(json.dumps(cfg.get("model_args") or {}))
    if model_name is None:
        _check_fits_model(cfg)
    return cfg


def _check_fits_model(cfg: dict) -> None:
    """The image size against the model, before any data is read: the model's downsampling
    must leave at least one pixel (its arguments checked on the way)."""
    if cfg["init"] is not None or cfg["image_size"] is None:  # checked against the data when loaded
        return
    try:
        size = estimate(model_kwargs(cfg["model"], **cfg["model_args"]), (cfg["image_size"],) * 2)
    except (TypeError, ValueError) as e:
        raise ArgumentError(f"{{model_args}}: {checks.text(e)}") from None
    if size.min_input > cfg["image_size"]:
        raise ArgumentError(f"{{image_size}} {cfg['image_size']} is below the smallest input {cfg['model']} takes "
                            f"({size.min_input} px: it downsamples its input); give a larger one or a CIFAR-style "
                            "model (e.g. densenet_bc_100_k12)")


def differences(a: dict, b: dict) -> list[str]:
    """How two configs differ in what identifies a run."""
    return [f"{k} is {b.get(k)!r} there, {a.get(k)!r} here" for k in IDENTITY if a.get(k) != b.get(k)]


def default_out(config: TrainConfig, device_type: str = "cpu") -> Path:
    """runs/<dataset>-<model>-<time>, named by what the run will train (``init``'s if not given)."""
    if config.init is not None:
        names = init_defaults(config.init, config.dataset)
    elif config.pretrained is not None:
        from .finetune import pretrained_defaults

        names = pretrained_defaults(config.pretrained)
    else:
        names = {}
    dataset = config.dataset or names.get("dataset", DEFAULT_DATASET)
    model = config.model or names.get("model", default_model(device_type))
    return Path("runs") / f"{dataset}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def open_config(run: RunDir, config: TrainConfig, device_type: str = "cpu",
                model_name: str | None = None) -> tuple[dict, dict | None]:
    """Decide between a fresh run in ``run`` and a resumed one; returns (complete config,
    resume metadata or None). Refuses a folder that holds anything but this run."""
    if run.path.exists() and not run.path.is_dir():
        raise ArgumentError(f"{{out}} {checks.text(run)}: exists and is not a directory")
    if run.is_empty():
        if config.resume:
            raise ArgumentError(f"{{resume}}: {checks.text(run)} holds no run to resume")
        cfg = resolve(config, None, device_type, model_name)
        if cfg["data_dir"] is not None:  # the same folder whichever directory the run is resumed from
            cfg["data_dir"] = str(Path(cfg["data_dir"]).resolve())
        return cfg, None
    where = checks.text(run)
    if not run.has_resume_state():
        raise ArgumentError(f"{{out}} {where}: directory is not empty and holds no densekit run; "
                            "choose another {out} (densekit never overwrites files)")
    meta = run.read_resume_meta()
    stored = meta["config"]
    cfg = resolve(config, stored if config.resume else None, device_type, model_name)
    diff = checks.text("; ".join(differences(cfg, stored)))
    if diff:
        if config.resume:
            raise ArgumentError(f"{{resume}}: cannot continue the run in {where} with another config: {diff}")
        raise ArgumentError(f"{{out}} {where}: holds a run with another config ({diff}); choose another {{out}}, "
                            "or pass {resume} to continue that run as it was")
    if meta["global_step"] >= meta["total_steps"] and run.has_summary() and not config.resume:
        raise ArgumentError(f"{{out}} {where}: holds a finished run of this config; choose another {{out}}")
    if config.data_dir is None:
        cfg["data_dir"] = run.stored_data_dir(cfg["data_dir"], cfg["dataset"])
    return cfg, meta
