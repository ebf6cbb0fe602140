"""Same function as torchvision, and the fast paths the same function as the plain one."""

import copy
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from densekit import DenseBlock, DenseLayer, DenseNet, Transition, create_model
from densekit.models import fused, native
from densekit.models.layers import Features
from densekit.prune import prune_model
from testkit import randomize_norms, saved_bytes


def rel_max_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", ["densenet121", "densenet161", "densenet169", "densenet201"])
def test_torchvision_checkpoint_loads_strictly_and_matches(name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)().eval()
    # torchvision initialises BN to identity; random statistics make the check bite
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = reference(x)
    for fused in (False, True):
        model = create_model(name, fused=fused).eval()
        result = model.load_state_dict(reference.state_dict(), strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        with torch.no_grad():
            assert rel_max_diff(model(x), want) <= 1e-5


def test_legacy_keys_load_through_load_state_dict():
    reference = torchvision.models.densenet121().eval()
    legacy = {}
    for key, value in reference.state_dict().items():
        for part in ("norm1", "norm2", "conv1", "conv2"):
            if f".{part}." in key and "denselayer" in key:
                key = key.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        legacy[key] = value
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    model = create_model("densenet121").eval()
    model.load_state_dict(legacy)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_max_diff(model(x), reference(x)) <= 1e-5


def test_wrong_shapes_do_not_load():
    model = create_model("densenet121")
    state = torchvision.models.densenet169().state_dict()
    with pytest.raises(RuntimeError):
        model.load_state_dict(state)


def _randomize_norms(module):
    randomize_norms(module, var=(0.5, 2.0), gamma=(0.5, 1.5))


def _grads(module):
    return [p.grad.clone() for p in module.parameters()]


# How far a fast fp32 path may be from the exact result, as a multiple of how far the plain
# fp32 path is from it. Both round differently from one CPU to another (oneDNN picks its
# kernels and summation order by instruction set), so comparing the two fp32 paths with each
# other elementwise failed on some CPUs with neither path wrong: the plain path's own gradients
# are up to 3e-4 (elementwise) off the float64 result in these tests. Measured on an AMD EPYC
# (AVX-512): the fused paths' error is 0.5-1.7x the plain path's on every tensor; with the dgamma
# shortcut forced onto every channel (its |beta/gamma| guard removed) it is 50-280x.
ERROR_RATIO = 4.0
FLOOR = 1e-6  # of the tensor's scale: a path that happens to be exact still leaves the other its rounding


def _run(module, x, grad=None, grad_format=torch.contiguous_format):
    """Output, input and parameter gradients and buffers after one forward and backward;
    ``grad`` (default: drawn here, in ``grad_format``) is the output's gradient. Returns
    (grad, [(name, tensor)])."""
    x = x.clone().requires_grad_()
    y = module(x)
    if grad is None:
        grad = torch.randn(y.shape).contiguous(memory_format=grad_format)
    y.backward(grad.to(y.dtype))
    return grad, [("output", y), ("input gradient", x.grad)] + \
        [(f"gradient of {n}", p.grad) for n, p in module.named_parameters()] + \
        [(f"buffer {n}", b) for n, b in module.named_buffers()]


def _compare(plain, fast, x, train=None, grad_format=torch.contiguous_format):
    """Outputs, input and parameter gradients and buffers after one step, each measured
    against the plain module run in float64: the fast path must be within ERROR_RATIO times
    the plain fp32 path's own error (normwise, per tensor). ``train`` sets the models' mode
    first (None: the modules' own modes stand); the output's gradient is drawn in
    ``grad_format``."""
    if train is not None:
        plain.train(train)
        fast.train(train)
    exact = copy.deepcopy(plain).double()
    exact.zero_grad(set_to_none=True)
    grad, want = _run(exact, x.double(), grad_format=grad_format)
    assert grad.is_contiguous(memory_format=grad_format)
    for (name, e), (_, p), (_, f) in zip(want, _run(plain, x, grad)[1], _run(fast, x, grad)[1]):
        if not e.is_floating_point():  # num_batches_tracked
            assert torch.equal(f, e) and torch.equal(p, e), name
            continue
        e, p, f = e.double(), p.double(), f.double()
        scale = e.abs().max().item()
        plain_err = (p - e).abs().max().item()
        fast_err = (f - e).abs().max().item()
        assert fast_err <= ERROR_RATIO * plain_err + FLOOR * scale + 1e-12, (
            f"{name}: the fast path is {fast_err:.3g} from the float64 result, the plain fp32 path "
            f"{plain_err:.3g} (scale {scale:.3g})")


@pytest.mark.parametrize("spatial_dims,size", [(1, (20,)), (2, (9, 7)), (3, (5, 6, 4))])
@pytest.mark.parametrize("bn_size", [4, 0])
@pytest.mark.parametrize("train", [True, False])
def test_fused_block_same_function_and_gradients(spatial_dims, size, bn_size, train, cpu_kernels):
    torch.manual_seed(spatial_dims)
    plain = DenseBlock(6, 5, 4, bn_size=bn_size, spatial_dims=spatial_dims)
    _randomize_norms(plain)
    fast = copy.deepcopy(plain)
    fast.fused = True
    _compare(plain, fast, torch.randn(3, 6, *size), train)


@pytest.mark.parametrize("spatial_dims,size", [(2, (9, 7)), (3, (5, 6, 4))])
@pytest.mark.parametrize("pruned", [None, "last layer", "earlier layer"])
@pytest.mark.parametrize("train", [True, False])
def test_fused_block_with_a_channels_last_output_gradient(spatial_dims, size, pruned, train, cpu_kernels):
    """A channels-last output gradient, as a fused transition or the head sends back, is read
    in place, not copied: the last layer's pass writes the sum into a fresh buffer (unless the
    last layer is pruned, which reads its inputs through a gather)."""
    torch.manual_seed(spatial_dims)
    plain = DenseBlock(6, 5, 4, bn_size=4, spatial_dims=spatial_dims)
    _randomize_norms(plain)
    if pruned is not None:
        layers = list(plain.values())
        (layers[-1] if pruned == "last layer" else layers[1]).prune_(inputs=torch.tensor([0, 2, 3, 7]))
    fast = copy.deepcopy(plain)
    fast.fused = True
    layout = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    _compare(plain, fast, torch.randn(3, 6, *size), train, grad_format=layout)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("bn_size", [4, 0])
def test_fused_dgamma_where_beta_dwarfs_gamma(train, bn_size, cpu_kernels):
    # On the CPU in fp32 the fused backward gets dgamma from sum(W * dW) unless |beta/gamma|
    # is large or gamma is 0; here a third of the channels take each branch and some are dead.
    torch.manual_seed(1)
    plain = DenseBlock(6, 5, 3, bn_size=bn_size)
    for m in plain.modules():
        if hasattr(m, "running_var"):
            c = m.num_features
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            m.weight.data[0:c:3] = 0.0
            m.weight.data[1:c:3] = 1e-3 * torch.sign(torch.randn(len(range(1, c, 3))))
            m.bias.data[1:c:3] = torch.linspace(-1.0, 1.0, len(range(1, c, 3)))
    fast = copy.deepcopy(plain)
    fast.fused = True
    _compare(plain, fast, torch.randn(4, 6, 17, 17), train)  # 1156 rows: the shortcut's minimum is 1024


@pytest.mark.parametrize("spatial_dims,size", [(1, (20,)), (2, (9, 7)), (3, (5, 6, 4))])
def test_fused_inference_with_folded_norm_same_function(spatial_dims, size):
    # Without autograd, eval mode folds each layer's second batch norm into its 1x1 conv.
    torch.manual_seed(spatial_dims)
    plain = DenseBlock(6, 5, 4, spatial_dims=spatial_dims).eval()
    randomize_norms(plain)
    fast = copy.deepcopy(plain)
    fast.fused = True
    x = torch.randn(3, 6, *size)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)


def _eval_pair():
    """A small block in eval mode on the reference path, its fused twin, and an input."""
    torch.manual_seed(0)
    plain = DenseBlock(6, 5, 3, bn_size=4)
    _randomize_norms(plain)
    plain.eval()
    fast = copy.deepcopy(plain)
    fast.fused = True
    return plain, fast, torch.randn(3, 6, 9, 7)


def test_fused_inference_follows_every_change_of_the_weights(cpu_kernels):
    """Eval mode folds each layer's second batch norm into its convolution at every call: an
    in-place change (also through ``.data``, which no version counter sees), a load_state_dict,
    a new parameter, a swapped module, a change of eps, buffers passed to functional_call and
    a training step in between must each show in the next output (a cache of folded weights
    must not serve stale ones)."""
    plain, fast, x = _eval_pair()

    def same():
        with torch.no_grad():
            want = plain(x)
            torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-5)  # again, from what it kept

    def both(change):
        for m in (plain, fast):
            with torch.no_grad():
                change(m)
        same()

    same()
    both(lambda m: m["denselayer2"].norm1.weight.mul_(-2))
    both(lambda m: m["denselayer1"].norm2.running_var.mul_(3))
    both(lambda m: m["denselayer3"].conv1.weight.add_(0.5))
    both(lambda m: m["denselayer3"].conv2.weight.mul_(2))
    state = {k: v + 0.1 if v.is_floating_point() else v for k, v in plain.state_dict().items()}
    both(lambda m: m.load_state_dict(state))
    bias = torch.randn(6)
    both(lambda m: setattr(m["denselayer1"].norm1, "bias", torch.nn.Parameter(bias.clone())))
    swapped = torch.nn.BatchNorm2d(4 * 5).eval()
    swapped.running_var.uniform_(0.5, 2.0)
    both(lambda m: setattr(m["denselayer2"], "norm2", copy.deepcopy(swapped)))
    both(lambda m: setattr(m["denselayer2"].norm2, "eps", 0.5))
    both(lambda m: m["denselayer1"].conv1.weight.data.mul_(-1))
    both(lambda m: m["denselayer3"].norm1.weight.data.mul_(3))
    # buffers given for one call, freed after it: a fresh tensor may take a freed one's address
    with torch.no_grad():
        for i in range(3):
            stats = {"denselayer2.norm2.running_mean": torch.full((20,), float(i))}
            torch.testing.assert_close(torch.func.functional_call(fast, stats, (x,)),
                                       torch.func.functional_call(plain, stats, (x,)), rtol=1e-5, atol=1e-5)
    for m in (plain, fast):  # a training step moves the running statistics
        m.train()
        m(x).sum().backward()
        m.eval()
    same()


def test_fused_inference_of_a_model_made_in_inference_mode(cpu_kernels):
    # tensors made in inference mode carry no version counter: nothing is kept, all is recomputed
    with torch.inference_mode():
        plain, fast, x = _eval_pair()
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
        fast["denselayer2"].norm1.weight.mul_(-2)
        plain["denselayer2"].norm1.weight.mul_(-2)
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)


def test_fused_network_channels_last_and_several_steps():
    torch.manual_seed(0)
    plain = create_model("densenet_bc_100_k12", fused=False, block_config=(3, 3, 3))
    fast = copy.deepcopy(plain).set_fused(True)
    transitions = [m for m in fast.modules() if isinstance(m, Transition)]
    assert len(transitions) == 2 and all(t.fused for t in transitions)
    assert not any(m.fused for m in plain.modules() if isinstance(m, (DenseBlock, Transition)))
    assert all(m.fused for m in create_model("densenet121").modules()
               if isinstance(m, (DenseBlock, Transition)))  # the fast paths are the default
    for model in (plain, fast):
        model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    for _ in range(2):  # running statistics accumulate identically
        for m in (plain, fast):
            m.zero_grad()
        _compare(plain, fast, x, train=True)
    _compare(plain, fast, x, train=False)


@pytest.mark.parametrize("spatial_dims,size", [(1, (21,)), (2, (9, 7)), (2, (16, 16)), (3, (5, 6, 4))])
@pytest.mark.parametrize("train", [True, False])
def test_transition_pooling_first_same_function_and_gradients(spatial_dims, size, train, cpu_kernels):
    # native: BN-ReLU-pool in one kernel (fused.py); torch-ops: the modules, pooling first.
    # Odd sides leave a last row outside every window: its gradient is batch norm's alone.
    torch.manual_seed(spatial_dims)
    plain = Transition(10, 5, spatial_dims)
    _randomize_norms(plain)
    fast = copy.deepcopy(plain)
    fast.fused = True
    x = torch.randn(3, 10, *size)
    if spatial_dims == 2:
        x = x.contiguous(memory_format=torch.channels_last)  # as a fused block's output is
    _compare(plain, fast, x, train)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spatial_dims,size", [(1, (32,)), (2, (16, 16)), (3, (8, 8, 8))])
@pytest.mark.parametrize("train", [True, False])
def test_fused_transition_keeps_no_full_size_activation(spatial_dims, size, train):
    # shows the native path runs (the modules, pooling first, keep the BN-ReLU output)
    if not native.available():
        pytest.skip("native kernels unavailable (no C compiler)")
    plain = Transition(32, 16, spatial_dims).train(train)
    fast = copy.deepcopy(plain)
    fast.fused = True
    x = torch.randn(4, 32, *size).movedim(1, -1).contiguous().movedim(-1, 1).requires_grad_()  # channels-last
    activation = x.numel() * 4
    # the input left out: the block before keeps it anyway
    assert saved_bytes(plain, x, skip=x)[0] >= activation  # the BN-ReLU output, kept for ReLU and the conv
    assert saved_bytes(fast, x, skip=x)[0] <= activation / 2 ** spatial_dims + 1024  # pooled activations, statistics


@pytest.mark.parametrize("spatial_dims,size", [(1, (21,)), (2, (9, 7))])
def test_frozen_batch_norm_inside_a_training_model(spatial_dims, size, cpu_kernels):
    # Fine-tuning with frozen statistics: BN in eval mode while the model trains. The fast
    # paths must normalize with the running statistics and leave them alone, as the modules do.
    torch.manual_seed(0)
    plain = DenseNet(4, (2, 2), stem="cifar", num_classes=3, spatial_dims=spatial_dims)
    _randomize_norms(plain)
    fast = copy.deepcopy(plain).set_fused(True)
    for model in (plain, fast):
        model.train()
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in norms[::2]:
            m.eval()
    _compare(plain, fast, torch.randn(3, 3, *size))


@pytest.mark.parametrize("module", ["block", "transition"])
def test_double_backward_fails_loudly_through_fused_ops(module, cpu_kernels):
    # The fused ops' backward runs in-place kernels: a gradient penalty must fail, not come
    # out as zero. The transition's torch-ops path is plain modules and differentiates twice.
    torch.manual_seed(0)
    plain = DenseBlock(4, 3, 2) if module == "block" else Transition(4, 2)
    fast = copy.deepcopy(plain)
    fast.fused = True
    x = torch.randn(2, 4, 6, 6, requires_grad=True)

    def penalty(model):
        (gx,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        return gx.square().sum()

    if module == "block" or cpu_kernels == "native":
        with pytest.raises(RuntimeError, match="once_differentiable"):
            penalty(fast).backward()
    else:
        want = torch.autograd.grad(penalty(plain), list(plain.parameters()))
        got = torch.autograd.grad(penalty(fast), list(fast.parameters()))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("swap", ["identity pool", "max pool", "silu"])
def test_transition_with_a_swapped_layer_runs_what_it_holds(swap, cpu_kernels):
    # Pooling first is only for the stock layers: a max pool does not commute with the conv.
    torch.manual_seed(0)
    plain = Transition(6, 3)
    _randomize_norms(plain)
    if swap == "identity pool":
        plain.pool = torch.nn.Identity()
    elif swap == "max pool":
        plain.pool = torch.nn.MaxPool2d(2, 2)
    else:
        plain.relu = torch.nn.SiLU()
    fast = copy.deepcopy(plain)
    fast.fused = True
    assert fast.pools_first == (swap == "silu")
    _compare(plain, fast, torch.randn(3, 6, 8, 8), train=True)


@pytest.mark.parametrize("swap", ["silu", "conv with bias", "dilated conv"])
def test_block_with_a_swapped_layer_runs_what_it_holds(swap, cpu_kernels):
    # The fused block runs convolutions from their weight and padding, and ReLU: anything
    # else makes the block take the reference path.
    from densekit.models.fused import supports_fused

    torch.manual_seed(0)
    plain = DenseBlock(6, 5, 3, bn_size=4)
    _randomize_norms(plain)
    layer = plain["denselayer2"]
    if swap == "silu":
        layer.relu2 = torch.nn.SiLU()
    elif swap == "conv with bias":
        layer.conv1 = torch.nn.Conv2d(layer.conv1.in_channels, layer.conv1.out_channels, 1, bias=True)
    else:
        layer.conv2 = torch.nn.Conv2d(layer.conv2.in_channels, layer.conv2.out_channels, 3, padding=2, dilation=2,
                                      bias=False)
    fast = copy.deepcopy(plain)
    fast.fused = True
    assert not supports_fused(fast)
    _compare(plain, fast, torch.randn(3, 6, 8, 8), train=True)


def test_jit_trace_of_the_default_model_matches_eager():
    # A trace cannot see the native kernels; the fast modules trace their torch-op paths.
    torch.manual_seed(0)
    model = create_model("densenet_bc_100_k12", block_config=(2, 2), num_classes=5).eval()
    traced = torch.jit.trace(model, torch.randn(2, 3, 12, 12))
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)


def test_checkpointed_layer_same_function():
    torch.manual_seed(0)
    layer = DenseLayer(10, 4)
    lean = copy.deepcopy(layer)
    lean.memory_efficient = True
    _compare(layer, lean, torch.randn(2, 10, 6, 6), train=True)


def test_fused_dropout_keeps_expectation():
    torch.manual_seed(0)
    block = DenseBlock(4, 8, 2, drop_rate=0.5, fused=True)
    x = torch.randn(64, 4, 8, 8, requires_grad=True)
    out = block(x)
    new = out[:, 4:]
    zero_fraction = (new == 0).float().mean().item()
    assert 0.4 < zero_fraction < 0.6
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    block.eval()
    assert (block(x)[:, 4:] == 0).float().mean().item() < 0.05


def test_fused_keeps_less_memory_than_plain():
    # autograd keeps the concatenations and their BN-ReLU copies on the plain path; count
    # the bytes held by saved tensors through the saved-tensor hooks.
    torch.manual_seed(0)
    plain = create_model("densenet_bc_100_k12", fused=False)
    fast = copy.deepcopy(plain).set_fused(True)
    x = torch.randn(8, 3, 32, 32)
    assert saved_bytes(fast, x)[0] < 0.5 * saved_bytes(plain, x)[0]


def test_bf16_autocast_on_cpu_runs_the_fused_path():
    torch.manual_seed(0)
    model = DenseNet(8, (2, 2), stem="cifar", num_classes=3, fused=True)
    ref = copy.deepcopy(model).set_fused(False)
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = model(x), ref(x)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    assert rel_max_diff(out.float(), want.float()) < 0.05


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("bf16", [False, True])
def test_fused_block_gradients_laid_out_as_their_parameters(memory_format, bf16):
    # DistributedDataParallel copies each gradient into a bucket view with its parameter's
    # strides, and warns at every step where they differ; oneDNN returns a weight gradient
    # channels-last beside a channels-last input.
    torch.manual_seed(0)
    block = DenseBlock(8, 4, 3, fused=True).to(memory_format=memory_format)
    strides = []
    for name, p in block.named_parameters():
        p.register_hook(lambda g, name=name, p=p: strides.append((name, g.stride(), p.stride())))
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=memory_format)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = block(x)
    out.float().sum().backward()
    assert len(strides) == len(list(block.parameters())) == 3 * 6
    assert [name for name, got, want in strides if got != want] == []


@pytest.mark.parametrize("train", [True, False])
def test_transition_under_bf16_autocast_matches_the_reference(train, cpu_kernels):
    # with the kernels: BN-ReLU-pool as one native bf16 pass, pooling before the convolution
    from densekit.models.fused import supports_fused_transition

    torch.manual_seed(0)
    plain = Transition(12, 6).train(train)
    _randomize_norms(plain)
    fast = copy.deepcopy(plain)
    fast.fused = True
    x = torch.randn(4, 12, 8, 8).contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert supports_fused_transition(fast, x) == (cpu_kernels == "native")
        y1, y2 = fast(x1), plain(x2)
    assert y1.dtype == y2.dtype == torch.bfloat16
    g = torch.randn(y1.shape)
    y1.float().backward(g)
    y2.float().backward(g)
    # relative L2 errors: where bf16 rounding moves a BN output across 0, the ReLU's mask and so
    # that element's gradient differ between the two roundings, whatever the tolerance
    def rel_l2(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert rel_l2(y1, y2) < 0.01 and rel_l2(x1.grad, x2.grad) < 0.02
    for p, q in zip(fast.parameters(), plain.parameters()):
        assert p.grad.dtype == torch.float32 and rel_l2(p.grad, q.grad) < 0.03
    for b, c in zip(fast.buffers(), plain.buffers()):
        torch.testing.assert_close(b.float(), c.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("pruned", [False, True])
def test_bf16_training_block_runs_the_native_convolutions_as_accurately_as_torch_ops(monkeypatch, pruned):
    # under bf16 autocast a training block forms its bottlenecks with the native 1x1 product
    # (BN-ReLU formed in its tile), its 3x3 convolutions with the native kernel, and in backward
    # the 1x1's whole backward in one pass over the buffer (no BN-ReLU output, no input
    # gradient formed in memory); measured against
    # the same block in float32, its forward, input and parameter gradients are as close as
    # those of the block with the native kernels off (torch ops and oneDNN throughout)
    if not native.conv3x3_supported(torch.bfloat16):
        pytest.skip("this CPU's build has no bf16 native convolution (AVX512-BF16)")
    calls = {"Pointwise": 0, "Conv3x3": 0, "pointwise_backward": 0}
    for name in calls:
        owner = getattr(native, name)
        real = owner.__call__ if isinstance(owner, type) else owner

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        if isinstance(owner, type):
            monkeypatch.setattr(owner, "__call__", counted)
        else:
            monkeypatch.setattr(native, name, counted)
    torch.manual_seed(0)
    block = DenseBlock(20, 12, 4, bn_size=4)
    if pruned:  # a layer that reads some of the buffer's channels: its product gathers them in its tile
        list(block.values())[2].prune_(inputs=torch.tensor([0, 2, 3, 7, 19, 20, 25, 33]))
    _randomize_norms(block)
    block.fused = True
    x, g = torch.randn(8, 20, 9, 9), torch.randn(8, 68, 9, 9)

    def run(bf16: bool):
        model, inp = copy.deepcopy(block), x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(inp)
        out.float().backward(g)
        return [out, inp.grad, *[p.grad for p in model.parameters()]]

    exact = run(False)  # float32: its 1x1 backward is native too
    calls.update({name: 0 for name in calls})
    native_ = run(True)
    # a pruned layer's backward gathers and scatters its columns: not the one pass
    assert calls == {"Pointwise": 4, "Conv3x3": 4, "pointwise_backward": 3 if pruned else 4}
    with native.disabled():
        ops = run(True)

    def rel_l2(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    for got, base, want in zip(native_, ops, exact):
        assert rel_l2(got, want) <= 1.25 * rel_l2(base, want) + 1e-3


def test_whole_model_gradients_laid_out_as_their_parameters_under_bf16(cpu_kernels):
    # the transitions too: with the kernels their native bf16 path, without them torch's
    # convolution on the pooled, channels-last maps
    torch.manual_seed(0)
    model = DenseNet(8, (2, 2), stem="cifar", num_classes=3, fused=True)
    wrong = []
    for name, p in model.named_parameters():
        p.register_hook(lambda g, name=name, p=p: wrong.append(name) if g.stride() != p.stride() else None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 16, 16))
    out.float().sum().backward()
    assert wrong == [] and all(p.grad is not None for p in model.parameters())


def _compiled_against_reference(model, x, train: bool, tol: float = 1e-5):
    """Compile ``model`` whole (fullgraph=True fails on any graph break; aot_eager traces
    forward and backward the way inductor would, without its minutes of C++ compilation on 2
    cores) and check its output, gradients and running statistics against the reference
    path; returns the forward graph's code."""
    torch._dynamo.reset()  # each test's models are new: no recompile limit across tests
    model.train(train)
    reference = copy.deepcopy(model).set_fused(False)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    y, y_ref = compiled(x), reference(x)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
    for b, c in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(b, c)
    assert counter.frame_count == 1
    return counter.graphs[0].code


@pytest.mark.parametrize("train", [True, False])
def test_torch_compile_keeps_the_fused_block_as_one_operator(train):
    torch.manual_seed(0)
    model = create_model("densenet_bc_100_k12", block_config=(2, 2), num_classes=5)
    code = _compiled_against_reference(model, torch.randn(3, 3, 12, 12), train)
    assert code.count("densekit.dense_block") == 2  # the blocks, not their layers' concatenations
    assert code.count("densekit.transition") == 1 and "torch.cat" not in code
    # in training the final norm runs torch's kernel too, not the compiler's code for it
    assert code.count("densekit.batch_norm") == (1 if train else 0)
    # and where a gradient may flow, so do the final ReLU and the mean
    assert code.count("densekit.relu_mean") == 1 and "relu" not in code.replace("relu_mean", "")
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():  # no gradient: the compiler's code, which keeps no mask there
        torch.compile(model, backend=counter, fullgraph=True)(torch.randn(3, 3, 12, 12))
    assert "densekit.relu_mean" not in counter.graphs[0].code and "densekit.dense_block" in counter.graphs[0].code
    torch._dynamo.reset()


def test_torch_compile_keeps_a_subclass_head_as_it_is():
    """A subclass with its own forward_head runs it under the compiler too, not the operator."""

    class Scaled(DenseNet):
        def forward_head(self, x, pre_logits: bool = False):
            return 2 * super().forward_head(x, pre_logits)

    torch.manual_seed(14)
    model = Scaled(8, (2, 2), stem="cifar", num_classes=5, fused=True).train()
    x = torch.randn(3, 3, 12, 12)
    want = copy.deepcopy(model)(x)  # eager: its own head
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    got = torch.compile(model, backend=counter, fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "densekit.relu_mean" not in counter.graphs[0].code
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype,spatial_dims", [(torch.float32, 2), (torch.bfloat16, 2), (torch.float32, 1),
                                                (torch.float32, 3)])
def test_relu_mean_operator_passes_torch_library_opcheck_and_is_relu_then_mean(dtype, spatial_dims):
    from densekit.models import fused_op

    torch.manual_seed(13)
    shape = (3, 6, *[5, 4, 3][:spatial_dims])
    x = torch.randn(shape, dtype=dtype)
    if spatial_dims > 1:
        x = x.contiguous(memory_format=fused._channels_last(spatial_dims))
    x.requires_grad_()
    dims = list(range(2, 2 + spatial_dims))
    # in bf16 the traced backward's gradient check differs by rounding
    checks = {} if dtype == torch.float32 else dict(test_utils=("test_schema", "test_autograd_registration",
                                                                "test_faketensor"))
    assert set(torch.library.opcheck(fused_op.relu_mean, (x, dims), **checks).values()) == {"SUCCESS"}
    y = fused_op.relu_mean(x, dims)
    x_eager = x.detach().requires_grad_()
    y_eager = torch.relu(x_eager).mean(dims)
    assert torch.equal(y, y_eager)
    g = torch.randn_like(y)
    y.backward(g)
    y_eager.backward(g)
    torch.testing.assert_close(x.grad, x_eager.grad, rtol=0, atol=0)
    assert x.grad.stride() == x.stride()  # the input's layout, channels-last included
    negative = [d - x.dim() for d in dims]  # counted from the end, as torch's mean takes them
    assert set(torch.library.opcheck(fused_op.relu_mean, (x, negative), **checks).values()) == {"SUCCESS"}
    with pytest.raises(ValueError, match="at least one dim"):
        fused_op.relu_mean(x, [])


def test_batch_norm_operator_passes_torch_library_opcheck_and_is_the_module():
    from densekit.models import fused_op

    torch.manual_seed(11)
    norm = nn.BatchNorm2d(6).train()
    randomize_norms(norm, var=(0.5, 2.0), gamma=(0.5, 1.5))
    x = torch.randn(3, 6, 5, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    args = (x, norm.weight, norm.bias, norm.running_mean, norm.running_var, 0.1, 1e-5)
    assert set(torch.library.opcheck(fused_op.batch_norm, args).values()) == {"SUCCESS"}
    # bf16 beside float32 parameters (autocast: float32 statistics) and a bf16 model (bf16 ones)
    for params in (torch.float32, torch.bfloat16):
        low = [t.detach().to(params) for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var)]
        args = (x.detach().bfloat16().requires_grad_(), *[t.requires_grad_(i < 2) for i, t in enumerate(low)],
                0.1, 1e-5)
        # the fake outputs' dtypes as the kernel's (inductor asserts them); the gradient check
        # against the traced backward is float32's above (in bf16 it differs by rounding)
        checks = ("test_schema", "test_autograd_registration", "test_faketensor")
        assert set(torch.library.opcheck(fused_op.batch_norm, args, test_utils=checks).values()) == {"SUCCESS"}
    # the same output, gradients and running statistics as the module, bit for bit
    eager, x_eager = copy.deepcopy(norm), x.detach().requires_grad_()
    y, y_eager = fused_op.run_norm(norm, x), eager(x_eager)
    assert torch.equal(y, y_eager)
    g = torch.randn_like(y)
    y.backward(g)
    y_eager.backward(g)
    assert torch.equal(x.grad, x_eager.grad)
    assert torch.equal(norm.weight.grad, eager.weight.grad) and torch.equal(norm.bias.grad, eager.bias.grad)
    for b, c in zip(norm.buffers(), eager.buffers()):
        assert torch.equal(b, c)
    assert not fused_op.takes_norm(norm.eval(), x) and not fused_op.takes_norm(norm.train(), x[:1, :, :1, :1])


def test_torch_compile_keeps_a_hooked_final_norm_a_module_call():
    # a hook sees the module's call: a hooked norm is not replaced by the operator
    torch.manual_seed(12)
    model = create_model("densenet_bc_100_k12", block_config=(2, 2), num_classes=5)
    calls = []
    model.features[-1].register_forward_hook(lambda m, i, o: calls.append(o.shape))
    code = _compiled_against_reference(model, torch.randn(3, 3, 12, 12), True)
    assert "densekit.batch_norm" not in code and len(calls) == 2  # the compiled call and the reference's


@pytest.mark.parametrize("train", [True, False])
def test_torch_compile_keeps_the_imagenet_stem_as_one_operator(train):
    # the stem's BN-ReLU-MaxPool runs the native passes under the compiler too, instead of the
    # pooling's indices and the ReLU's output the compiled graph would keep for backward
    torch.manual_seed(6)
    model = DenseNet(8, (2, 2), stem="imagenet", num_classes=5, fused=True)
    randomize_norms(model, var=(0.5, 2.0), gamma=(0.5, 1.5))
    code = _compiled_against_reference(model, torch.randn(3, 3, 32, 30), train)
    assert code.count("densekit.stem_pool") == 1 and "max_pool" not in code
    assert code.count("densekit.dense_block") == 2


def test_torch_compile_stem_with_conv0_frozen_and_one_value_per_channel():
    torch.manual_seed(9)
    model = DenseNet(8, (2, 2), stem="imagenet", num_classes=5, fused=True)
    randomize_norms(model, var=(0.5, 2.0), gamma=(0.5, 1.5))
    model.features.conv0.weight.requires_grad_(False)  # the stem's input needs no gradient
    code = _compiled_against_reference(model, torch.randn(3, 3, 32, 30), True)
    assert "densekit.stem_pool" in code
    # batch norm refuses one value per channel in training, compiled (where dynamo wraps the
    # module's error in its own) as in eager
    stem = Features(OrderedDict(norm0=nn.BatchNorm2d(4), relu0=nn.ReLU(inplace=True),
                                pool0=nn.MaxPool2d(3, 2, 1)), fused=True).train()
    x = torch.randn(1, 4, 1, 1, requires_grad=True)
    for run in (stem, torch.compile(stem, backend="aot_eager")):
        with pytest.raises((ValueError, RuntimeError), match="more than 1 value per channel"):
            run(x)


@pytest.mark.parametrize("training", [True, False])
def test_stem_operator_passes_torch_library_opcheck(training):
    # schema, fake tensors (the shapes and dtypes the compiler plans with), autograd registration
    from densekit.models import fused_op

    torch.manual_seed(8)
    x = torch.randn(2, 8, 9, 10).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight, bias = (torch.rand(8) + 0.5).requires_grad_(), torch.randn(8).requires_grad_()
    running = [] if training else [torch.randn(8), torch.rand(8) + 0.5]
    result = torch.library.opcheck(fused_op.stem_pool, (x, weight, bias, running, 1e-5, [3, 3], [2, 2], [1, 1],
                                                        training))
    assert set(result.values()) == {"SUCCESS"}


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_records_the_reference_path(strict):
    # an exported program must run without densekit: no custom operator in it
    model = create_model("densenet_bc_100_k12", block_config=(2, 2), num_classes=5).eval()
    x = torch.randn(2, 3, 12, 12)
    program = torch.export.export(model, (x,), strict=strict)
    code = program.graph_module.code
    assert "densekit" not in code and "aten.cat" in code
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_torch_compile_full_graph_under_autocast_without_native_kernels():
    # the transition then takes its torch-ops path, whose eager form hooks the weight's cast
    torch.manual_seed(4)
    model = create_model("densenet_bc_100_k12", block_config=(2, 2), num_classes=5).train()
    torch._dynamo.reset()
    with native.disabled():
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = compiled(torch.randn(4, 3, 12, 12))
        y.float().sum().backward()
    torch._dynamo.reset()  # the compiled graph assumed the kernels off
    assert all(p.grad is not None for p in model.parameters())


def test_fused_running_statistics_with_cumulative_momentum_exact_in_float64():
    torch.manual_seed(5)
    fast = DenseBlock(6, 4, 3, bn_size=2).double().train()
    for m in fast.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    plain = copy.deepcopy(fast)
    fast.fused = True
    for _ in range(3):
        x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
        fast(x), plain.forward_plain(x)
    for b, c in zip(fast.buffers(), plain.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_torch_compile_under_bf16_autocast_runs_what_eager_runs(stem):
    torch.manual_seed(3)
    if stem == "cifar":
        model, x = create_model("densenet_bc_100_k12", block_config=(2, 2), num_classes=5), torch.randn(4, 3, 12, 12)
    else:  # the ImageNet stem's BN-ReLU-MaxPool runs as its operator
        model, x = DenseNet(8, (2, 2), stem="imagenet", num_classes=5, fused=True), torch.randn(4, 3, 32, 32)
        randomize_norms(model, var=(0.5, 2.0), gamma=(0.5, 1.5))
    model.train()
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_eager = compiled(x), eager(x)
    assert y.dtype == y_eager.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_eager, rtol=0.02, atol=0.02)
    y.float().square().sum().backward()
    y_eager.float().square().sum().backward()
    for p, q in zip(model.parameters(), eager.parameters()):
        assert p.grad.dtype == torch.float32 and p.grad.stride() == p.stride()
        assert (p.grad - q.grad).norm() <= 0.05 * q.grad.norm() + 1e-6
    for b, c in zip(model.buffers(), eager.buffers()):  # the running statistics, updated once
        torch.testing.assert_close(b, c, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("spatial_dims, size", [(1, (16,)), (3, (6, 6, 6))])
def test_torch_compile_fused_block_in_1d_and_3d_with_cumulative_momentum(spatial_dims, size):
    # momentum None: the running statistics are a cumulative average, updated in tensors
    torch.manual_seed(1)
    model = DenseNet(8, (2, 3), stem="cifar", num_classes=3, fused=True, spatial_dims=spatial_dims)
    for m in model.features.denseblock2.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    for train in (True, False):
        code = _compiled_against_reference(copy.deepcopy(model), torch.randn(2, 3, *size), train)
        assert "densekit.dense_block" in code


def test_torch_compile_pruned_block_and_dropout():
    torch.manual_seed(2)
    model = DenseNet(8, (3, 3), stem="cifar", num_classes=3, fused=True)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.0, 1.0)
    prune_model(model, 0.4)
    assert any(layer.input_index is not None for layer in model.features.denseblock2.values())
    assert model.features.denseblock1.output_index is not None  # the transition reads fewer maps
    _compiled_against_reference(model, torch.randn(3, 3, 12, 12), True, tol=1e-4)
    # dropout draws its masks inside the operator: only that it trains, with every gradient
    dropping = DenseNet(8, (2, 2), stem="cifar", num_classes=3, fused=True, drop_rate=0.3).train()
    torch._dynamo.reset()
    torch.compile(dropping, backend="aot_eager", fullgraph=True)(torch.randn(4, 3, 12, 12)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dropping.parameters())


def test_fused_direct_dgamma_accurate_where_mean_dwarfs_spread(cpu_kernels):
    # gamma 1e-3, beta ~0.4: every channel's dgamma is summed directly (|beta/gamma| > 16),
    # over 1156 rows, on inputs and bottleneck outputs whose mean is 10^4 x their spread;
    # summed as dy*x - mean*sum(dy) that lost 10^4x more than the plain path
    torch.manual_seed(2)
    block = DenseBlock(6, 5, 3, bn_size=4)
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.fill_(1e-3)
            m.bias.data.uniform_(0.2, 0.6)
    exact, plain, fast = block.double(), copy.deepcopy(block).float(), copy.deepcopy(block).float()
    fast.fused = True
    x = torch.randn(4, 6, 17, 17, dtype=torch.float64) * 0.01 + 100.0
    outs = [m(x.to(p.dtype)) for m, p in ((exact, x), (plain, x.float()), (fast, x.float()))]
    g = torch.randn_like(outs[0])
    for y in outs:
        y.backward(g.to(y.dtype))
    for (name, p), q, r in zip(exact.named_parameters(), plain.parameters(), fast.parameters()):
        floor = (q.grad.double() - p.grad).abs().max().item()
        err = (r.grad.double() - p.grad).abs().max().item()
        assert err <= max(2 * floor, 1e-5 * p.grad.abs().max().item()), (name, err, floor)


def _cfg(growth_rate, block_config, bn_size, stem, spatial_dims=1, in_chans=1, num_classes=1):
    return dict(growth_rate=growth_rate, block_config=block_config, bn_size=bn_size, compression=0.25,
                num_init_features=1, in_chans=in_chans, num_classes=num_classes, stem=stem,
                spatial_dims=spatial_dims)


# fp32 where batch norm is ill-conditioned (3 values per channel, a mean 100x the spread),
# cases Hypothesis found: the fused backward once formed x*b + c and lost 30x more than the
# plain path (the two 1D cases), and dgamma from sum(W * dW) lost 6.7x more at 3 rows.
@pytest.mark.parametrize("cfg", [_cfg(6, (1, 2), 1, "imagenet"), _cfg(3, (2,), 1, "cifar"),
                                 _cfg(1, (2,), 2, "cifar", spatial_dims=2, in_chans=2, num_classes=5)])
def test_fused_fp32_as_accurate_as_plain_where_batch_norm_is_ill_conditioned(cfg, cpu_kernels):
    torch.manual_seed(0)
    model = DenseNet(**cfg)
    x = torch.randn(3, cfg["in_chans"], *[model.min_input_size] * cfg["spatial_dims"])
    fast = copy.deepcopy(model).set_fused(True)
    plain = copy.deepcopy(model)
    model.double()
    y_ref, y_fast, y_plain = model(x.double()), fast(x), plain(x)
    g = torch.randn_like(y_fast)
    y_ref.backward(g.double())
    y_fast.backward(g)
    y_plain.backward(g)
    # fp32 cannot meet a fixed tolerance here; the fused path must be about as close to
    # float64 as the plain fp32 path is (2x; the bugs above were 7x and 30x)
    pairs = [("output", y_fast, y_plain, y_ref)] + [
        (name, q.grad, r.grad, p.grad) for (name, p), q, r in
        zip(model.named_parameters(), fast.parameters(), plain.parameters())]
    for name, fused_value, plain_value, exact in pairs:
        err = (fused_value.double() - exact).abs().max().item()
        floor = (plain_value.double() - exact).abs().max().item()
        assert err <= max(2 * floor, 1e-4 * exact.abs().max().item() + 1e-6), (name, err, floor)


def test_memory_efficient_checkpoints_the_reference_path():
    # torchvision's meaning: the concatenated BN-ReLU-Conv1x1 is recomputed in backward, so it
    # is not among the saved tensors; the same function, fewer bytes kept (eval mode too).
    torch.manual_seed(0)
    plain = create_model("densenet_bc_100_k12", fused=False, block_config=(6, 6, 6)).eval()
    lean = copy.deepcopy(plain).set_grad_checkpointing(True)
    assert lean.grad_checkpointing and not plain.grad_checkpointing
    x = torch.randn(4, 3, 32, 32)
    kept, y = saved_bytes(plain, x)
    kept_lean, y_lean = saved_bytes(lean, x)
    assert kept_lean < 0.6 * kept
    torch.testing.assert_close(y_lean, y)
    y_lean.sum().backward()  # the recompute runs, gradients arrive
    assert all(p.grad is not None for p in lean.parameters())


@pytest.mark.parametrize("pruned", [False, True])
@pytest.mark.parametrize("train, dtype", [(True, torch.float32), (True, torch.bfloat16), (False, torch.float32)])
def test_memory_efficient_fused_block_recomputes_the_bottleneck(train, dtype, pruned):
    # torchvision's meaning on the fused path too: each layer's bottleneck (its 1x1
    # convolution's output) is not kept but recomputed in backward from the same BN-ReLU, so
    # exactly its bytes leave the saved tensors and every gradient stays the same, bit for bit
    # (eval mode: batch norms frozen for fine-tuning, the weights still trained)
    torch.manual_seed(0)
    model = create_model("densenet_bc_100_k12", block_config=(3, 4), num_classes=5).train(train)
    if pruned:  # a layer that gathers some of the buffer's channels: recomputed from them too
        model.features.denseblock1.denselayer3.prune_(inputs=torch.tensor([0, 2, 3, 7, 19, 20, 25, 33]))
    randomize_norms(model, var=(0.5, 2.0), gamma=(0.5, 1.5))
    lean = copy.deepcopy(model).set_grad_checkpointing(True)
    assert all(b.fused_status() is None for b in (lean.features.denseblock1, lean.features.denseblock2))
    x = torch.randn(4, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        kept, y = saved_bytes(model, x)
        kept_lean, y_lean = saved_bytes(lean, x)
    assert torch.equal(y, y_lean)
    width, size = 4 * 12, torch.finfo(dtype).bits // 8  # bn_size * growth rate channels
    rows = 4 * (3 * 16 * 16 + 4 * 8 * 8)  # batch x (layers x positions) in each block
    assert kept - kept_lean == rows * width * size
    y.float().square().sum().backward()
    y_lean.float().square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), lean.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for b, c in zip(model.buffers(), lean.buffers()):
        assert torch.equal(b, c)


def test_torch_compile_memory_efficient_fused_block():
    torch.manual_seed(4)
    model = create_model("densenet_bc_100_k12", block_config=(2, 3), num_classes=5).set_grad_checkpointing(True)
    code = _compiled_against_reference(model, torch.randn(3, 3, 12, 12), True)
    assert code.count("densekit.dense_block") == 2 and "torch.cat" not in code
