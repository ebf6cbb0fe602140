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
from ..rundir import RunDir
from .recipes import get_recipe

log = logging.getLogger(__name__)

DEFAULT_MODEL = "densenet_bc_100_k12"
DEFAULT_DATASET = "fashion-mnist"
DEFAULT_RECIPE = "fast"
DEFAULT_SAVE_EVERY = 200

# The fields that define a run: a directory can only be resumed with the same values.
IDENTITY = ("model", "model_args", "dataset", "image_size", "recipe", "epochs", "batch_size", "lr",
            "seed", "train_limit", "init")
# What a resumed run keeps of its stored config besides its identity.
KEPT = ("data_dir", "deterministic", "save_every")


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


def check_config(config: TrainConfig) -> TrainConfig:
    """The config with every given value checked, and ``init`` made absolute (a run's
    identity: the same directory from any working directory)."""
    for name in ("epochs", "batch_size", "train_limit", "image_size", "max_steps", "save_every"):
        checks.optional(checks.positive_int, name, getattr(config, name))
    checks.optional(checks.positive_number, "lr", config.lr)
    checks.optional(checks.non_negative_int, "seed", config.seed)
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
    return config


def init_defaults(init: str, dataset: str | None = None, data_dir: str | None = None) -> dict:
    """What a run started from ``init`` takes from it unless told otherwise: its model (name and
    arguments, for the records; the model itself is rebuilt from the run) and, unless another
    ``dataset`` is asked for, its data (folder and image size: another dataset's files are
    looked for where that dataset's are, never in the init run's folder; and the init run's
    folder only when no ``data_dir`` is given)."""
    source = RunDir(init)
    info = source.read_info()
    defaults = dict(model=info.model, model_args=info.model_args)
    if dataset is None or dataset == info.dataset:
        defaults.update(dataset=info.dataset, data_dir=source.data_dir(info) if data_dir is None else None)
        if info.dataset == "imagefolder":
            defaults["image_size"] = info.preprocessing.image_size[0]
    return {k: v for k, v in defaults.items() if v is not None}


def _defaults(config: TrainConfig) -> dict:
    base = dict(model=DEFAULT_MODEL, model_args={}, dataset=DEFAULT_DATASET, data_dir=None, image_size=None,
                recipe=DEFAULT_RECIPE, seed=0, train_limit=None, deterministic=False,
                save_every=DEFAULT_SAVE_EVERY, init=None)
    if config.init is not None:
        base.update(init_defaults(config.init, config.dataset, config.data_dir))
    return base


def resolve(config: TrainConfig, stored: dict | None) -> dict:
    """The complete config: given values, else the stored run's, else the defaults."""
    base = dict(stored) if stored is not None else _defaults(config)
    given = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(config, f.name) is not None}
    cfg = {**base, **{k: v for k, v in given.items() if k in base or k in IDENTITY}}
    try:
        recipe = get_recipe(cfg["recipe"])
    except ValueError as e:
        raise ArgumentError(checks.text(e)) from None
    for key in ("epochs", "batch_size", "lr"):
        if cfg.get(key) is None:
            cfg[key] = getattr(recipe, key)
    # as JSON will read it back, so that a stored run compares equal: (1, 1) -> [1, 1]
    cfg["model_args"] = json.loads(json.dumps(cfg.get("model_args") or {}))
    return cfg


def differences(a: dict, b: dict) -> list[str]:
    """How two configs differ in what identifies a run."""
    return [f"{k} is {b.get(k)!r} there, {a.get(k)!r} here" for k in IDENTITY if a.get(k) != b.get(k)]


def default_out(config: TrainConfig) -> Path:
    """runs/<dataset>-<model>-<time>, named by what the run will train (``init``'s if not given)."""
    names = init_defaults(config.init, config.dataset) if config.init is not None else {}
    dataset = config.dataset or names.get("dataset", DEFAULT_DATASET)
    model = config.model or names.get("model", DEFAULT_MODEL)
    return Path("runs") / f"{dataset}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def open_config(run: RunDir, config: TrainConfig) -> tuple[dict, dict | None]:
    """Decide between a fresh run in ``run`` and a resumed one; returns (complete config,
    resume metadata or None). Refuses a folder that holds anything but this run."""
    if run.path.exists() and not run.path.is_dir():
        raise ArgumentError(f"{{out}} {checks.text(run)}: exists and is not a directory")
    if run.is_empty():
        if config.resume:
            raise ArgumentError(f"{{resume}}: {checks.text(run)} holds no run to resume")
        cfg = resolve(config, None)
        if cfg["data_dir"] is not None:  # the same folder whichever directory the run is resumed from
            cfg["data_dir"] = str(Path(cfg["data_dir"]).resolve())
        return cfg, None
    where = checks.text(run)
    if not run.has_resume_state():
        raise ArgumentError(f"{{out}} {where}: directory is not empty and holds no densekit run; "
                            "choose another {out} (densekit never overwrites files)")
    meta = run.read_resume_meta()
    stored = meta["config"]
    cfg = resolve(config, stored if config.resume else None)
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
