"""Feature reuse: how much weight each layer of a dense block puts on each earlier layer's maps.

Huang et al. 2017 (arXiv:1608.06993), Fig. 5, "Feature Reuse": for a trained DenseNet, cell
(s, l) of a block's heatmap is the average absolute weight of the connection from source s
(s = 0: the block input; s = j: the k maps layer j added) to target layer l, taken over the
input feature maps s contributes, so that a source with more maps does not look heavier.
The columns after the block's layers are the transition that reads the whole block and, for
the last block, the classifier.

The weights are those of the first convolution each layer applies to the concatenation
(conv1: the 1x1 bottleneck, or the 3x3 convolution of a plain layer), the transition's 1x1
convolution and the classifier's matrix: the ones that see every source. A layer whose input
was pruned (``DenseLayer.input_index``) reads a subset of the channels; its weights are put
back at the channels they read and a channel it no longer reads counts as 0, since that
connection is cut.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..models import DenseBlock, DenseLayer, DenseNet, Transition


def source_widths(block: DenseBlock) -> list[int]:
    """Channels each source adds to the block's concatenation: the block input, then each
    layer's new maps, read from the modules (a pruned layer may emit fewer than k)."""
    widths = [block.in_channels]
    for layer in block.values():
        last_conv = layer.conv2 if layer.has_bottleneck else layer.conv1
        widths.append(last_conv.out_channels)
    return widths


def channel_weights(weight: torch.Tensor, input_index: torch.Tensor | None = None,
                    width: int | None = None) -> torch.Tensor:
    """Mean |w| per input channel of a convolution or linear weight (dim 1 is the input),
    placed at the channel of the concatenation it reads.

    With ``input_index`` the weight's input channel j reads channel ``input_index[j]`` of a
    concatenation of ``width`` channels; channels nobody reads get 0.
    """
    w = weight.detach().abs().to(torch.float64).transpose(0, 1)
    per_channel = w.reshape(w.shape[0], -1).mean(dim=1)
    if input_index is None:
        return per_channel
    full = torch.zeros(width, dtype=torch.float64)
    full[input_index.to(torch.long).cpu()] = per_channel
    return full


def _column(per_channel: torch.Tensor, widths: list[int], num_sources: int) -> tuple[list, list]:
    """(mean |w| per source, share of the L1 mass per source) for one target, None past its sources."""
    chunks = per_channel.split(widths[:_count(widths, len(per_channel))])
    means = [float(c.mean()) for c in chunks]
    total = float(per_channel.sum())
    shares = [float(c.sum()) / total if total > 0 else 0.0 for c in chunks]
    pad = [None] * (num_sources - len(chunks))
    return means + pad, shares + pad


def _count(widths: list[int], channels: int) -> int:
    """How many leading sources make up ``channels`` channels."""
    total, n = 0, 0
    while total < channels:
        total += widths[n]
        n += 1
    if total != channels:
        raise ValueError(f"{channels} input channels do not end at a source boundary of widths {widths}")
    return n


def _layer_weights(layer: DenseLayer, width: int) -> torch.Tensor:
    index = layer.input_index
    return channel_weights(layer.conv1.weight, index, width if index is not None else None)


def _blocks(model: DenseNet) -> list[tuple[str, DenseBlock, nn.Module | None, str | None]]:
    """Each block with the module that reads its whole output: the transition after it, or
    for the last block the classifier (None when the head is an identity)."""
    children = list(model.features.named_children())
    out = []
    for i, (name, module) in enumerate(children):
        if not isinstance(module, DenseBlock):
            continue
        after = children[i + 1][1] if i + 1 < len(children) else None
        if isinstance(after, Transition):
            out.append((name, module, after.conv, "transition"))
        elif isinstance(model.classifier, nn.Linear):
            out.append((name, module, model.classifier, "classifier"))
        else:
            out.append((name, module, None, None))
    return out


def block_reuse(block: DenseBlock, reader: nn.Module | None = None, reader_name: str | None = None) -> dict:
    """The heatmap of one block: rows are sources, columns the block's layers, then ``reader``
    (the transition's convolution or the classifier) if given."""
    widths = source_widths(block)
    n = len(widths)
    columns, shares, targets = [], [], []
    for i, layer in enumerate(block.values(), start=1):
        per_channel = _layer_weights(layer, sum(widths[:i]))
        mean, share = _column(per_channel, widths, n)
        columns.append(mean)
        shares.append(share)
        targets.append(f"layer {i}")
    if reader is not None:
        index = block.output_index  # a pruned block returns, and its reader reads, only these channels
        per_channel = channel_weights(reader.weight, index, block.out_channels if index is not None else None)
        mean, share = _column(per_channel, widths, n)
        columns.append(mean)
        shares.append(share)
        targets.append(reader_name)
    mean_abs = np.array([[np.nan if v is None else v for v in col] for col in columns]).T  # (sources, targets)
    peak = np.nanmax(mean_abs, axis=0, keepdims=True)
    normalized = np.divide(mean_abs, peak, out=np.zeros_like(mean_abs), where=peak > 0)
    normalized[np.isnan(mean_abs)] = np.nan
    return dict(
        sources=["block input"] + [f"layer {i}" for i in range(1, n)],
        targets=targets,
        source_channels=widths,
        mean_abs=_rows(mean_abs),
        normalized=_rows(normalized),
        share=_rows(np.array([[np.nan if v is None else v for v in s] for s in shares]).T),
        summary=_summary(shares, widths, reader_name),
    )


def _rows(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in matrix]


def _summary(shares: list[list], widths: list[int], reader_name: str | None) -> dict:
    """What the heatmap says in a few numbers.

    ``older_share``: the fraction of a layer's weight mass on sources other than the layer
    just before it, averaged over layers 2..L: the inputs a plain chain would not give it.
    ``older_channel_fraction``: the same fraction of its input *channels*, i.e. what equal
    weights on every channel would give; a trained layer above it favours old features.
    """
    num_layers = len(widths) - 1
    older, fraction, block_input = [], [], []
    for l in range(1, num_layers + 1):
        share = shares[l - 1]
        block_input.append(share[0])
        if l >= 2:
            older.append(sum(share[:l - 1]))
            fraction.append(sum(widths[:l - 1]) / sum(widths[:l]))
    out = dict(
        older_share=float(np.mean(older)) if older else None,
        older_channel_fraction=float(np.mean(fraction)) if fraction else None,
        block_input_share=float(np.mean(block_input)),
    )
    if reader_name is not None:
        # how much the reader of the whole block leans on its last half of layers
        share = shares[-1]
        late = range(1 + num_layers - num_layers // 2, num_layers + 1)
        out[f"{reader_name}_late_half_share"] = float(sum(share[s] for s in late))
        out[f"{reader_name}_late_half_channel_fraction"] = sum(widths[s] for s in late) / sum(widths)
        out[f"{reader_name}_block_input_share"] = float(share[0])
    return out


def feature_reuse(model: DenseNet) -> dict:
    """Fig. 5 of the paper for every dense block of ``model``: plain lists, JSON-ready."""
    blocks = []
    for name, block, reader, reader_name in _blocks(model):
        blocks.append(dict(block=name, num_layers=len(block), growth_rate=block.growth_rate,
                           **block_reuse(block, reader, reader_name)))
    return dict(
        measure="mean |w| of the first convolution of each target over the input maps of each source "
                "(Huang et al. 2017, Fig. 5); 'normalized' divides each target column by its maximum",
        blocks=blocks,
    )


def reuse_png(result: dict, title: str = "") -> bytes:
    """One heatmap per block: sources down, targets across, each column scaled to its maximum."""
    from matplotlib.figure import Figure

    from ..plots import png_bytes

    blocks = result["blocks"]
    fig = Figure(figsize=(4.2 * len(blocks) + 1, 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(blocks)))
    image = None
    for ax, block in zip(axes, blocks):
        matrix = np.array([[np.nan if v is None else v for v in row] for row in block["normalized"]])
        cmap = _colormap()
        image = ax.imshow(matrix, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        labels = [t.removeprefix("layer ") if t.startswith("layer") else t[0].upper() for t in block["targets"]]
        ticks = range(0, len(labels), max(1, len(labels) // 12))
        ax.set_xticks(list(ticks), [labels[i] for i in ticks])
        ax.set(xlabel="target layer (T: transition, C: classifier)", ylabel="source layer (0: block input)",
               title=block["block"])
    fig.colorbar(image, ax=list(axes), fraction=0.03, label="mean |w|, per target scaled to its maximum")
    fig.suptitle(title or "feature reuse (Huang et al. 2017, Fig. 5)")
    return png_bytes(fig)


def _colormap():
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="white")  # blank: a layer cannot read a later one
