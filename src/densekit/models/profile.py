"""Size and cost of a model: parameters and multiply-accumulates."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .layers import reference_path


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on one input of ``input_size`` (C, *spatial).

    Counted by torch's FLOP counter over the convolutions and matrix products (FLOPs / 2);
    batch norm, ReLU and pooling are not counted, as is usual for published MAC figures.
    Counted on the reference path, the network as published (2.83 G for DenseNet-121), on
    any device: the fast paths run fewer (transitions pool first: 2.60 G) or ops the counter
    has no formula for (on CUDA the fused block's GEMM with a ReLU epilogue).
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(1, *input_size, dtype=param.dtype, device=param.device)
        with reference_path(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
