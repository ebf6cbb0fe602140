"""What a benchmark run measures: one :class:`Config` per timed configuration.

A *case* is everything but the implementation (model, batch, input, dtype, layout,
device, mode); each case is run once per implementation, so densekit and its reference
always meet on the same input, precision and layout.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import asdict, dataclass, field, fields

from .. import checks
from ..errors import UserError
from ..models import get_variant, list_models, model_kwargs

DTYPES = ("fp32", "bf16")
LAYOUTS = ("nchw", "channels_last")
DEVICES = ("cpu", "cuda", "auto")
MODES = ("train", "infer")
# densekit trains as `densekit train` does (on CUDA: steps replayed from a CUDA graph);
# densekit-eager is the same without the graph, to see what the graph buys; densekit-ref is
# create_model(..., fused=False), the plain path, to see what the fused block buys;
# densekit-me is create_model(..., memory_efficient=True), the bottlenecks recomputed. A
# "-compile" implementation is the same model under torch.compile (default mode); its first
# step, compilation included, is reported as the warm-up. densekit-optimized is the model's
# optimize_for_inference copy, as `densekit eval` and `predict` run it on the CPU (inference only).
IMPLS = ("densekit", "densekit-eager", "densekit-ref", "densekit-me", "densekit-compile", "densekit-optimized",
         "torchvision", "torchvision-me", "torchvision-compile", "timm")
OPTIMIZED = "densekit-optimized"
# The implementations trained, on CUDA, by densekit's own step replayed from a CUDA graph.
CUDA_GRAPHED = ("densekit", "densekit-me")
REFERENCE = "torchvision"
COMPILED = "-compile"
# The two sides of the best-configuration comparison (report.best_configurations): each
# side's fastest implementation, dtype and layout for a model, batch, input, device and mode.
FAMILIES = {"densekit": ("densekit", "densekit-eager", "densekit-me", "densekit-compile", "densekit-optimized"),
            "torchvision": ("torchvision", "torchvision-me", "torchvision-compile")}


def base_impl(impl: str) -> str:
    """The implementation that builds the network of ``impl`` (a compiled one: the eager one; the
    optimized copy: densekit's)."""
    return "densekit" if impl == OPTIMIZED else impl.removesuffix(COMPILED)

# Depth-L CIFAR networks the registry does not list (the depth sweep: L = 100, 190, 250)
# are the registered L=100 variant with L's block config; the name says how they are built.
_CIFAR_NAME = re.compile(r"densenet(_bc)?_(\d+)_k(\d+)")

# --quick: a network small enough that a test runs each configuration in well under a second.
QUICK = dict(models=["densenet_bc_16_k4"], batch_sizes=[4], input_sizes=[16], steps=3, warmup=1, rounds=2)


def model_spec(name: str) -> tuple[str, dict]:
    """``(registered name, overrides)`` such that ``create_model(*...)`` builds ``name``."""
    if name in list_models():
        return name, {}
    m = _CIFAR_NAME.fullmatch(name)
    if m is None:
        raise UserError(f"unknown model {name!r}; known: {', '.join(list_models())}, "
                        f"or densenet_bc_<L>_k<K> / densenet_<L>_k<K> for any CIFAR depth L and growth rate K")
    bc, depth, k = bool(m.group(1)), int(m.group(2)), int(m.group(3))
    # Four non-block layers (stem conv, two transitions, classifier); a BC layer holds two convs.
    per_layer = 6 if bc else 3
    if depth <= 4 or (depth - 4) % per_layer or k < 1:
        raise UserError(f"model {name!r}: depth L must be 4 + a positive multiple of {per_layer} "
                        f"and k >= 1 for DenseNet{'-BC' if bc else ''}, got L={depth}, k={k}")
    base = "densenet_bc_100_k12" if bc else "densenet_100_k12"
    overrides = dict(growth_rate=k, block_config=((depth - 4) // per_layer,) * 3,
                     num_init_features=2 * k if bc else 16)
    return base, overrides


def cifar_depth(name: str) -> tuple[bool, int, int] | None:
    """``(bc, L, k)`` for a CIFAR-family name (registered or derived), else None."""
    m = _CIFAR_NAME.fullmatch(name)
    return (bool(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def model_arguments(name: str, **overrides) -> dict:
    """The full DenseNet arguments densekit builds ``name`` with (create_model's defaults included)."""
    base, extra = model_spec(name)
    return model_kwargs(base, **extra, **overrides)


@dataclass(frozen=True)
class Config:
    """One timed configuration: a case and the implementation that runs it."""

    model: str
    batch_size: int
    input_size: int        # side of the square input
    in_chans: int
    dtype: str             # fp32, or bf16 under torch.autocast
    layout: str            # nchw or channels_last (model and input both)
    device: str            # cpu or cuda, resolved
    mode: str              # train (forward, backward, SGD step) or infer (inference_mode forward)
    impl: str
    steps: int             # timed steps per round
    warmup: int            # untimed steps before them

    def case(self) -> tuple:
        return (self.model, self.batch_size, self.input_size, self.in_chans, self.dtype,
                self.layout, self.device, self.mode)

    def label(self) -> str:
        return (f"{self.model} {self.mode} {self.input_size}px b{self.batch_size} {self.dtype} "
                f"{self.layout} {self.device} [{self.impl}]")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _positive(name: str, values) -> list[int]:
    return [checks.positive_int(name, v) for v in values]


def _choices(name: str, values, allowed) -> list[str]:
    if not values:
        raise UserError(f"{name} needs at least one value")
    for v in values:
        if v not in allowed:
            raise UserError(f"{name} must be among {', '.join(allowed)}, got {v!r}")
    return list(dict.fromkeys(values))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class BenchSpec:
    """The cartesian product a run measures, validated where it enters.

    ``input_sizes`` / ``in_chans`` of None take each model's own default input.
    ``subprocess`` None means: one subprocess per CPU configuration (so its peak RSS is its
    own), CUDA configurations in this process (max_memory_allocated is exact there).
    """

    models: list[str] = field(default_factory=lambda: ["densenet_bc_100_k12"])
    batch_sizes: list[int] = field(default_factory=lambda: [64])
    input_sizes: list[int] | None = None
    in_chans: int | None = None
    dtypes: list[str] = field(default_factory=lambda: ["fp32"])
    layouts: list[str] = field(default_factory=lambda: ["nchw"])
    devices: list[str] = field(default_factory=lambda: ["auto"])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    impls: list[str] = field(default_factory=lambda: ["densekit", REFERENCE])
    depths: list[int] | None = None
    steps: int = 20
    warmup: int = 3
    rounds: int = 2
    subprocess: bool | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise UserError("models needs at least one name")
        for name in self.models:
            model_spec(name)
        if self.depths is not None:
            _positive("depths", self.depths)
            self.models = list(dict.fromkeys(_with_depth(m, d) for m in self.models for d in self.depths))
        self.models = list(dict.fromkeys(self.models))
        self.batch_sizes = _positive("batch_sizes", self.batch_sizes)
        if self.input_sizes is not None:
            self.input_sizes = _positive("input_sizes", self.input_sizes)
        if self.in_chans is not None:
            _positive("in_chans", [self.in_chans])
        self.dtypes = _choices("dtype", self.dtypes, DTYPES)
        self.layouts = _choices("layout", self.layouts, LAYOUTS)
        self.modes = _choices("mode", self.modes, MODES)
        self.impls = _choices("impl", self.impls, IMPLS)
        devices = _choices("device", self.devices, DEVICES)
        if "cuda" in devices and not _cuda_available():
            raise UserError("device cuda was asked for but torch sees no CUDA device")
        resolved = [("cuda" if _cuda_available() else "cpu") if d == "auto" else d for d in devices]
        self.devices = list(dict.fromkeys(resolved))
        _positive("steps", [self.steps])
        _positive("rounds", [self.rounds])
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise UserError(f"warmup must be a non-negative integer, got {self.warmup!r}")
        if self.warmup < 1 and any(impl.endswith(COMPILED) for impl in self.impls):
            raise UserError(f"warmup must be >= 1 for a compiled implementation (its first step compiles), "
                            f"got {self.warmup}")
        if "cuda" in self.devices and "train" in self.modes and set(CUDA_GRAPHED) & set(self.impls) \
                and self.warmup < 3:
            raise UserError(f"warmup must be >= 3 to train densekit on CUDA (two eager steps, then the CUDA "
                            f"graph's capture), got {self.warmup}")
        self._check_inputs()

    def _check_inputs(self) -> None:
        from ..models import DenseNet

        for name in self.models:
            kwargs = model_arguments(name)
            min_size = DenseNet(**{**kwargs, "num_classes": 0}).min_input_size
            for size in self.input_sizes or [get_variant(model_spec(name)[0]).input_size[1]]:
                if size < min_size:
                    raise UserError(f"input size {size} is too small for {name}: it needs a side >= {min_size}")

    def configs(self) -> list[Config]:
        """Every configuration, grouped by case: the implementations of a case sit together."""
        out = []
        for name in self.models:
            default = get_variant(model_spec(name)[0]).input_size
            for device in self.devices:
                for mode in self.modes:
                    for dtype in self.dtypes:
                        for layout in self.layouts:
                            for size in self.input_sizes or [default[1]]:
                                for batch in self.batch_sizes:
                                    for impl in self.impls:
                                        out.append(Config(name, batch, size, self.in_chans or default[0], dtype,
                                                          layout, device, mode, impl, self.steps, self.warmup))
        return out

    def isolate(self, device: str) -> bool:
        return device == "cpu" if self.subprocess is None else self.subprocess

    def command(self) -> str:
        """The resolved command line that repeats this run."""
        parts = ["densekit", "bench", "--models", *self.models, "--batch-size", *map(str, self.batch_sizes)]
        if self.input_sizes:
            parts += ["--input-size", *map(str, self.input_sizes)]
        if self.in_chans:
            parts += ["--in-chans", str(self.in_chans)]
        parts += ["--dtype", *self.dtypes, "--layout", *self.layouts, "--device", *self.devices,
                  "--mode", *self.modes, "--impl", *self.impls, "--steps", str(self.steps),
                  "--warmup", str(self.warmup), "--rounds", str(self.rounds)]
        if self.subprocess is False:
            parts.append("--in-process")
        return shlex.join(parts)


def _with_depth(name: str, depth: int) -> str:
    parsed = cifar_depth(name)
    if parsed is None:
        raise checks.ArgumentError(f"{{depths}} applies to CIFAR DenseNets (densenet_bc_<L>_k<K>), "
                                   f"not {checks.quote(name)}")
    bc, _, k = parsed
    new = f"densenet{'_bc' if bc else ''}_{depth}_k{k}"
    model_spec(new)
    return new
