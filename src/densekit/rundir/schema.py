"""What a run directory's JSON may hold: every field's type, range and size, checked before
anything is built from it, with one-line errors that name the file and the field.

Run directories travel between people, so their files are a stranger's input. Beyond
types, the model a model.json describes is bounded before it is built: its parameters and
activations, computed from its arguments in closed form (``models.size``), may not exceed
:data:`PARAM_FACTOR` and :data:`ACTIVATION_FACTOR` times those of the largest registered
model, so that no value in a file of a few hundred bytes can cost gigabytes or hours.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from ..checks import ArgumentError
from ..errors import UserError
from ..models.registry import get_variant, list_models, model_kwargs
from ..models.size import estimate

FORMAT = "densekit.run"
FORMAT_VERSION = 1  # the newest run files this densekit reads

PARAM_FACTOR = 4        # x the largest registered model's parameters
ACTIVATION_FACTOR = 16  # x the largest registered model's activations per image, at its own input size
MAX_SIDE = 8192         # pixels: an image side a run may be fed at
MAX_CLASSES = 100_000
MAX_NAME = 1000         # characters of a class name, a path
MAX_INT = 1 << 53       # integers beyond exact float64 have no business in a run's files
MAX_RESUME_META = 16 << 20  # the resume state's JSON: the config, an epoch record per epoch, the optimizer groups
MAX_JSON_BYTES = 1 << 20       # model.json, summary.json: a few kB in practice
MAX_METRICS_BYTES = 16 << 20   # metrics.jsonl: ~200 bytes an epoch
MAX_EPOCHS = 1_000_000


@dataclasses.dataclass(frozen=True)
class Limits:
    params: int
    activations: int


def _limits() -> Limits:
    sizes = [estimate(model_kwargs(n), get_variant(n).input_size[1:]) for n in list_models()]
    return Limits(PARAM_FACTOR * max(s.params for s in sizes), ACTIVATION_FACTOR * max(s.activations for s in sizes))


LIMITS = _limits()


# -- reading fields -----------------------------------------------------------------------------


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """Checked access to a JSON object's fields; errors say ``<source>: field 'a.b' ...``."""

    def __init__(self, obj: dict, source: object, prefix: str = "") -> None:
        self.obj, self.source, self.prefix = obj, source, prefix

    def fail(self, key: str, must: str, value: object = dataclasses.MISSING) -> UserError:
        got = "" if value is dataclasses.MISSING else f", got {_shown(value)}"
        return UserError(f"{self.source}: field '{self.prefix}{key}' must be {must}{got}")

    def get(self, key: str, check: Callable[[Any], bool], must: str, default: object = dataclasses.MISSING):
        if key not in self.obj:
            if default is not dataclasses.MISSING:
                return default
            raise UserError(f"{self.source}: missing field '{self.prefix}{key}'")
        value = self.obj[key]
        if not check(value):
            raise self.fail(key, must, value)
        return value

    def sub(self, key: str, optional: bool = False) -> "Fields | None":
        value = self.get(key, lambda v: isinstance(v, dict), "a JSON object", None if optional else dataclasses.MISSING)
        return None if value is None else Fields(value, self.source, f"{self.prefix}{key}.")

    def only(self, keys: set[str]) -> None:
        unknown = sorted(set(self.obj) - keys)
        if unknown:
            raise UserError(f"{self.source}: unknown field '{self.prefix}{unknown[0]}'")


def is_int(v: object, low: int = 0, high: int = MAX_INT) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def is_number(v: object, low: float = -math.inf, finite: bool = True) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if isinstance(v, int):  # math.isfinite overflows on an int beyond float's range
        return -MAX_INT <= v <= MAX_INT and v >= low
    return (math.isfinite(v) or not finite) and v >= low


def is_text(v: object, most: int = MAX_NAME) -> bool:
    """A string that prints as it is (no control characters, no terminal escapes) and
    encodes as UTF-8 (no lone surrogates)."""
    if not isinstance(v, str) or len(v) > most or not v.isprintable():
        return False
    try:
        v.encode()
    except UnicodeEncodeError:
        return False
    return True


def is_name(v: object) -> bool:
    return is_text(v) and len(v) > 0


def is_slug(v: object) -> bool:
    """A name that is safe in a file name (a registered model name: letters, digits, _ . -)."""
    return isinstance(v, str) and 0 < len(v) <= 100 and v.isascii() and \
        all(c.isalnum() or c in "_.-" for c in v) and not v.startswith(".")


def is_index(k: object) -> bool:
    """A JSON key that is a small non-negative integer ("12"), as optimizer state keys are."""
    return isinstance(k, str) and 0 < len(k) < 10 and k.isascii() and k.isdigit()


def is_registered_model(v: object) -> bool:
    return isinstance(v, str) and v in list_models()


def is_dataset(v: object) -> bool:
    from ..data import DATASETS

    return v in DATASETS or v == "python"  # python: a run of data given in Python (densekit.fit)


def is_recipe(v: object) -> bool:
    from ..train.recipes import RECIPES

    return v in RECIPES


def is_optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def is_list_of(check: Callable[[Any], bool], low: int = 0, high: int = MAX_CLASSES) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and low <= len(v) <= high and all(check(x) for x in v)


# -- model.json ---------------------------------------------------------------------------------


def check_version(f: Fields) -> None:
    version = f.get("format_version", is_int, "an integer >= 0", 0)
    if version > FORMAT_VERSION:
        raise UserError(f"{f.source}: written by a newer densekit (format version {version})")


def check_model(kwargs: dict, image_size: tuple[int, int], classes: int, in_chans: int, source: object) -> None:
    """The model ``kwargs`` describe must be a 2D classifier of ``classes`` outputs on
    ``in_chans`` channels that takes ``image_size``, and cost no more than the limits."""
    args = dict(kwargs)
    if args.get("spatial_dims", 2) != 2 or args.get("features_only", False) is not False:
        raise UserError(f"{source}: the model does not fit its own description: it is not a 2D classifier")
    try:
        size = estimate(kwargs, image_size)
    except ArgumentError as e:
        raise UserError(f"{source}: field 'model_kwargs': {e}") from None
    problems = []
    if args.get("num_classes", 1000) != classes:
        problems.append(f"it has {args.get('num_classes', 1000)} outputs for {classes} classes")
    if args.get("in_chans", 3) != in_chans:
        problems.append(f"it takes {args.get('in_chans', 3)} channels, the preprocessing gives {in_chans}")
    if size.min_input > min(image_size):
        problems.append(f"it needs images of at least {size.min_input} px, the preprocessing gives "
                        f"{'x'.join(map(str, image_size))}")
    if problems:
        raise UserError(f"{source}: the model does not fit its own description: {'; '.join(problems)}")
    if size.params > LIMITS.params:
        raise UserError(f"{source}: field 'model_kwargs' describes a model of {size.params:,} parameters, more "
                        f"than {PARAM_FACTOR}x the largest registered model ({LIMITS.params:,}); refusing to build it")
    if size.activations > LIMITS.activations:
        raise UserError(f"{source}: the model at {'x'.join(map(str, image_size))} px holds {size.activations:,} "
                        f"activations per image, more than {ACTIVATION_FACTOR}x the largest registered model's "
                        f"({LIMITS.activations:,}); refusing to build it")


def check_pruned(pruned: dict, source: object) -> dict:
    """``pruned``: layer name -> {"inputs": n or null, "width": n or null}, or block name ->
    {"outputs": n}; the sizes are checked against the layers and blocks when the structure
    is applied."""
    for name, sizes in pruned.items():
        if not (is_name(name) and isinstance(sizes, dict) and sizes and set(sizes) <= {"inputs", "width", "outputs"}
                and all(is_optional(lambda v: is_int(v, 1))(sizes.get(k)) for k in ("inputs", "width", "outputs"))):
            raise UserError(f"{source}: field 'pruned.{str(name)[:60]}' must give inputs and width, or outputs, as "
                            f"integers >= 1 or null, got {_shown(sizes)}")
    return pruned


# -- the resume state ----------------------------------------------------------------------------

# The config a resume state keeps, field by field.
CONFIG = {
    "model": lambda v: is_registered_model(v) or v == "custom", "model_args": lambda v: isinstance(v, dict), "dataset": is_dataset,
    "data_dir": is_optional(is_name), "image_size": is_optional(lambda v: is_int(v, 1, MAX_SIDE)),
    "recipe": is_recipe, "epochs": lambda v: is_int(v, 1, MAX_EPOCHS), "batch_size": lambda v: is_int(v, 1, 1 << 20),
    "lr": lambda v: is_number(v) and v > 0, "seed": lambda v: is_int(v, 0, (1 << 63) - 1),
    "train_limit": is_optional(lambda v: is_int(v, 1)), "init": is_optional(is_name),
    "deterministic": lambda v: isinstance(v, bool), "save_every": lambda v: is_int(v, 1),
    "val_fraction": lambda v: is_number(v, 0) and v < 1, "keep": lambda v: v in ("best", "last"),
    "patience": is_optional(lambda v: is_int(v, 1)), "workers": is_optional(lambda v: is_int(v, 0, 256)),
    "skip_bad_images": lambda v: isinstance(v, bool),
    "pretrained": is_optional(is_name), "freeze_backbone": lambda v: isinstance(v, bool),
    "head_epochs": lambda v: is_int(v, 0, MAX_EPOCHS), "backbone_lr_scale": lambda v: is_number(v) and v > 0,
    "pos_weight": lambda v: v in (None, "auto"), "sparsity": lambda v: is_number(v, 0) and v < 1, "csv": is_optional(lambda v: isinstance(v, dict) and len(v) <= 16),
    "precision": lambda v: v in ("auto", "fp32", "bf16"),
}
# Config fields a resume state written before they existed lacks: their value then.
LATER_CONFIG = {"pretrained": None, "freeze_backbone": False, "head_epochs": 0, "backbone_lr_scale": 1.0,
                "pos_weight": None, "csv": None, "sparsity": 0.0, "precision": "auto"}
_RECORD = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
_STATS = {"loss_sum": is_number, "correct": is_int, "seen": is_int,
          "seconds": lambda v: is_number(v, 0), "lr": lambda v: is_number(v, 0),
          "data_seconds": lambda v: is_number(v, 0)}


_MULTI_LABEL_RECORD = ("val_auroc", "val_ap")  # a multi-label run's records have these too


def _is_record(r: object) -> bool:
    return isinstance(r, dict) and set(r) - set(_MULTI_LABEL_RECORD) == set(_RECORD) and is_int(r["epoch"], 1) \
        and all(r[k] is None or is_number(r[k], finite=False) for k in r if k != "epoch")


def check_resume(meta: dict, source: object) -> dict:
    """The JSON part of a resume state, every field checked and the steps consistent."""
    f = Fields(meta, source)
    check_version(f)
    config = f.sub("config")
    for key, check in CONFIG.items():
        config.get(key, check, "as a run's config has it", LATER_CONFIG.get(key, dataclasses.MISSING))
    config.only(set(CONFIG))
    data = f.sub("data")
    data.get("train_images", is_int, "an integer >= 0")
    data.get("val_images", is_int, "an integer >= 0")
    data.get("test_images", is_int, "an integer >= 0")
    data.get("classes", is_list_of(is_text, 1), "a list of names")
    data.get("image_size", is_list_of(lambda s: is_int(s, 1, MAX_SIDE), 2, 2), "[height, width]")
    data.get("in_chans", lambda v: v in (1, 3) and not isinstance(v, bool), "1 or 3")
    data.only({"train_images", "val_images", "test_images", "classes", "image_size", "in_chans"})
    spe = f.get("steps_per_epoch", lambda v: is_int(v, 1), "an integer >= 1")
    epochs = config.obj["epochs"]
    f.get("total_steps", lambda v: v == epochs * spe, f"epochs x steps_per_epoch ({epochs * spe})")
    epoch = f.get("epoch", lambda v: is_int(v, 0, epochs), f"an integer from 0 to {epochs}")
    step = f.get("step_in_epoch", lambda v: is_int(v, 0, spe - 1) or (v == 0), f"an integer from 0 to {spe - 1}")
    f.get("global_step", lambda v: v == epoch * spe + step, "epoch x steps_per_epoch + step_in_epoch")
    stats = f.sub("stats")
    for key, check in _STATS.items():
        stats.get(key, check, "a number of the right kind")
    stats.only(set(_STATS))
    f.get("history", lambda v: isinstance(v, list) and len(v) == epoch and all(map(_is_record, v)),
          f"a list of {epoch} epoch records")
    f.get("train_seconds", lambda v: is_number(v, 0), "a number >= 0")
    f.get("data_seconds", lambda v: is_number(v, 0), "a number >= 0")
    f.get("best_epoch", lambda v: is_int(v, 0, epoch), f"an integer from 0 to {epoch}")
    f.get("stopped_early", lambda v: isinstance(v, bool), "true or false")
    f.get("world_size", lambda v: is_int(v, 1, 1 << 16), "an integer >= 1", 1)
    opt = f.sub("optimizer")
    opt.get("param_groups", is_list_of(lambda g: isinstance(g, dict), 1, 64), "a list of parameter groups")
    opt.get("state", lambda v: isinstance(v, dict) and all(
        is_index(k) and isinstance(s, dict) for k, s in v.items()), "per-parameter state")
    opt.only({"param_groups", "state"})
    f.sub("scheduler")
    f.only({"format_version", "config", "data", "epoch", "step_in_epoch", "global_step", "steps_per_epoch",
            "total_steps", "stats", "history", "train_seconds", "data_seconds", "best_epoch", "stopped_early",
            "world_size",
            "optimizer", "scheduler"})
    return meta


def check_like(state: dict, fresh: dict, source: object, field: str, free: tuple[str, ...] = ()) -> None:
    """``state`` (a resume state's optimizer group or scheduler state) must have the keys of
    ``fresh`` (what this densekit builds for the run), each a value of the same kind:
    numbers finite, lists as long (``free`` keys: None or a bool). Nothing else is copied onto
    the live object."""
    if set(state) != set(fresh):
        extra = sorted(set(state) ^ set(fresh))
        raise UserError(f"{source}: field '{field}' has {'unknown' if extra[0] in state else 'no'} "
                        f"entry {extra[0]!r}")
    for key, want in fresh.items():
        got = state[key]
        if key in free and (got is None or isinstance(got, bool)):
            continue
        if not _same_kind(got, want):
            raise UserError(f"{source}: field '{field}.{key}' must be like {_shown(want)}, got {_shown(got)}")


def _same_kind(got: object, want: object) -> bool:
    if isinstance(want, bool) or want is None:
        return got is want or (isinstance(want, bool) and isinstance(got, bool))
    if isinstance(want, (int, float)):
        return is_number(got) and (isinstance(got, int) or not isinstance(want, int))
    if isinstance(want, str):
        return isinstance(got, str)
    if isinstance(want, (list, tuple)):
        return isinstance(got, list) and len(got) == len(want) and all(_same_kind(g, w) for g, w in zip(got, want))
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) == set(want) and all(_same_kind(got[k], want[k]) for k in want)
    return False


# -- summary.json and metrics.jsonl ----------------------------------------------------------------


def check_records(records: list, source: object) -> list[dict]:
    for n, r in enumerate(records, start=1):
        if not _is_record(r):
            raise UserError(f"{source}: line {n} is not an epoch record ({', '.join(_RECORD)})")
    return records


SUMMARY = {
    "model": is_slug, "dataset": is_dataset, "epochs": lambda v: is_int(v, 1, MAX_EPOCHS),
    "epochs_completed": is_int, "steps": is_int, "total_steps": is_int, "finished": lambda v: isinstance(v, bool),
    "params": is_int, "macs": is_int, "test_accuracy": is_optional(lambda v: is_number(v, 0) and v <= 1),
    "val_accuracy": is_optional(lambda v: is_number(v, 0) and v <= 1),
    "test_images": is_int,
}


def check_summary(summary: dict, source: object) -> dict:
    f = Fields(summary, source)
    for key, check in SUMMARY.items():
        f.get(key, check, "as a run's summary has it")
    return summary
