"""Size and cost of a model: parameters and multiply-accumulates."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .layers import Transition


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on one input of ``input_size`` (C, *spatial).

    Counted by torch's FLOP counter over the convolutions and matrix products (FLOPs / 2);
    batch norm, ReLU and pooling are not counted, as is usual for published MAC figures.
    Transitions are counted in the paper's order, convolution before pooling, so that the
    figure compares with published ones (2.83 G for DenseNet-121); the fast path pools
    first and runs fewer (2.60 G).
    """
    was_training = model.training
    transitions = [(m, m.memory_efficient) for m in model.modules() if isinstance(m, Transition)]
    model.eval()
    for m, _ in transitions:
        m.memory_efficient = False
    try:
        param = next(model.parameters())
        x = torch.zeros(1, *input_size, dtype=param.dtype, device=param.device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
        for m, flag in transitions:
            m.memory_efficient = flag
    return counter.get_total_flops() // 2
