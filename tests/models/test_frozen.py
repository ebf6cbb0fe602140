"""optimize_for_inference: the same function as the model it copies, from constants kept."""

import copy
import io

import pytest
import torch

from densekit import DenseBlock, create_model
from densekit.models import frozen
from densekit.models.frozen import FrozenDenseBlock, optimize_for_inference
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
    assert len(blocks) == 3 and all(type(m) is not DenseBlock for m in fast.features.children())
    assert all(b.output_index is not None for b in blocks)  # the pruned outputs are selected too
    x = torch.randn(batch, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = model(x), fast(x)
    assert got.dtype == want.dtype
    # both in bf16 with BN folded in float32: within a few bf16 steps of each other
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("spatial_dims,size", [(1, (20,)), (2, (9, 7)), (3, (5, 6, 4))])
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


def test_a_block_right_under_the_root_is_replaced_in_place():
    torch.manual_seed(0)
    model = torch.nn.Sequential(DenseBlock(6, 4, 2, fused=True), torch.nn.Conv2d(14, 3, 1)).eval()
    fast = optimize_for_inference(model)
    assert isinstance(fast[0], FrozenDenseBlock) and isinstance(fast[1], torch.nn.Conv2d)
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_blocks_share_one_workspace_and_never_overwrite_an_output_still_held(monkeypatch):
    # the blocks' buffers live in one workspace kept between calls, reused where nothing else
    # uses it: an output the caller holds (or a view of it) keeps its memory. Unpruned, a
    # block returns its buffer itself (a pruned one, a selection of its channels). Here even
    # small buffers run in the workspace.
    monkeypatch.setattr(frozen, "_WORKSPACE_MIN_BYTES", 0)
    torch.manual_seed(1)
    model = create_model("densenet_bc_40_k12_s2", num_classes=10, in_chans=1)
    randomize_norms(model)
    model.eval()
    fast = optimize_for_inference(model)
    blocks = [m for m in fast.modules() if isinstance(m, FrozenDenseBlock)]
    others = [m for m in copy.deepcopy(optimize_for_inference(_pruned_model())).modules()
              if isinstance(m, FrozenDenseBlock)]
    assert len(blocks) == 3 and len({id(b._workspace) for b in blocks + others}) == 1  # one per process
    x, other = torch.randn(20, 1, 28, 28), torch.randn(20, 1, 28, 28)
    with torch.no_grad():
        want = model(x)
        fast(x)
        key = (torch.float32, torch.device("cpu"))
        memory = blocks[0]._workspace._flats[key].data_ptr()
        torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-5)
        assert blocks[0]._workspace._flats[key].data_ptr() == memory  # reused, not allocated again
        kept = []
        hook = blocks[1].register_forward_hook(lambda module, args, out: kept.append(out[:, :5]))
        fast(x)
        hook.remove()
        held = kept[0].clone()
        fast(other)  # the held view's memory is not the workspace's any more
        torch.testing.assert_close(kept[0], held, rtol=0, atol=0)
        block_out = blocks[0](torch.randn(20, 24, 14, 14))
        before = block_out.clone()
        fast(other)
        torch.testing.assert_close(block_out, before, rtol=0, atol=0)


def test_one_copy_run_from_two_threads(monkeypatch):
    import threading

    monkeypatch.setattr(frozen, "_WORKSPACE_MIN_BYTES", 0)
    model = _pruned_model()
    fast = optimize_for_inference(model)
    inputs = [torch.randn(20, 1, 28, 28) for _ in range(2)]
    with torch.no_grad():
        wants = [model(x) for x in inputs]
    failures = []

    def run(x, want):
        with torch.no_grad():
            for _ in range(5):
                if not torch.allclose(fast(x), want, rtol=1e-4, atol=1e-4):
                    failures.append(1)

    threads = [threading.Thread(target=run, args=pair) for pair in zip(inputs, wants)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_workspace_reuses_memory_only_when_nothing_holds_it(monkeypatch):
    cpu = torch.device("cpu")
    ours = frozen.Workspace()
    ptr = ours.take(100, torch.float32, cpu).data_ptr()
    assert ours.take(100, torch.float32, cpu).data_ptr() == ptr  # let go: reused
    held = ours.take(100, torch.float32, cpu)
    assert ours.take(100, torch.float32, cpu).data_ptr() != held.data_ptr()
    assert ours.take(100, torch.bfloat16, cpu).dtype == torch.bfloat16  # its own memory per dtype
    # where torch cannot count a storage's uses, nothing is reused
    monkeypatch.setattr(frozen, "_USE_BASELINE", None)
    ptr = ours.take(100, torch.float32, cpu).data_ptr()
    assert ours.take(100, torch.float32, cpu).data_ptr() != ptr


def test_small_blocks_run_in_fresh_buffers():
    # below the threshold the allocator's free lists serve them (see frozen._WORKSPACE_MIN_BYTES)
    fast = optimize_for_inference(_pruned_model())
    workspace = frozen.shared_workspace()
    before = {key: flat.data_ptr() for key, flat in workspace._flats.items()}
    with torch.no_grad():
        fast(torch.randn(20, 1, 28, 28))
    assert {key: flat.data_ptr() for key, flat in workspace._flats.items()} == before
