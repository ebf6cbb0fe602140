"""Property-based tests over random architectures: channel bookkeeping, shapes, and the
fused block computing the same function and gradients as the reference.

Both paths run in float64 here, so that the comparison tests the algorithm and not the
luck of fp32 rounding: Hypothesis's tiny inputs make batch norm ill-conditioned (three
values per channel) and land activations on ReLU's kink (a pre-activation of 6e-8, where
fp32 paths fall either side), and in fp32 both made the comparison flaky. What fp32 itself
must reach, in the cases Hypothesis found, is pinned in tests/models/test_parity.py.
"""

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from densekit import DenseBlock, DenseNet

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RTOL = 1e-9  # of each tensor's largest entry; float64 paths agree to ~1e-14 on these


def assert_close_normwise(actual, expected, name=""):
    # relative to the tensor's largest entry: gradients that cancel to ~0 have no
    # meaningful elementwise relative error
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    assert diff <= RTOL * scale + 1e-12, f"{name}: max diff {diff:.3g} vs scale {scale:.3g}"


@st.composite
def architectures(draw):
    spatial_dims = draw(st.sampled_from([1, 2, 3]))
    return dict(
        growth_rate=draw(st.integers(1, 8)),
        block_config=tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))),
        bn_size=draw(st.sampled_from([0, 1, 2, 4])),
        compression=draw(st.sampled_from([0.25, 0.5, 0.75, 1.0])),
        num_init_features=draw(st.integers(1, 12)),
        in_chans=draw(st.integers(1, 4)),
        num_classes=draw(st.integers(1, 5)),
        stem=draw(st.sampled_from(["cifar", "resnet", "imagenet"])),
        spatial_dims=spatial_dims,
    )


def expected_channels(cfg):
    c = cfg["num_init_features"]
    for i, n in enumerate(cfg["block_config"]):
        c += n * cfg["growth_rate"]
        if i != len(cfg["block_config"]) - 1:
            c = max(1, int(c * cfg["compression"]))
    return c


@SETTINGS
@given(cfg=architectures(), extra=st.integers(0, 5), batch=st.integers(3, 5))
def test_channels_shapes_and_fused_parity(cfg, extra, batch):
    torch.manual_seed(0)
    plain = DenseNet(**cfg).double()
    assert plain.num_features == expected_channels(cfg)
    assert plain.feature_info[-1]["num_chs"] == plain.num_features
    size = plain.min_input_size + extra
    if cfg["spatial_dims"] == 3:
        size = min(size, 12) if plain.min_input_size <= 12 else plain.min_input_size
    x = torch.randn(batch, cfg["in_chans"], *[size] * cfg["spatial_dims"], dtype=torch.float64)
    fast = copy.deepcopy(plain).set_fused(True)
    y_ref, y_fast = plain(x), fast(x)
    assert y_ref.shape == (batch, cfg["num_classes"])
    assert_close_normwise(y_fast, y_ref, "output")
    g = torch.randn_like(y_fast)
    y_ref.backward(g)
    y_fast.backward(g)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        assert_close_normwise(q.grad, p.grad, name)
    for b_ref, b_fast in zip(plain.buffers(), fast.buffers()):
        torch.testing.assert_close(b_fast, b_ref, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(in_channels=st.integers(1, 16), growth_rate=st.integers(1, 8), num_layers=st.integers(1, 5),
       bn_size=st.sampled_from([0, 2, 4]), spatial_dims=st.sampled_from([1, 2, 3]), train=st.booleans(),
       channels_last=st.booleans())
def test_block_out_channels_and_parity(in_channels, growth_rate, num_layers, bn_size, spatial_dims, train,
                                       channels_last):
    torch.manual_seed(1)
    block = DenseBlock(in_channels, growth_rate, num_layers, bn_size=bn_size, spatial_dims=spatial_dims)
    assert block.out_channels == in_channels + growth_rate * num_layers
    block.train(train).double()
    fast = copy.deepcopy(block)
    fast.fused = True
    x = torch.randn(2, in_channels, *[5] * spatial_dims, dtype=torch.float64)
    if channels_last and spatial_dims == 2:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = block(x1), fast(x2)
    assert y1.shape == (2, block.out_channels, *[5] * spatial_dims)
    assert_close_normwise(y2, y1, "output")
    assert torch.equal(y2[:, :in_channels], x)  # the block input passes through untouched
    g = torch.randn_like(y2)
    y1.backward(g)
    y2.backward(g)
    assert_close_normwise(x2.grad, x1.grad, "input")
    for (name, p), q in zip(block.named_parameters(), fast.parameters()):
        assert_close_normwise(q.grad, p.grad, name)


@SETTINGS
@given(cfg=architectures(), stem_stride=st.sampled_from([1, 2]), extra=st.integers(0, 40))
def test_size_from_the_arguments_is_the_built_models(cfg, stem_stride, extra):
    # models.size: the closed form that bounds a stranger's model.json before anything is built
    from densekit.models.profile import count_params
    from densekit.models.size import estimate

    if cfg["stem"] != "imagenet":
        cfg = dict(cfg, stem_stride=stem_stride)
    model = DenseNet(**cfg)
    side = model.min_input_size + extra
    size = estimate(cfg, (side,) * cfg["spatial_dims"])
    assert size.params == count_params(model)
    assert size.min_input == model.min_input_size and model.output_size(model.min_input_size) >= 1
    assert model.min_input_size == 1 or model.output_size(model.min_input_size - 1) == 0  # the smallest
    # activations: what a fused training step keeps per input: the stem convolution's output (and
    # its max-pooled map), every bottleneck map, every block's buffer, every transition's output
    from densekit import DenseLayer, Transition

    kept = []
    hooks = [m.register_forward_hook(lambda m, i, o: kept.append(o.numel()))
             for m in model.modules() if isinstance(m, (DenseBlock, Transition)) or m is model.features.conv0
             or m is getattr(model.features, "pool0", None)]
    hooks += [m.conv1.register_forward_hook(lambda m, i, o: kept.append(o.numel()))
              for m in model.modules() if isinstance(m, DenseLayer) and m.has_bottleneck]
    with torch.no_grad():
        model.eval()(torch.randn(1, cfg["in_chans"], *[side] * cfg["spatial_dims"]))
    for h in hooks:
        h.remove()
    assert size.activations == sum(kept)
