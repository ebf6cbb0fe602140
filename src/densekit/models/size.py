"""The size of a DenseNet from its arguments alone, in closed form, before anything is built.

A description of a model can come from a stranger (a run directory's model.json): building
it to find out what it costs would already pay the cost. :func:`estimate` checks the
arguments as :class:`DenseNet` does and sums, per dense block, the arithmetic series of
its layers' input widths, so its work does not grow with the depth or width it is given;
Python's integers do not overflow. The parameter count is exact (the tests hold it to
``count_params`` for every registered model); ``activations`` counts the elements, per
input, of the maps a fused training step keeps: the stem convolution's output (and its
pooled map), each block's concatenated output and each layer's bottleneck map, and each
transition's output.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence

from .. import checks
from .densenet import STEMS, DenseNet, _check_block_config, _check_head, _growth_rates


@dataclasses.dataclass(frozen=True)
class Size:
    params: int        # learnable parameters (batch-norm statistics are buffers, not counted)
    activations: int   # elements per input a training step keeps (see the module docstring)
    min_input: int     # the smallest side the network takes


_ARGUMENTS = set(inspect.signature(DenseNet.__init__).parameters) - {"self"}
_DEFAULTS = {k: p.default for k, p in inspect.signature(DenseNet.__init__).parameters.items() if k != "self"}


def _windows(stem: str, stem_stride: int, num_blocks: int):
    """(kernel, stride, padding) of every downsampling step, as DenseNet._windows has them."""
    yield (7, 2, 3) if stem == "imagenet" else (3, stem_stride, 1)
    if stem == "imagenet":
        yield 3, 2, 1
    for _ in range(num_blocks - 1):
        yield 2, 2, 0


def _side(size: int, windows) -> int:
    for k, s, p in windows:
        size = max(0, (size + 2 * p - k) // s + 1)
    return size


def estimate(kwargs: dict, spatial: Sequence[int]) -> Size:
    """The :class:`Size` of ``DenseNet(**kwargs)`` on inputs of sides ``spatial``; raises
    :class:`~densekit.checks.ArgumentError` where DenseNet would refuse the arguments."""
    unknown = sorted(set(kwargs) - _ARGUMENTS)
    if unknown:
        raise checks.ArgumentError(f"unknown DenseNet argument {checks.quote(unknown[0])}")
    a = {**_DEFAULTS, **kwargs}
    blocks = _check_block_config(a["block_config"])
    rates = _growth_rates(a["growth_rate"], len(blocks))
    checks.one_of("stem", a["stem"], STEMS)
    checks.one_of("stem_stride", a["stem_stride"], (1, 2))
    dims = checks.one_of("spatial_dims", a["spatial_dims"], (1, 2, 3))
    in_chans = checks.positive_int("in_chans", a["in_chans"])
    _check_head(a["num_classes"], a["global_pool"])
    compression = checks.fraction("compression", a["compression"], high_included=True, low_included=False)
    bn_size = a["bn_size"] or 0
    if bn_size:
        checks.positive_int("bn_size", bn_size)
    c = a["num_init_features"] if a["num_init_features"] is not None else 2 * rates[0]
    checks.positive_int("num_init_features", c)
    if len(spatial) != dims:
        raise checks.ArgumentError(f"{{spatial_dims}} {dims} does not match an input of {len(spatial)} sides")

    stem_kernel = 7 if a["stem"] == "imagenet" else 3
    params = in_chans * c * stem_kernel ** dims + (2 * c if a["stem"] != "cifar" else 0)
    windows = list(_windows(a["stem"], a["stem_stride"], len(blocks)))
    activations = c * math.prod(_side(s, windows[:1]) for s in spatial)  # the stem convolution's output
    if a["stem"] == "imagenet":
        activations += c * math.prod(_side(s, windows[:2]) for s in spatial)  # after its max-pool
    sides = [_side(s, windows[:2 if a["stem"] == "imagenet" else 1]) for s in spatial]
    for i, (n, k) in enumerate(zip(blocks, rates)):
        widths = n * c + k * n * (n - 1) // 2  # the sum of the n layers' input widths
        if bn_size:
            w = bn_size * k
            params += 2 * widths + widths * w + n * (2 * w + w * k * 3 ** dims)
            activations += n * w * math.prod(sides)  # each layer's bottleneck map
        else:
            params += 2 * widths + widths * k * 3 ** dims
        c += n * k
        activations += c * math.prod(sides)  # the block's buffer
        if i != len(blocks) - 1:
            out = max(1, int(c * compression))
            params += 2 * c + c * out
            c = out
            sides = [s // 2 for s in sides]
            activations += c * math.prod(sides)  # the transition's output
    params += 2 * c
    if a["num_classes"] and not a["features_only"]:
        params += c * a["num_classes"] + a["num_classes"]
    need = 1
    for k, s, p in reversed(windows):
        need = max(1, (need - 1) * s + k - 2 * p)
    return Size(params=params, activations=activations, min_input=need)
