"""Network slimming on models: the plan, the function it preserves, the fused path's guard."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import densekit
from densekit.models import native
from densekit.models.fused import supports_fused
from densekit.models.profile import count_params
from densekit.prune import marked_for, prunable_norms, prune_model, slimming_plan
from densekit.rundir import RunDir, pruned_structure


def small(bn_size: int = 4, fused: bool = True) -> densekit.DenseNet:
    """Two blocks of three layers, k=4, on 1x12x12 inputs; BN gammas and betas spread out and
    running statistics filled in, so that neither is a no-op."""
    torch.manual_seed(0)
    model = densekit.DenseNet(4, (3, 3), num_init_features=6, bn_size=bn_size, num_classes=5, in_chans=1,
                              stem="cifar", fused=fused)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 1.0)
            m.bias.data.uniform_(-0.3, 0.3)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 1, 12, 12))
    return model


def inputs() -> torch.Tensor:
    return torch.randn(6, 1, 12, 12, generator=torch.Generator().manual_seed(1))


def test_amount_zero_is_the_identity():
    model = small().eval()
    x = inputs()
    before, params = model(x), count_params(model)
    report = prune_model(model, 0.0)
    assert (report.kept, report.removed, report.removed_fraction) == (report.prunable, 0, 0.0)
    # norm1 of block 1 reads 6, 10, 14 channels, of block 2 (after a transition to 9) 9, 13, 17;
    # six bottlenecks of 4k = 16; the transition reads block 1's 18 maps, the final norm block 2's 21
    assert report.prunable == (6 + 10 + 14) + (9 + 13 + 17) + 6 * 16 + 18 + 21 == 204
    assert torch.equal(model(x), before) and count_params(model) == params
    assert pruned_structure(model) == {}
    assert all(layer.input_index is None for layer in model.modules() if isinstance(layer, densekit.DenseLayer))
    assert all(block.output_index is None for block in model.modules() if isinstance(block, densekit.DenseBlock))


def _layer_params(n_in: int, width: int, k: int, bottleneck: bool) -> int:
    """Parameters of a dense layer reading n_in channels (BN affine, convolutions without bias)."""
    if bottleneck:
        return 2 * n_in + n_in * width + 2 * width + width * k * 9
    return 2 * n_in + n_in * k * 9


@pytest.mark.parametrize("bn_size", [4, 0])
def test_dead_channels_go_without_changing_the_function(bn_size):
    """A channel whose gamma is 0 and beta <= 0 is 0 after its ReLU: pruning exactly those keeps
    the outputs (eval and train mode) and removes exactly their weights."""
    model = small(bn_size)
    groups = prunable_norms(model)
    gen = torch.Generator().manual_seed(2)
    dead = {}
    for name, kind, bn in groups:  # a third of each group's channels, never all of them
        idx = torch.randperm(bn.num_features, generator=gen)[: bn.num_features // 3]
        bn.weight.data[idx] = 0.0
        bn.bias.data[idx] = -torch.rand(len(idx), generator=gen) * (torch.arange(len(idx)) % 2)  # 0 or < 0
        dead[(name, kind)] = len(idx)
    total = sum(bn.num_features for _, _, bn in groups)
    n_dead = sum(dead.values())
    x = inputs()
    train_copy = copy.deepcopy(model)
    model.eval()
    want_eval = model(x)
    want_train = train_copy(x)
    params = count_params(model)

    report = prune_model(model, n_dead / total)
    pruned_train = copy.deepcopy(train_copy)
    prune_model(pruned_train, n_dead / total)
    assert report.removed == n_dead
    torch.testing.assert_close(model(x), want_eval, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pruned_train(x), want_train, rtol=1e-5, atol=1e-5)

    expected = 0
    for name, layer in ((n, m) for n, m in small(bn_size).named_modules() if isinstance(m, densekit.DenseLayer)):
        k, width, n_in = layer.growth_rate, 4 * layer.growth_rate, layer.in_channels
        full = _layer_params(n_in, width, k, bool(bn_size))
        kept = _layer_params(n_in - dead[(name, "inputs")], width - dead.get((name, "width"), 0), k, bool(bn_size))
        expected += full - kept
    # a block's dropped outputs: the transition's norm and its convolution's inputs (to 9 maps),
    # the final norm's and the classifier's (5 classes)
    expected += dead[("features.denseblock1", "outputs")] * (2 + 9) + dead[("features.denseblock2", "outputs")] * (2 + 5)
    assert params - count_params(model) == expected > 0
    assert model.classifier.in_features == model.num_features == model.feature_info.channels()[-1] \
        == 21 - dead[("features.denseblock2", "outputs")]
    assert model.features.transition1.conv.in_channels == model.feature_info.channels()[1] \
        == 18 - dead[("features.denseblock1", "outputs")]


def test_one_global_threshold_and_one_channel_kept_everywhere():
    model = small()
    groups = prunable_norms(model)
    name, kind, first = groups[0]
    first.weight.data.fill_(1e-4)  # every channel of the first norm1 ranks lowest...
    first.weight.data[3] = 2e-4    # ...and this one is its largest: the one it keeps
    plan = slimming_plan(model, 0.25)
    assert plan[name][kind].tolist() == [3]
    removed, gone, stay = 0, [], []
    for n, k, bn in groups:
        kept = torch.ones(bn.num_features, dtype=torch.bool)
        if plan[n][k] is not None:
            kept[:] = False
            kept[plan[n][k]] = True
        removed += int((~kept).sum())
        if (n, k) != (name, kind):
            gamma = bn.weight.detach().abs()
            gone.append(gamma[~kept])
            stay.append(gamma[kept])
    assert removed == round(0.25 * 204) - 1 == 50  # one channel saved by the keep-one rule
    assert torch.cat(gone).max() < torch.cat(stay).min()  # one threshold across the network


@pytest.mark.parametrize("round_to,round_width", [(2, None), (4, None), (4, 2), (2, 3)])
def test_round_to_keeps_each_norms_largest_in_multiples(round_to, round_width):
    """Inputs and outputs in multiples of ``round_to``, widths of ``round_width`` (default the same)."""
    model = small()
    exact = slimming_plan(model, 0.4)
    plan = slimming_plan(model, 0.4, round_to=round_to, round_width=round_width)
    kept_exact = kept_rounded = 0
    kinds = set()
    for name, kind, bn in prunable_norms(model):
        n = bn.num_features
        keep, want = plan[name][kind], exact[name][kind]
        count = n if keep is None else keep.numel()
        exact_count = n if want is None else want.numel()
        kept_exact, kept_rounded = kept_exact + exact_count, kept_rounded + count
        step = round_width if kind == "width" and round_width else round_to
        kinds.add(kind)
        # the multiple nearest the exact count (ties up), at least one multiple, at most all
        assert count == min(n, max(step, (exact_count + step // 2) // step * step))
        if keep is not None:  # the largest |gamma| of the norm
            gamma = bn.weight.detach().abs()
            dropped = torch.ones(n, dtype=torch.bool)
            dropped[keep] = False
            assert gamma[keep].min() >= gamma[dropped].max()
    # rounding to the nearest multiple moves the total by less than half a multiple per norm
    assert abs(kept_rounded - kept_exact) < len(prunable_norms(model)) * max(round_to, round_width or 0) / 2
    assert kept_rounded < 204 and kinds == {"inputs", "width", "outputs"}


def _maps_of(model, name, kind):
    """Each logical channel's map in the block that ``name`` (a layer, or a block) reads from:
    0 for the block input, i for layer i's new maps; written out here, not taken from prune."""
    block = model.get_submodule(name.rpartition(".")[0] if kind == "inputs" else name)
    n = model.get_submodule(name).in_channels if kind == "inputs" else block.out_channels
    return [0 if c < block.in_channels else 1 + (c - block.in_channels) // block.growth_rate for c in range(n)]


def spread(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data.uniform_(0.2, 1.0)
    return model


MAP_MODELS = {
    "2d": small,
    # a growth rate per block, no bottleneck, 1D
    "1d-per-block-growth-no-bottleneck": lambda: spread(densekit.DenseNet(
        [2, 3], (3, 4), num_init_features=4, bn_size=0, num_classes=3, in_chans=1, stem="cifar", spatial_dims=1)),
    "a-bare-block": lambda: spread(densekit.DenseBlock(5, 3, 4)),
}


@pytest.mark.parametrize("key", MAP_MODELS)
@pytest.mark.parametrize("amount", [0.2, 0.4, 0.6])
def test_unit_map_drops_whole_maps_where_most_of_each_was_marked(amount, key):
    """Per map, a reader's map goes exactly where the per-channel plan marked at least half of
    its channels; widths go as in the per-channel plan; the rest of the map stays whole."""
    model = MAP_MODELS[key]()
    exact = slimming_plan(model, amount)
    plan = slimming_plan(model, amount, unit="map")
    whole_maps_gone = 0
    for name, kind, bn in prunable_norms(model):
        n = bn.num_features
        keep, want = plan[name][kind], exact[name][kind]
        if kind == "width":
            assert (keep is None and want is None) or torch.equal(keep, want)
            continue
        kept = set(range(n)) if keep is None else set(keep.tolist())
        marked = set(range(n)) - (set(range(n)) if want is None else set(want.tolist()))
        maps = _maps_of(model, name, kind)
        votes = {}
        for m in set(maps):
            channels = {c for c in range(n) if maps[c] == m}
            assert channels <= kept or not channels & kept  # whole maps only
            votes[m] = 2 * len(channels & marked) >= len(channels)
        if all(votes.values()):  # all would go: one map stays whole
            assert len({maps[c] for c in kept}) == 1
        else:
            assert all(votes[maps[c]] != (c in kept) for c in range(n)), (name, kind)
        whole_maps_gone += len(set(maps) - {maps[c] for c in kept})
    assert whole_maps_gone > 0


def test_unit_map_keeps_the_map_the_vote_would_drop_last_where_all_would_go():
    """Not the map of the largest |gamma|: the map whose middle channel ranks highest, so that
    marking more never removes less."""
    model = small()
    name, first = "features.denseblock1.denselayer2", model.features.denseblock1.denselayer2.norm1
    assert first.num_features == 6 + 4  # the block input and one map
    first.weight.data[:6] = 1e-4  # the block input: all six low
    first.weight.data[6:] = 1e-5  # the first layer's maps (channels 6-9): three lower still...
    first.weight.data[7] = 5.0    # ...and the largest of the norm
    plan = slimming_plan(model, 0.5, unit="map")
    assert plan[name]["inputs"].tolist() == [0, 1, 2, 3, 4, 5]
    first.weight.data[:6] = 1e-6  # now the first layer's maps go last
    plan = slimming_plan(model, 0.5, unit="map")
    assert plan[name]["inputs"].tolist() == [6, 7, 8, 9]


def test_unit_map_on_a_pruned_model_reads_maps_through_its_index():
    """Pruning per map a model already pruned per channel votes on the channels each layer
    still reads, by the maps they came from, and composes with the earlier index."""
    model = small().eval()
    prune_model(model, 0.2)
    before = {name: model.get_submodule(name).input_index for name, kind, _ in prunable_norms(model)
              if kind == "inputs"}
    outputs = {name: model.get_submodule(name).output_index for name, kind, _ in prunable_norms(model)
               if kind == "outputs"}
    prune_model(model, 0.3, unit="map")
    for name, old in outputs.items():  # the same for what each block returns
        block = model.get_submodule(name)
        maps = _maps_of(model, name, "outputs")
        index = range(block.out_channels) if block.output_index is None else block.output_index.tolist()
        earlier = set(range(block.out_channels)) if old is None else set(old.tolist())
        assert set(index) == {c for c in earlier if maps[c] in {maps[c] for c in index}}
    for name, old in before.items():
        layer = model.get_submodule(name)
        if layer.input_index is None:
            continue
        maps = _maps_of(model, name, "inputs")
        read = {maps[c] for c in layer.input_index.tolist()}
        earlier = set(range(layer.in_channels)) if old is None else set(old.tolist())
        # each map a layer reads, it reads as much of as it did before
        assert set(layer.input_index.tolist()) == {c for c in earlier if maps[c] in read}
    with torch.no_grad():
        model(inputs())


def _removed(model, plan) -> int:
    return sum(bn.num_features - (bn.num_features if plan[name][kind] is None else plan[name][kind].numel())
               for name, kind, bn in prunable_norms(model) if name in plan)


@pytest.mark.parametrize("key", MAP_MODELS)
@pytest.mark.parametrize("unit,round_to", [("map", 1), ("channel", 4), ("channel", 1)])
@pytest.mark.parametrize("amount", [0.2, 0.4, 0.6])
def test_the_amount_is_what_goes_as_near_as_maps_and_rounding_allow(amount, unit, round_to, key):
    """prune_model removes ``amount`` of the prunable channels: of every number of channels
    the threshold could mark (all tried here), none gives a plan nearer the amount."""
    model = MAP_MODELS[key]()
    total = sum(bn.num_features for _, _, bn in prunable_norms(model))
    removed = [_removed(model, slimming_plan(model, n / total, round_to, unit=unit)) for n in range(total)]
    assert removed == sorted(removed)  # more marked never removes less: what lets a bisection search
    target = round(amount * total)
    best = min(abs(r - target) for r in removed)
    marked = marked_for(model, amount, round_to, unit=unit)
    assert abs(removed[round(marked * total)] - target) == best
    channels = prune_model(model, amount, round_to, unit=unit)
    assert (channels.prunable, channels.removed, channels.marked_fraction) == \
        (total, removed[round(marked * total)], marked)
    if unit == "map":  # a map goes only where half of it was marked: the threshold had to move
        assert marked != amount


def test_whole_maps_remove_the_amount_not_the_fraction_marked():
    """On random scales a map of 12 goes only where 6 of its channels rank low, so marking 40%
    removes about a fifth of a DenseNet-BC's channels; the threshold moves until 40% go."""
    torch.manual_seed(0)
    model = densekit.create_model("densenet_bc_40_k12_s2", in_chans=1, num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.0, 1.0)
    marking = _removed(model, slimming_plan(copy.deepcopy(model), 0.4, unit="map"))
    channels = prune_model(model, 0.4, unit="map")
    assert marking / channels.prunable < 0.3
    assert channels.removed_fraction == pytest.approx(0.4, abs=0.01) and channels.marked_fraction > 0.45


def test_unit_must_be_map_or_channel():
    with pytest.raises(densekit.errors.UserError, match="unit must be one of"):
        slimming_plan(small(), 0.3, unit="maps")


@pytest.mark.parametrize("bad", [0, -8, 2.5, True])
def test_round_to_must_be_a_positive_integer(bad):
    with pytest.raises(densekit.errors.UserError, match="round_to must be"):
        slimming_plan(small(), 0.3, round_to=bad)
    with pytest.raises(densekit.errors.UserError, match="round_width must be"):
        slimming_plan(small(), 0.3, round_width=bad)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True, "0.3"])
def test_amount_outside_0_1_is_refused(bad):
    with pytest.raises(densekit.errors.UserError, match=r"amount must be a number in \[0, 1\)"):
        slimming_plan(small(), bad)


def test_pruning_twice_composes_input_index():
    model = small().eval()
    prune_model(model, 0.3)
    first = {n: m.input_index.clone() for n, m in model.named_modules()
             if isinstance(m, densekit.DenseLayer) and m.input_index is not None}
    x = inputs()
    y = model(x)
    prune_model(model, 0.0)
    assert torch.equal(model(x), y)
    prune_model(model, 0.3)
    for name, index in first.items():
        now = model.get_submodule(name).input_index
        if now is not None:
            assert set(now.tolist()) <= set(index.tolist())  # a subset of the block's channels it read


def _fused_against_reference(fast: densekit.DenseNet, dtype: torch.dtype, tol: float, batch: int = 6) -> None:
    """Outputs, input and parameter gradients and running statistics of ``fast`` (fused
    blocks) in train mode, then its eval outputs, against a copy on the reference path."""
    fast = fast.to(dtype)
    ref = copy.deepcopy(fast).set_fused(False)
    x = torch.randn(batch, 1, 12, 12, generator=torch.Generator().manual_seed(1)).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fast(xa), ref(xb)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(ya, yb, rtol=tol, atol=tol)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=tol, atol=tol)
    for (n, p), (_, q) in zip(fast.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol, msg=n)
    for (n, p), (_, q) in zip(fast.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), ref.eval()(x), rtol=tol, atol=tol)


@pytest.mark.parametrize("bn_size", [4, 0])
@pytest.mark.parametrize("dtype,tol,kernels", [(torch.float64, 1e-10, "torch"), (torch.float32, 1e-4, "torch"),
                                               (torch.float32, 1e-4, "native")])
def test_pruned_blocks_run_fused_with_the_reference_function(bn_size, dtype, tol, kernels):
    """Layers that read a subset of their block's channels, and bottlenecks narrower than
    bn_size * k, run on the fused path: the same function and gradients as the reference,
    with the native column gather and scatter or with torch's."""
    fast = small(bn_size=bn_size, fused=True)
    blocks = [m for m in fast.modules() if isinstance(m, densekit.DenseBlock)]
    prune_model(fast, 0.4)
    assert any(layer.input_index is not None for b in blocks for layer in b.values())
    assert all(b.output_index is not None for b in blocks)  # the transition and final norm pruned too
    assert all(supports_fused(b) for b in blocks)
    if kernels == "native" and not native.available():
        pytest.skip("no C compiler: the native kernels are not built")
    with native.disabled() if kernels == "torch" else contextlib.nullcontext():
        # 6 x 12 x 12 rows in the first block; 10 x 12 x 12 = 1,440 passes 1,024, where dgamma
        # comes from the weights (fused._SHORTCUT_MIN_ROWS)
        for batch in (6, 10):
            _fused_against_reference(copy.deepcopy(fast), dtype, tol, batch)


def test_width_only_pruning_runs_fused_too():
    """A bottleneck narrower than bn_size * k beside whole ones: the workspaces take the widest."""
    model = small(fused=True)
    block = model.features.denseblock1
    block.denselayer2.prune_(width=torch.arange(10))
    assert supports_fused(block)
    _fused_against_reference(model, torch.float64, 1e-10)


def test_a_batch_of_one_through_a_pruned_model():
    """A pruned block's reference path hands its transition an NCHW map; with a batch of one
    its (rows, channels) view has strided columns, which the native pass does not take: the
    transition must run its torch ops there, with the same result (predict on one image)."""
    model = small(fused=True).eval()
    prune_model(model, 0.3)
    plain = copy.deepcopy(model).set_fused(False)
    x = inputs()[:1]
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)


def test_pruned_block_outputs_under_bf16_autocast():
    """A pruned block hands its reader a bf16 gather of its buffer under autocast (the native
    kernels, or torch's gather without them). Against the float32 model the output stays within
    bf16's rounding, and the input gradient as close as torch's ops get it (in training mode
    batch norm's backward cancels much of it: about a quarter off in L2 either way, as for an
    unpruned model; in eval mode a few percent)."""
    model = small(fused=True)
    prune_model(model, 0.4)
    assert all(b.output_index is not None for b in model.modules() if isinstance(b, densekit.DenseBlock))
    x = inputs()
    g = torch.randn(x.shape[0], 5, generator=torch.Generator().manual_seed(3))

    def run(train: bool, bf16: bool, kernels: bool):
        m = copy.deepcopy(model).train(train)
        xi = x.clone().requires_grad_()
        with native.disabled() if not kernels else contextlib.nullcontext(), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = m(xi)
        y.float().backward(g)
        return y.float(), xi.grad

    for train in (True, False):
        want = run(train, False, True)
        (y_native, g_native), (y_ops, g_ops) = run(train, True, True), run(train, True, False)
        err = lambda got, exact: ((got - exact).norm() / exact.norm()).item()  # noqa: E731
        assert err(y_native, want[0]) < 0.01 and err(y_ops, want[0]) < 0.01
        assert err(g_native, want[1]) <= 1.2 * err(g_ops, want[1]) and err(g_native, want[1]) < (0.4 if train else 0.05)


def test_selection_from_parts_equals_the_concatenation_then_the_gather():
    """The pruned read of the ONNX export takes each part's channels (whole, a slice, a gather
    or none) instead of concatenating everything first: the same tensor and gradients."""
    from densekit.models.layers import _select_from_parts

    parts = [torch.randn(2, c, 3, 3, requires_grad=True) for c in (6, 4, 4, 4)]
    for keep in ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],  # all of every part
                 [2, 3, 4, 10, 11],  # a slice of the first, a slice of the second, none of the rest
                 [0, 5, 7, 9, 14, 15, 16, 17],  # gathers, then the whole last part
                 [17]):
        index = torch.tensor(keep)
        got = _select_from_parts(parts, index)
        want = torch.cat(parts, 1).index_select(1, index)
        assert torch.equal(got, want)
        g = torch.randn_like(want)
        grads = torch.autograd.grad((got * g).sum(), parts, allow_unused=True, materialize_grads=True)
        expected = torch.autograd.grad((want * g).sum(), parts)
        assert all(torch.equal(a, b) for a, b in zip(grads, expected))


def test_a_traced_pruned_model_reads_the_index_it_holds():
    """Outside the ONNX export a torch.jit trace of a pruned model keeps its indices as tensors
    of the graph: loading a state whose layers read other channels changes what it computes."""
    a = small().eval().set_fused(False)
    prune_model(a, 0.4)
    b = copy.deepcopy(a)
    with torch.no_grad():  # the same shapes, each pruned layer reading other channels
        for m in b.modules():
            if isinstance(m, densekit.DenseLayer) and m.input_index is not None:
                n = m.input_index.numel()
                m.input_index.copy_(torch.arange(m.in_channels)[-n:])
    x = inputs()
    with torch.no_grad():
        want = b(x)
        assert not torch.allclose(a(x), want)
        traced = torch.jit.trace(a, x)
        traced.load_state_dict(b.state_dict())
        torch.testing.assert_close(traced(x), want, rtol=0, atol=0)


def test_the_onnx_export_of_a_pruned_model_splits_each_map_once(tmp_path):
    """In an exported graph a pruned block splits the block's input and each layer's output at
    most once, into runs of channels with the same readers, and no reader gathers: each map is
    copied once for all the layers that read part of it, not once per layer, and never from a
    concatenation (docs/performance.md#pruning)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from densekit.export import export_onnx

    model = small().eval()
    prune_model(model, 0.4)
    path = tmp_path / "pruned.onnx"
    export_onnx(model, path, align=0)  # widths as they are; checked against PyTorch in onnxruntime
    graph = onnx.load(str(path)).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    splits = [node for node in graph.node if node.op_type == "Split"]
    assert not [node for node in graph.node if node.op_type == "Gather"]
    assert splits and all(made_by.get(node.input[0]) != "Concat" for node in splits)
    assert len({node.input[0] for node in splits}) == len(splits)


@pytest.mark.parametrize("bn_size", [4, 0])
def test_the_exports_split_reads_equal_the_reference_path(bn_size):
    """The export's reads of a pruned block (each map split once, each reader concatenating its
    runs) compute what the reference path does: here the block input is read whole by the first
    layer and in part by the next two, and the block returns a subset of its channels."""
    from densekit.models.layers import _read_plan

    torch.manual_seed(0)
    block = densekit.DenseBlock(6, 4, 3, bn_size=bn_size)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 1.0)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    layers = list(block.values())
    layers[1].prune_(torch.tensor([0, 1, 2, 6, 7, 8, 9]))
    layers[2].prune_(torch.tensor([1, 2, 3, 4, 5, 7, 8, 12]))
    block.prune_(torch.tensor([0, 3, 4, 5, 9, 10, 11, 14, 15, 16]))
    block.eval()
    h = torch.randn(5, 6, 7, 7, generator=torch.Generator().manual_seed(2))
    plan = _read_plan(block, h)
    assert plan.splits[0] == [1, 2, 3] and plan.pieces[0] == [(0, None)]  # map 0: split, and read whole
    assert plan.pieces[3][0] == (0, 0) and (1, None) not in plan.pieces[3]
    with torch.no_grad():
        assert torch.equal(block._forward_parts(h, plan), block.forward_plain(h))
