"""The ImageNet stem's BN-ReLU-MaxPool as one op in training (fused_stem.py): the same function
and gradients as the modules, the running statistics updated once, only its input kept."""

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from densekit import DenseNet, create_model
from densekit.models import reference_path
from densekit.models.layers import Features
from testkit import randomize_norms, saved_bytes


def small(spatial_dims: int = 2) -> DenseNet:
    torch.manual_seed(spatial_dims)
    model = DenseNet(8, (2, 2), stem="imagenet", num_classes=5, spatial_dims=spatial_dims, fused=True)
    randomize_norms(model, var=(0.5, 2.0), gamma=(0.5, 1.5))
    return model


def step(model: nn.Module, x: torch.Tensor, bf16: bool = False):
    """Output, input gradient, parameter gradients and buffers after one forward and backward."""
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = model(x)
    y.float().square().sum().backward()
    return [y, x.grad] + [p.grad for p in model.parameters()] + list(model.buffers())


def count_calls(module: nn.Module) -> list:
    """A list that grows by one at each call of ``module`` (its forward wrapped, not a hook: a
    hooked stem runs as modules)."""
    calls, forward = [], module.forward

    def counted(*args):
        calls.append(1)
        return forward(*args)

    module.forward = counted
    return calls


def stem_ran_as_modules(model: DenseNet, x: torch.Tensor, **kw) -> bool:
    calls = count_calls(model.features.relu0)
    step(model, x, **kw)
    del model.features.relu0.forward
    return bool(calls)


@pytest.mark.parametrize("spatial_dims,size", [(1, (40,)), (2, (33, 30)), (3, (12, 10, 9))])
@pytest.mark.parametrize("mode", ["train", "eval", "frozen norm0"])
@pytest.mark.parametrize("bf16", [False, True])
def test_same_function_gradients_and_running_statistics(spatial_dims, size, mode, bf16):
    # against the same model with only the stem on its modules: the blocks run alike in both
    fast = small(spatial_dims).train(mode != "eval")
    if mode == "frozen norm0":  # fine-tuning with the stem's statistics frozen
        fast.features.norm0.eval()
    plain = copy.deepcopy(fast)
    plain.features.fused = False
    x = torch.randn(3, 3, *size)
    assert not stem_ran_as_modules(copy.deepcopy(fast), x, bf16=bf16)
    for got, want in zip(step(fast, x, bf16), step(plain, x, bf16)):
        torch.testing.assert_close(got, want)
    norm = fast.features.norm0
    assert norm.num_batches_tracked.item() == (1 if mode == "train" else 0)


def test_cumulative_momentum_counts_the_batch_once():
    fast = small().train()
    fast.features.norm0.momentum = None
    plain = copy.deepcopy(fast)
    plain.features.fused = False
    x = torch.randn(4, 3, 32, 32)
    for _ in range(2):
        step(fast, x)
        step(plain, x)
    torch.testing.assert_close(fast.features.norm0.running_var, plain.features.norm0.running_var)
    assert fast.features.norm0.num_batches_tracked.item() == 2


def test_keeps_only_its_input():
    # The modules keep the ReLU's output (read by the ReLU's and the pooling's backward) and
    # the pooling's int64 argmax beside the batch norm's input; the fused op, only that input.
    fast = small().train()
    plain = copy.deepcopy(fast)
    plain.features.fused = False
    n, c, side = 4, fast.features.norm0.num_features, 64
    x = torch.randn(n, 3, side, side)
    relu_out = n * c * (side // 2) ** 2 * 4  # float32, after the stride-2 convolution
    argmax = n * c * (side // 4) ** 2 * 8
    per_channel = c * 4  # the batch norm's batch statistics, which the modules keep too
    assert 0 <= saved_bytes(plain, x)[0] - saved_bytes(fast, x)[0] - (relu_out + argmax) <= 4 * per_channel


def test_runs_the_modules_where_the_op_does_not_apply():
    model = small().train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # nothing is kept for backward: nothing to save
        calls = count_calls(model.features.relu0)
        model(x)
        assert calls
        del model.features.relu0.forward
    with reference_path(model):
        assert stem_ran_as_modules(model, x)
    assert not stem_ran_as_modules(model, x)
    swapped = copy.deepcopy(model)
    swapped.features.relu0 = nn.SiLU()  # not a ReLU: the modules run what they hold
    calls = count_calls(swapped.features.relu0)
    step(swapped, x)
    assert calls
    frozen = copy.deepcopy(model)
    for p in [*frozen.features.conv0.parameters(), *frozen.features.norm0.parameters()]:
        p.requires_grad_(False)
    calls = count_calls(frozen.features.relu0)
    frozen(x).sum().backward()  # no gradient flows through the stem: nothing to save there
    assert calls


def test_features_stays_a_sequential_with_torchvision_keys():
    model = create_model("densenet121")
    assert type(model.features).__name__ == "Features" and isinstance(model.features, nn.Sequential)
    assert "features.norm0.running_mean" in model.state_dict()
    assert model.features.fused and not create_model("densenet121", fused=False).features.fused


@pytest.mark.parametrize("hooked", ["norm0", "relu0", "pool0"])
def test_hooked_modules_run_as_modules(hooked):
    # a hook sees every call of its module, with what the module computes: Grad-CAM on pool0,
    # a feature extractor on relu0, a hook that rescales norm0's output
    fast = small().train()
    plain = copy.deepcopy(fast)
    plain.features.fused = False
    calls = []

    def hook(module, inputs, output):
        calls.append(1)
        return output * 0.5

    for model in (fast, plain):
        getattr(model.features, hooked).register_forward_hook(hook)
    x = torch.randn(2, 3, 32, 32)
    for got, want in zip(step(fast, x), step(plain, x)):
        torch.testing.assert_close(got, want)
    assert len(calls) == 2  # one call of the hooked module per model


def test_a_batch_norm_subclass_runs_as_itself():
    class Doubled(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    fast = small().train()
    doubled = Doubled(fast.features.norm0.num_features)
    doubled.load_state_dict(fast.features.norm0.state_dict())
    fast.features.norm0 = doubled
    plain = copy.deepcopy(fast)
    plain.features.fused = False
    x = torch.randn(2, 3, 32, 32)
    for got, want in zip(step(fast, x), step(plain, x)):
        torch.testing.assert_close(got, want)


def test_eval_norm_backward_uses_the_statistics_of_its_forward():
    # an eval-mode forward differentiated after the stem has trained on another batch, which
    # moved the running statistics: the gradient is that of the function the forward computed
    # (torch's own modules refuse with an error at backward; the fused op keeps what it needs)
    stem = small().features[:4]
    assert list(stem._modules) == ["conv0", "norm0", "relu0", "pool0"]
    fused = Features(OrderedDict(stem._modules), fused=True)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    want = torch.autograd.grad(copy.deepcopy(stem).eval()(x).square().sum(), x)[0]
    y = fused.eval()(x)
    assert fused._stem_pools(x)
    fused.train()(torch.randn(4, 3, 32, 32) * 3 + 1)
    torch.testing.assert_close(torch.autograd.grad(y.square().sum(), x)[0], want)
