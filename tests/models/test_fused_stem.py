"""The ImageNet stem's BN-ReLU-MaxPool as one op in training (fused_stem.py): the same function
and gradients as the modules, the running statistics updated once, only its input kept."""

import contextlib
import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densekit import DenseNet, create_model
from densekit.models import native, reference_path
from densekit.models.fused_stem import stem_pool
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
@pytest.mark.parametrize("kernels", ["native", "torch", "bf16"])
def test_same_function_gradients_and_running_statistics(spatial_dims, size, mode, kernels):
    # against the same model with only the stem on its modules: the blocks run alike in both
    fast = small(spatial_dims).train(mode != "eval")
    if mode == "frozen norm0":  # fine-tuning with the stem's statistics frozen
        fast.features.norm0.eval()
    plain = copy.deepcopy(fast)
    plain.features.fused = False
    x = torch.randn(3, 3, *size)
    bf16 = kernels == "bf16"
    with native.disabled() if kernels == "torch" else contextlib.nullcontext():
        assert not stem_ran_as_modules(copy.deepcopy(fast), x, bf16=bf16)
        got, want = step(fast, x, bf16), step(plain, x, bf16)
    names = ["output", "input grad"] + [n for n, _ in fast.named_parameters()] + [n for n, _ in fast.named_buffers()]
    for name, g, w in zip(names, got, want, strict=True):
        if bf16 and name.startswith("features.norm0.") and g is not None and g.is_floating_point():
            continue  # its gradients: test_bf16_gradients_against_float64, more exact than the modules'
        if bf16 and g is not None and g.is_floating_point() and name not in ("output",) and "running" not in name:
            # the stem's input gradient, rounded once from float32 where the modules round
            # at each op, differs from theirs by bf16 rounding, and so does all it flows into
            torch.testing.assert_close(g, w, rtol=0, atol=0.02 * w.abs().max().item(), msg=name)
        else:
            torch.testing.assert_close(g, w, msg=name)
    norm = fast.features.norm0
    assert norm.num_batches_tracked.item() == (1 if mode == "train" else 0)


@pytest.mark.parametrize("spatial_dims,size", [(1, (41,)), (2, (17, 15)), (3, (9, 8, 7))])
@pytest.mark.parametrize("train", [True, False])
def test_bf16_gradients_against_float64(spatial_dims, size, train):
    # In bf16 the native backward sums in float32 and rounds once: against the same function in
    # float64 (the batch norm's output in bf16 picks the maxima, as in the forward), its
    # input gradient is within bf16 rounding and dgamma, dbeta within float32's.
    features = small(spatial_dims).features
    norm, pool = features.norm0.train(train), features.pool0
    x = torch.randn(3, norm.num_features, *size).to(torch.bfloat16)
    with torch.no_grad():
        g = torch.randn(pool(x.float()).shape).to(torch.bfloat16)
    fast, xa = copy.deepcopy(norm), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stem_pool(fast, pool, xa).backward(g)
    # float64: the same maxima, from the bf16 batch norm output as the forward computes it
    with torch.no_grad():
        relu = F.relu(copy.deepcopy(norm)(x))
        index = max_pool(spatial_dims)(relu.float(), pool.kernel_size, pool.stride, pool.padding,
                                       return_indices=True)[1]
        mask = (max_pool(spatial_dims)(relu.float(), pool.kernel_size, pool.stride, pool.padding) > 0).double()
    x64 = x.double().requires_grad_()
    w64, b64 = (p.detach().double().requires_grad_() for p in (norm.weight, norm.bias))
    stats = (None, None) if train else (norm.running_mean.double(), norm.running_var.double())
    y64 = F.batch_norm(x64, *stats, w64, b64, train, 0.0, norm.eps)
    picked = y64.flatten(2).gather(2, index.flatten(2))
    (picked * g.double().flatten(2) * mask.flatten(2)).sum().backward()
    for got, want, tol in ((xa.grad, x64.grad, 1e-2), (fast.weight.grad, w64.grad, 1e-5), (fast.bias.grad, b64.grad, 1e-5)):
        assert (got.double() - want).abs().max() <= tol * want.abs().max()


def max_pool(spatial_dims: int):
    return (F.max_pool1d, F.max_pool2d, F.max_pool3d)[spatial_dims - 1]


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


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_keeps_only_its_input(kernels):
    # The modules keep the ReLU's output (read by the ReLU's and the pooling's backward) and
    # the pooling's int64 argmax beside the batch norm's input; the fused op, only that input,
    # and with the native kernels one byte per pooled value: where its window's maximum was.
    fast = small().train()
    plain = copy.deepcopy(fast)
    plain.features.fused = False
    n, c, side = 4, fast.features.norm0.num_features, 64
    x = torch.randn(n, 3, side, side)
    relu_out = n * c * (side // 2) ** 2 * 4  # float32, after the stride-2 convolution
    argmax = n * c * (side // 4) ** 2 * 8
    offsets = argmax // 8 if kernels == "native" else 0
    per_channel = c * 4  # the batch norm's batch statistics, which the modules keep too
    with native.disabled() if kernels == "torch" else contextlib.nullcontext():
        saved = saved_bytes(plain, x)[0] - saved_bytes(fast, x)[0]
    assert 0 <= saved - (relu_out + argmax - offsets) <= 4 * per_channel


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


@pytest.mark.parametrize("spatial_dims,size", [(1, (40,)), (2, (33, 30)), (3, (12, 10, 9))])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("how", ["no grad", "frozen stem"])
def test_eval_stem_without_a_gradient_runs_one_native_pass(spatial_dims, size, bf16, how):
    fast = small(spatial_dims).eval()
    plain = copy.deepcopy(fast)
    plain.features.fused = False
    if how == "frozen stem":  # fine-tuning the rest: the stem's parameters fixed
        for model in (fast, plain):
            for p in [*model.features.conv0.parameters(), *model.features.norm0.parameters()]:
                p.requires_grad_(False)
    x = torch.randn(2, 3, *size)
    calls = count_calls(fast.features.relu0)
    with torch.no_grad() if how == "no grad" else contextlib.nullcontext(), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        got, want = fast(x), plain(x)
    assert not calls  # not the modules
    # float32: x * scale + shift as one fused multiply-add, where the batch norm rounds twice;
    # bf16: rounded once, where the modules round the batch norm's output first
    tol = dict(rtol=0.02, atol=0.02 * want.abs().max().item()) if bf16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    if how == "frozen stem":
        got.float().square().sum().backward()
        assert fast.features.denseblock1.denselayer1.conv1.weight.grad is not None


def test_eval_stem_runs_its_modules_where_they_are_hooked_or_train():
    model = small().eval()
    x = torch.randn(2, 3, 32, 32)
    model.features.pool0.register_forward_hook(lambda *args: None)
    calls = count_calls(model.features.relu0)
    with torch.no_grad():
        model(x)
        assert calls
        model = small().train()  # the batch's statistics, and the running ones to update
        calls = count_calls(model.features.relu0)
        model(x)
    assert calls and model.features.norm0.num_batches_tracked.item() == 1


@pytest.mark.parametrize("norm,pool,shape", [
    (nn.BatchNorm1d(4), nn.MaxPool2d(3, 2, 1), (2, 4, 9)),  # torch: one unbatched 2D sample
    (nn.BatchNorm2d(4), nn.MaxPool3d(3, 2, 1), (2, 4, 9, 9)),
    (nn.BatchNorm2d(4), nn.MaxPool2d(3, stride=[], padding=1), (2, 4, 6, 6)),  # empty: the kernel's
])
def test_pooling_read_as_torch_reads_it(norm, pool, shape):
    x = torch.randn(shape)
    want = pool(F.relu(copy.deepcopy(norm)(x)))
    got = stem_pool(norm, pool, x.clone().requires_grad_())
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)


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
    assert fused._stem_follows() and fused._stem_fits(x)
    fused.train()(torch.randn(4, 3, 32, 32) * 3 + 1)
    torch.testing.assert_close(torch.autograd.grad(y.square().sum(), x)[0], want)
