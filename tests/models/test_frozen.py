"""optimize_for_inference: the same function as the model it copies, from constants kept."""

import copy
import io

import pytest
import torch

from densekit import DenseBlock, DenseNet, create_model
from densekit.models import frozen, native
from densekit.models.frozen import FrozenDenseBlock, FrozenDenseNet, FrozenTransition, optimize_for_inference
from densekit.models.layers import Transition, reference_path
from densekit.models.profile import count_macs
from densekit.prune import prune_model
from testkit import randomize_norms


def _pruned_model():
    """make run's model with random statistics, 40% of its channels pruned (layer inputs,
    bottleneck widths and block outputs), in eval mode."""
    torch.manual_seed(0)
    model = create_model("densenet_bc_40_k12_s2", num_classes=10, in_chans=1)
    randomize_norms(model)
    prune_model(model, 0.4)
    return model.eval()


# batch 2 runs torch.convolution's own choice; 20 the oneDNN-prepacked convolutions
@pytest.mark.parametrize("batch", [2, frozen._PACK_MIN_BATCH + 4])
def test_pruned_network_same_function_float32_and_bf16(batch, cpu_kernels):
    model = _pruned_model()
    fast = optimize_for_inference(model)
    blocks = [m for m in fast.modules() if isinstance(m, FrozenDenseBlock)]
    assert len(blocks) == 3 and all(type(m) not in (DenseBlock, Transition) for m in fast.features.children())
    assert sum(isinstance(m, FrozenTransition) for m in fast.modules()) == 2
    assert all(b.output_index is not None for b in blocks)  # the pruned outputs are selected too
    x = torch.randn(batch, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = model(x), fast(x)
    assert got.dtype == want.dtype
    # both in bf16 with BN folded in float32: within a few bf16 steps of each other
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)


def _head_calls(model: torch.nn.Module, monkeypatch) -> list:
    """The fused head's calls on ``model`` (a FrozenDenseNet) from now on."""
    calls, run = [], FrozenDenseNet._forward_fused_head
    monkeypatch.setattr(FrozenDenseNet, "_forward_fused_head", lambda *a: calls.append(1) or run(*a))
    return calls


@pytest.mark.parametrize("batch", [1, 5])
def test_the_head_runs_as_one_pass_with_the_modules_function(batch, monkeypatch, cpu_kernels):
    """The final norm, ReLU, mean and classifier as one float32 pass: the modules' function and
    output dtype in float32, under bf16 autocast and in a bf16 model."""
    model = _pruned_model()
    fast = optimize_for_inference(model)
    assert type(fast) is FrozenDenseNet and type(model) is DenseNet
    calls = _head_calls(fast, monkeypatch)
    x = torch.randn(batch, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = model(x), fast(x)
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)
        low, fast_low = copy.deepcopy(model).bfloat16(), copy.deepcopy(fast).bfloat16()
        want, got = low(x.bfloat16()), fast_low(x.bfloat16())
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.1)
    assert len(calls) == 3


def test_the_head_runs_as_modules_where_one_pass_would_change_what_is_seen(monkeypatch):
    """A hook on a module the pass skips, maps or pooled features asked for, max pooling, a
    classifier changed after the copy, float64, a trace: the modules run, with their function."""
    model = _pruned_model()
    x = torch.randn(3, 1, 28, 28)
    seen = []
    hooked = optimize_for_inference(model)
    hooked.classifier.register_forward_hook(lambda m, i, o: seen.append(o))
    calls = _head_calls(hooked, monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(hooked(x), model(x), rtol=1e-5, atol=1e-5)
        assert len(seen) == 1 and calls == []
        fast = optimize_for_inference(model)
        torch.testing.assert_close(fast.forward_features(x), model.forward_features(x), rtol=1e-5, atol=1e-5)
        fast.classifier = torch.nn.Sequential(model.classifier)
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
        for changed in (create_model("densenet_bc_40_k12_s2", num_classes=10, in_chans=1, global_pool="max"),
                        create_model("densenet_bc_40_k12_s2", num_classes=0, in_chans=1, features_only=True)):
            changed.eval()
            out, want = optimize_for_inference(changed)(x), changed(x)
            for o, w in zip(out if isinstance(out, list) else [out], want if isinstance(want, list) else [want]):
                torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-5)
    assert calls == []
    with torch.no_grad():
        fresh = optimize_for_inference(model)
        fresh(x)  # constants kept in float32
        torch.testing.assert_close(fresh.double()(x.double()), model.double()(x.double()), rtol=1e-9, atol=1e-9)
    assert calls == [1]
    with pytest.raises(RuntimeError, match="inference only"):
        optimize_for_inference(model).train()


def test_the_head_follows_changes_after_its_first_call(monkeypatch):
    """A classifier reset or replaced, a dtype changed, an in-place edit of the final norm after
    the head's first call: the modules' function, and a batch of none."""
    model = _pruned_model()
    fast = optimize_for_inference(model)
    calls = _head_calls(fast, monkeypatch)
    x = torch.randn(4, 1, 28, 28)

    def modules(m, x):  # the same copy with the head as its modules
        return m.forward_head(m.forward_features(x))

    with torch.no_grad():
        fast(x)
        fast.classifier = torch.nn.Linear(fast.num_features, 10)
        torch.testing.assert_close(fast(x), modules(fast, x), rtol=1e-5, atol=1e-5)
        fast.features.norm4.running_mean.add_(0.5)
        fast.classifier.weight.mul_(2)
        torch.testing.assert_close(fast(x), modules(fast, x), rtol=1e-5, atol=1e-5)
        fast.reset_classifier(3)
        assert fast(x).shape == (4, 3)
        torch.testing.assert_close(fast(x), modules(fast, x), rtol=1e-5, atol=1e-5)
        low = fast.bfloat16()(x.bfloat16())
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), modules(fast, x.bfloat16()).float(), rtol=0.05, atol=0.1)
        torch.testing.assert_close(fast.float()(x), modules(fast, x), rtol=1e-5, atol=1e-5)
        assert fast(x[:0]).shape == (0, 3)
    assert len(calls) == 8


def test_a_copy_with_nothing_frozen_keeps_its_gradient_and_trains():
    """Where no block runs fused nothing is frozen (here a layer's activation is not a ReLU): the
    copy's output keeps the input's gradient and the copy trains."""
    torch.manual_seed(0)
    model = DenseNet(8, (2,), stem="cifar", num_classes=5, in_chans=1, fused=True)
    model.features.denseblock1.denselayer1.relu1 = torch.nn.LeakyReLU()
    fast = optimize_for_inference(model.eval())
    assert type(fast) is FrozenDenseNet and not any(isinstance(m, FrozenDenseBlock) for m in fast.modules())
    x = torch.randn(2, 1, 28, 28, requires_grad=True)
    fast(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert fast.train().training


def test_float64_runs_on_torch_ops_beside_the_native_kernels(cpu_kernels):
    """The native kernels take float32 and bfloat16 only: a float64 copy reads its layers'
    inputs with torch ops, in the same process as float32 calls that take the kernels."""
    model = _pruned_model()
    fast = optimize_for_inference(model)
    x = torch.randn(frozen._PACK_MIN_BATCH, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fast.double()(x.double()), model.double()(x.double()), rtol=1e-9, atol=1e-9)


def test_a_pruned_blocks_output_outlives_the_next_call():
    """A pruned block returns its kept channels in a workspace of the call that made them: a
    later call, of any batch size, leaves an earlier output as it was."""
    model = _pruned_model()
    fast = optimize_for_inference(model)
    block = fast.features.denseblock1
    assert block.output_index is not None
    x1 = torch.randn(frozen._PACK_MIN_BATCH, block.in_channels, 14, 14)
    with torch.inference_mode():
        y1 = block(x1)
        want = y1.clone()
        for n in (frozen._PACK_MIN_BATCH, 2, 3 * frozen._PACK_MIN_BATCH):
            block(torch.randn(n, block.in_channels, 14, 14))
        assert torch.equal(y1, want)
        torch.testing.assert_close(y1, model.features.denseblock1(x1), rtol=1e-4, atol=1e-4)


# (3, 3), (1, 2) and (2, 2, 2): grids small enough for the convolution unrolled over them
@pytest.mark.parametrize("spatial_dims,size", [(1, (20,)), (2, (9, 7)), (3, (5, 6, 4)), (2, (3, 3)), (2, (1, 2)),
                                               (3, (2, 2, 2))])
@pytest.mark.parametrize("bn_size", [4, 0])
@pytest.mark.parametrize("batch", [3, frozen._PACK_MIN_BATCH])
def test_block_same_function_in_every_dimension(spatial_dims, size, bn_size, batch, cpu_kernels):
    torch.manual_seed(spatial_dims)
    block = DenseBlock(6, 5, 4, bn_size=bn_size, spatial_dims=spatial_dims, fused=True)
    randomize_norms(block)
    block.eval()
    fast = optimize_for_inference(block)
    assert isinstance(fast, FrozenDenseBlock)
    x = torch.randn(batch, 6, *size)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), block(x), rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(fast(x).float(), block(x).float(), rtol=0.05, atol=0.05)
        with pytest.raises(ValueError, match="expected 6 input channels"):
            fast(torch.randn(batch, 7, *size))


def test_a_copy_for_inference_only_that_does_not_follow_the_original():
    model = _pruned_model()
    x = torch.randn(2, 1, 28, 28)
    fast = optimize_for_inference(model)
    with torch.no_grad():
        before = fast(x)
        assert type(model.features.denseblock1) is DenseBlock  # the original is untouched
        model.features.denseblock1.denselayer1.conv1.weight.mul_(3)
        torch.testing.assert_close(fast(x), before, rtol=0, atol=0)
        assert not torch.allclose(model(x), before, atol=1e-3)
    assert not any(p.requires_grad for p in fast.parameters())
    y = fast(x)  # grad mode on: still no graph through the frozen blocks
    assert not y.requires_grad
    with pytest.raises(RuntimeError, match="inference only"):
        fast.train()
    fast.eval()  # allowed


def test_blocks_that_do_not_run_fused_stay_as_they_are():
    torch.manual_seed(0)
    model = create_model("densenet_bc_40_k12_s2", num_classes=10, in_chans=1).eval()
    model.features.denseblock2.fused = False
    fast = optimize_for_inference(model)
    assert isinstance(fast.features.denseblock1, FrozenDenseBlock)
    assert type(fast.features.denseblock2) is DenseBlock
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_prepacked_weights_kept_for_a_few_input_shapes():
    torch.manual_seed(0)
    block = DenseBlock(6, 5, 2, fused=True).eval()
    fast = optimize_for_inference(block)
    with torch.no_grad():
        for side in range(4, 4 + 2 * frozen._SHAPES):
            x = torch.randn(frozen._PACK_MIN_BATCH, 6, side, side)
            torch.testing.assert_close(fast(x), block(x), rtol=1e-5, atol=1e-5)
    assert len(fast._packed) == frozen._SHAPES


@pytest.mark.parametrize("bn_size", [4, 0])
def test_pointwise_and_small_grid_convolutions_run_as_matrix_products(bn_size):
    """With weights prepacked, a 1x1 convolution runs as a matrix product over the rows, and a
    3x3 one over a grid of at most ``_UNROLL_POSITIONS`` positions as one over the images."""
    torch.manual_seed(0)
    block = DenseBlock(6, 5, 3, bn_size=bn_size, fused=True)
    randomize_norms(block)
    block.eval()
    fast = optimize_for_inference(block)
    for side, unrolled in ((3, 9), (4, 0), (7, 0)):
        x = torch.randn(frozen._PACK_MIN_BATCH, 6, side, side)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), block(x), rtol=1e-5, atol=1e-5)
        packed, weights, _ = fast._packed[(tuple(x.shape), x.dtype, x.device)]
        assert packed
        kinds = [[w.positions for w in (w1, w2) if w is not None] for w1, w2, _, _ in weights]
        assert kinds == [[1, unrolled] if bn_size else [unrolled]] * 3


@pytest.mark.parametrize("bn_size", [4, 0])
@pytest.mark.parametrize("batch", [1, frozen._PACK_MIN_BATCH])
def test_last_convolutions_run_natively_into_the_buffer_where_the_kernel_takes_them(bn_size, batch):
    """A layer's last convolution (3x3, 2D, at most 16 outputs) runs as ``native.Conv3x3``
    where this machine's build has it, at any batch size; with more outputs, in 3D, or with
    the native kernels turned off after the first call, the convolution op runs instead."""
    torch.manual_seed(0)
    for growth, spatial, direct in ((12, (7, 5), True), (17, (7, 5), False), (12, (3, 4, 5), False)):
        block = DenseBlock(6, growth, 3, bn_size=bn_size, spatial_dims=len(spatial), fused=True)
        randomize_norms(block)
        block.eval()
        fast = optimize_for_inference(block)
        x = torch.randn(batch, 6, *spatial)
        with torch.no_grad():
            want = block(x)
            torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-5)
            with native.disabled():
                torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-5)
        _, weights, _ = fast._packed[(tuple(x.shape), x.dtype, x.device)]
        runs = direct and native.conv3x3_supported(torch.float32)
        assert [isinstance(d, native.Conv3x3) for _, _, d, _ in weights] == [runs] * 3


@pytest.mark.parametrize("in_chans,size", [(1, 28), (3, 32)])
def test_a_stem_convolution_feeding_a_block_runs_natively_into_channels_last(in_chans, size, cpu_kernels):
    """The stem convolution of a DenseNet-BC (into the first dense block) is a FrozenStemConv: the
    same function and state-dict keys, channels-last output where this build has the kernel; a
    trace, a gradient asked for the input and float64 run the Conv2d."""
    torch.manual_seed(0)
    model = create_model("densenet_bc_40_k12_s2", num_classes=10, in_chans=in_chans).eval()
    randomize_norms(model)
    fast = optimize_for_inference(model)
    stem = fast.features.conv0
    assert isinstance(stem, frozen.FrozenStemConv) and stem.weight is not model.features.conv0.weight
    x = torch.randn(frozen._PACK_MIN_BATCH, in_chans, size, size)
    with torch.no_grad():
        out = stem(x)
        torch.testing.assert_close(out, model.features.conv0(x), rtol=1e-5, atol=1e-5)
        assert out.is_contiguous(memory_format=torch.channels_last) == native.conv3x3_supported(torch.float32)
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = stem(x)
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), model.features.conv0(x), rtol=0.02, atol=0.02)
        torch.testing.assert_close(copy.deepcopy(stem).double()(x.double()),
                                   copy.deepcopy(model.features.conv0).double()(x.double()), rtol=1e-9, atol=1e-9)
    wanted = x.clone().requires_grad_()
    stem(wanted).sum().backward()  # the Conv2d, which autograd records
    assert wanted.grad is not None and wanted.grad.abs().sum() > 0
    assert list(fast.state_dict()) == list(model.state_dict())
    for bad in (torch.randn(2, in_chans + 1, size, size), torch.randn(2, in_chans, 1, 1)[..., :0]):
        with pytest.raises(RuntimeError), torch.no_grad():  # torch's own error, as the Conv2d says it
            stem(bad)
    with reference_path(fast), torch.no_grad():  # as counters and exports run it: the Conv2d
        assert not stem(x).is_contiguous(memory_format=torch.channels_last)
    scripted = torch.jit.script(fast)  # the Conv2d's call, as TorchScript compiles it
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-4)
    calls = []
    model.features.conv0.register_forward_hook(lambda *args: calls.append(1))
    hooked = optimize_for_inference(model)  # a hook would be lost: a hooked convolution stays
    assert type(hooked.features.conv0) is torch.nn.Conv2d
    with torch.no_grad():
        hooked(x)
    assert calls == [1]
    # an ImageNet stem's convolution feeds its batch norm, not a block: it stays a Conv2d
    assert type(optimize_for_inference(create_model("densenet121").eval()).features.conv0) is torch.nn.Conv2d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bottlenecks_and_transitions_run_natively_where_the_kernel_is_the_faster(dtype):
    """A bottleneck's 1x1 convolution (second batch norm folded in, then ReLU) and a transition's
    run as ``native.Pointwise`` in bf16 up to 64 outputs, in float32 up to 32 (oneDNN's product
    is the faster above), where this build has the kernel; the model computes the same function,
    and with the native kernels turned off after the first call the product runs instead."""
    torch.manual_seed(0)
    model = create_model("densenet_bc_40_k12_s2", num_classes=10, in_chans=1)
    randomize_norms(model)
    prune_model(model, 0.4, round_to=16, round_width=8)
    model.eval()
    fast = optimize_for_inference(model)
    x = torch.randn(frozen._PACK_MIN_BATCH, 1, 28, 28)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        want, got = model(x), fast(x)
        with native.disabled():
            off = fast(x)
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(got.float(), want.float(), **tolerance)
    torch.testing.assert_close(off.float(), want.float(), **tolerance)
    supported = native.conv3x3_supported(dtype)
    limit = 64 if dtype == torch.bfloat16 else 32
    block = fast.features.denseblock1
    _, weights, chain = block._packed[((x.shape[0], 24, 14, 14), dtype, x.device)]
    widths = [layer.norm2.num_features for layer in block.values()]
    assert [isinstance(p, native.Pointwise) for *_, p in weights] == [supported and w <= limit for w in widths]
    # where every layer runs both kernels, the block runs all its layers in one native call
    assert isinstance(chain, native.DenseLayers) == (supported and max(widths) <= limit)
    (*_, point), = fast.features.transition1._kept.values()
    assert isinstance(point, native.Pointwise) == (supported and fast.features.transition1.conv.out_channels <= limit)


def test_wide_bottlenecks_form_their_bn_relu_inside_the_native_convolution():
    """In bf16 a bottleneck of up to 128 outputs (densenet121's) that reads a prefix of the
    block's buffer runs as ``native.Pointwise`` with its first batch norm and ReLU formed in the
    kernel's tile; a transition of more than 64 outputs stays oneDNN's product, which the kernel
    does not beat on an input already formed; the function is the model's."""
    if not native.conv3x3_supported(torch.bfloat16):
        pytest.skip("this CPU's build has no bf16 native convolution (AVX512-BF16)")
    torch.manual_seed(0)
    model = DenseNet(growth_rate=32, block_config=(2, 2), num_init_features=128, num_classes=10, in_chans=1,
                     stem="cifar", fused=True)
    randomize_norms(model)
    model.eval()
    fast = optimize_for_inference(model)
    x = torch.randn(frozen._PACK_MIN_BATCH, 1, 12, 12)
    calls = []
    original = native.Pointwise.__call__

    def counting(self, *args, scale=None, **kwargs):
        calls.append((self.out_channels, scale is not None))
        return original(self, *args, scale=scale, **kwargs)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x)
        native.Pointwise.__call__ = counting
        try:
            got = fast(x)
        finally:
            native.Pointwise.__call__ = original
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)
    assert calls == [(128, True)] * 4  # two layers in each block; the transition (96 outputs) is oneDNN's
    assert fast.features.transition1.conv.out_channels == 96


def test_eval_and_predict_run_the_optimized_copy_on_the_cpu_only():
    """``densekit eval`` and ``predict`` load through ``for_inference``."""
    model = _pruned_model()
    assert isinstance(frozen.for_inference(model, torch.device("cpu")).features.denseblock3, FrozenDenseBlock)
    assert frozen.for_inference(model, torch.device("meta")) is model


def test_the_copy_is_a_model_like_its_original():
    """Same state-dict keys, eval mode throughout, counted and traced on the reference path,
    copied and saved after a call (without its oneDNN-packed weights), optimized again."""
    model = _pruned_model()
    fast = optimize_for_inference(model)
    x = torch.randn(frozen._PACK_MIN_BATCH, 1, 28, 28)
    with torch.no_grad():
        want = fast(x)  # packs weights for this shape
    assert list(fast.state_dict()) == list(model.state_dict())
    assert not any(m.training for m in fast.modules())
    assert count_macs(fast, (1, 28, 28)) == count_macs(model, (1, 28, 28))
    buf = io.BytesIO()
    torch.save(fast, buf)
    for other in (copy.deepcopy(fast), torch.load(io.BytesIO(buf.getvalue()), weights_only=False),
                  optimize_for_inference(fast)):
        with torch.no_grad():
            torch.testing.assert_close(other(x), want, rtol=0, atol=0)
    traced = torch.jit.trace(fast, x[:2], check_trace=False)  # a trace records the reference path
    torch.testing.assert_close(traced(x[:2]), model(x[:2]), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="inference only"):
        fast.features.denseblock1.prune_(torch.arange(4))
    with pytest.raises(RuntimeError, match="inference only"):
        fast.features.transition1.prune_(torch.arange(4))
    with pytest.raises(RuntimeError, match="inference only"):
        fast.features.transition1.train()


def test_a_copy_pickled_without_a_later_kept_constant_loads_and_runs(monkeypatch):
    """A copy saved by a version that kept fewer constants (here: no column readers) loads,
    runs and takes a state dict: the missing stores start empty."""
    model = _pruned_model()
    fast = optimize_for_inference(model)
    x = torch.randn(frozen._PACK_MIN_BATCH, 1, 28, 28)
    current = FrozenDenseBlock.__getstate__

    def without_readers(self):  # the state that version pickled
        state = current(self)
        del state["_readers"]
        return state

    buf = io.BytesIO()
    with monkeypatch.context() as patch:
        patch.setattr(FrozenDenseBlock, "__getstate__", without_readers)
        torch.save(fast, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fast(x), rtol=0, atol=0)
        loaded.load_state_dict(model.state_dict())
        torch.testing.assert_close(loaded(x), fast(x), rtol=0, atol=0)


# odd sides: the pooling drops the last row or column, as AvgPool does
@pytest.mark.parametrize("spatial_dims,size", [(1, (9,)), (2, (7, 6)), (2, (4, 5)), (3, (5, 4, 4))])
@pytest.mark.parametrize("batch", [3, frozen._PACK_MIN_BATCH])
def test_transition_same_function_in_every_dimension(spatial_dims, size, batch, cpu_kernels):
    torch.manual_seed(spatial_dims)
    transition = Transition(10, 6, spatial_dims=spatial_dims, fused=True)
    randomize_norms(transition)
    transition.eval()
    fast = optimize_for_inference(transition)
    assert isinstance(fast, FrozenTransition) and list(fast.state_dict()) == list(transition.state_dict())
    x = torch.randn(batch, 10, *size)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), transition.forward_plain(x), rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = fast(x), transition(x)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)
        # constants kept per dtype and shape where the native kernels run it
        assert len(fast._kept) == (0 if cpu_kernels == "torch-ops" else 2)


def test_transition_changed_after_the_copy_runs_as_a_transition():
    torch.manual_seed(0)
    transition = Transition(10, 6, fused=True)
    randomize_norms(transition)
    transition.eval()
    x = torch.randn(frozen._PACK_MIN_BATCH, 10, 6, 6)
    fast = optimize_for_inference(transition)
    with torch.no_grad():
        fast(x)  # constants kept
        for change in (lambda t: setattr(t, "pool", torch.nn.MaxPool2d(2)), lambda t: t.norm.train()):
            want, got = copy.deepcopy(transition), copy.deepcopy(fast)
            change(want)
            change(got)
            torch.testing.assert_close(got(x), want(x), rtol=1e-5, atol=1e-5)


def test_loading_a_state_dict_into_the_copy_makes_its_constants_anew():
    model, other = _pruned_model(), _pruned_model()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    fast = optimize_for_inference(model)
    x = torch.randn(frozen._PACK_MIN_BATCH, 1, 28, 28)
    with torch.no_grad():
        fast(x)  # constants and packed weights kept
        fast.load_state_dict(other.state_dict())
        torch.testing.assert_close(fast(x), other(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spatial,padding,kernel", [((3, 3), [1, 1], (3, 3)), ((2, 3), [1, 1], (3, 3)),
                                                    ((2, 2, 2), [1, 1, 1], (3, 3, 3)), ((3,), [1], (3,))])
def test_unrolled_convolution_is_the_convolution(spatial, padding, kernel):
    torch.manual_seed(0)
    weight = torch.randn(5, 4, *kernel, dtype=torch.float64)
    x = torch.randn(3, 4, *spatial, dtype=torch.float64)
    n = len(spatial)
    want = torch.convolution(x, weight, None, [1] * n, padding, [1] * n, False, [0] * n, 1)
    got = x.movedim(1, -1).reshape(3, -1) @ frozen._unrolled(weight, padding, list(spatial)).t()
    torch.testing.assert_close(got.view(3, *want.shape[2:], 5).movedim(-1, 1), want)


def test_a_wide_convolution_on_a_small_grid_is_not_unrolled():
    # 81 x 12 x 4,400 weights would be over the bound: it stays a convolution
    wide = frozen._Packed(torch.randn(12, 4400, 3, 3), [1, 1], [16, 4400, 3, 3])
    narrow = frozen._Packed(torch.randn(12, 48, 3, 3), [1, 1], [16, 48, 3, 3])
    assert (wide.positions, narrow.positions) == (0, 9)


def test_transitions_that_do_not_pool_first_stay_as_they_are():
    transition = Transition(10, 6, fused=True)
    transition.pool = torch.nn.MaxPool2d(2)
    assert type(optimize_for_inference(transition)) is Transition
    with pytest.raises(ValueError, match="pools before"):
        FrozenTransition(transition)


def test_a_block_right_under_the_root_is_replaced_in_place():
    torch.manual_seed(0)
    model = torch.nn.Sequential(DenseBlock(6, 4, 2, fused=True), torch.nn.Conv2d(14, 3, 1)).eval()
    fast = optimize_for_inference(model)
    assert isinstance(fast[0], FrozenDenseBlock) and isinstance(fast[1], torch.nn.Conv2d)
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_outputs_stay_the_callers_across_calls_and_inference_mode():
    # densekit eval and predict run the copy under torch.inference_mode; a later call outside
    # it runs as well, and an output the caller keeps is its own (not memory a later call reuses)
    torch.manual_seed(1)
    model = create_model("densenet_bc_40_k12_s2", num_classes=10, in_chans=1)
    randomize_norms(model)
    fast = optimize_for_inference(model.eval())
    x, other = torch.randn(20, 1, 28, 28), torch.randn(20, 1, 28, 28)
    kept = []
    fast.features.denseblock2.register_forward_hook(lambda module, args, out: kept.append(out))
    with torch.inference_mode():
        first = fast(x)
    with torch.no_grad():
        again, want = fast(x), model(x)
        held = kept[1].clone()
        fast(other)
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kept[1], held, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pruned", [False, True])
@pytest.mark.parametrize("batch", [1, frozen._PACK_MIN_BATCH])
def test_a_block_runs_all_its_layers_in_one_native_call(dtype, pruned, batch, monkeypatch):
    """Where every layer runs the native 1x1 and 3x3 kernels, the block runs them all in one
    ``native.DenseLayers`` call, no Pointwise or Conv3x3 called from Python, and computes the
    same as layer by layer (the kernels' own calls, counted) and as the block it copies."""
    if not native.conv3x3_supported(dtype):
        pytest.skip(f"this CPU's build has no native {dtype} convolutions")
    torch.manual_seed(0)
    block = DenseBlock(6, 12, 4, bn_size=2, fused=True)  # widths of 24: native in float32 too
    randomize_norms(block)
    if pruned:  # unrounded: each bottleneck its own width, which the native loop must take
        prune_model(block, 0.4)
        assert any(layer.input_index is not None for layer in block.values())
        assert len({layer.norm2.num_features for layer in block.values()}) > 1
    block.eval()
    chained, layered = optimize_for_inference(block), optimize_for_inference(block)
    x = torch.randn(batch, 6, 7, 5)
    calls = []
    for cls in (native.Pointwise, native.Conv3x3):
        original = cls.__call__
        monkeypatch.setattr(cls, "__call__", lambda self, *a, original=original, **k: calls.append(self) or
                            original(self, *a, **k))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        want = block(x)
        calls.clear()
        got = chained(x)
        assert calls == []
        # the same constants, the layers run one kernel call at a time
        layered(x)  # fills its cache
        key = next(iter(layered._packed))
        packed, weights, chain = layered._packed[key]
        assert isinstance(chain, native.DenseLayers) and chain.layers == 4
        layered._packed[key] = (packed, weights, None)
        calls.clear()
        one_by_one = layered(x)
        assert len(calls) == 2 * 4
    torch.testing.assert_close(got, one_by_one, rtol=0, atol=0)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(got.float(), want.float(), **tolerance)


def test_dense_layers_refuse_layers_that_do_not_chain_and_matrices_that_do_not_fit():
    if not native.conv3x3_supported(torch.float32):
        pytest.skip("this CPU's build has no native float32 convolutions")
    torch.manual_seed(0)
    point = native.Pointwise(torch.randn(8, 6, 1, 1), torch.zeros(8), torch.float32, relu=True)
    direct = native.Conv3x3(torch.randn(4, 8, 3, 3), torch.float32)
    scale, shift = torch.ones(6), torch.zeros(6)
    with pytest.raises(ValueError, match="does not chain"):  # a second layer must read 6 + 4 channels
        native.DenseLayers([point, point], [scale] * 2, [shift] * 2, [direct] * 2, 6, 4, torch.float32)
    with pytest.raises(ValueError, match="does not chain"):  # no ReLU after the bottleneck
        native.DenseLayers([native.Pointwise(torch.randn(8, 6, 1, 1), None, torch.float32, relu=False)],
                           [scale], [shift], [direct], 6, 4, torch.float32)
    layers = native.DenseLayers([point], [scale], [shift], [direct], 6, 4, torch.float32)
    rows, mid = torch.randn(2 * 35, 10), torch.empty(2 * 35 * 8)
    layers(rows, (7, 5), mid)
    with pytest.raises(ValueError, match="native DenseLayers"):
        layers(rows.bfloat16(), (7, 5), mid)
    with pytest.raises(ValueError, match="native DenseLayers"):
        layers(rows, (7, 5), mid[:-1])
    with pytest.raises(ValueError, match="native DenseLayers"):
        layers(rows[:, :9], (7, 5), mid)
    with pytest.raises(ValueError, match="native DenseLayers"):  # not whole images of 7x5
        layers(rows[:-1], (7, 5), mid)
    with pytest.raises(ValueError, match="native DenseLayers"):  # 2D only
        layers(rows, (7, 5, 1), mid)
