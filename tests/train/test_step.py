"""The training step: eager on any device, replayed from a CUDA graph on CUDA.

On the CPU only the eager step and the argument checks can run; the CUDA test checks that
graph replays train the same weights as eager steps (same schedule, a partial batch in the
middle, which runs eagerly) and is skipped where no GPU is present.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from densekit import create_model
from densekit.errors import UserError
from densekit.train.recipes import FAST, build_optimizer, build_scheduler
from densekit.train.runtime import select_runtime
from densekit.train.step import TrainStep


def _model(in_chans=1):
    return create_model("densenet_bc_100_k12", block_config=(2, 2), num_classes=5, in_chans=in_chans)


def _batches(n, batch=8, size=12, device="cpu", seed=0, chans=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, chans, size, size, generator=g).to(device),
             torch.randint(0, 5, (batch,), generator=g).to(device)) for _ in range(n)]


def test_eager_step_is_the_textbook_loop():
    torch.manual_seed(0)
    rt = select_runtime("cpu", precision="fp32")  # the loop below runs in float32
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = build_optimizer(a, FAST, 0.1), build_optimizer(b, FAST, 0.1)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    step = TrainStep(a, opt_a, criterion, rt)
    for x, y in _batches(3):
        loss, correct = step(x, y)
        opt_b.zero_grad(set_to_none=True)
        logits = b(x)
        ref = criterion(logits, y)
        ref.backward()
        opt_b.step()
        assert loss.item() == ref.item()
        assert correct.item() == (logits.argmax(1) == y).sum().item()
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(p, q)


def test_cuda_graph_needs_cuda_and_fused_sgd():
    rt = select_runtime("cpu")
    model = _model()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        TrainStep(model, build_optimizer(model, FAST, 0.1), nn.CrossEntropyLoss(), rt, cuda_graph=True)
    with pytest.raises(ValueError, match="warmup_steps >= 1"):
        TrainStep(model, build_optimizer(model, FAST, 0.1), nn.CrossEntropyLoss(), rt, cuda_graph=True,
                  warmup_steps=0)
    with pytest.raises(UserError, match="CUDA graphs need a CUDA device"):
        select_runtime("cpu", cuda_graph=True)
    assert not select_runtime("cpu").cuda_graph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_train_like_eager_steps():
    torch.manual_seed(0)
    eager_rt = select_runtime("cuda", cuda_graph=False, deterministic=True)
    graph_rt = select_runtime("cuda", cuda_graph=True, deterministic=True)
    assert graph_rt.cuda_graph
    models, steps, schedulers = [], [], []
    base = _model(in_chans=3)  # 3 channels: channels-last differs from NCHW
    batches = _batches(9, device="cuda", chans=3)
    batches.insert(6, _batches(1, batch=5, device="cuda", seed=1, chans=3)[0])  # another shape: eager
    for rt in (eager_rt, graph_rt):
        model = rt.prepare(copy.deepcopy(base))
        opt = build_optimizer(model, FAST, 0.1, fused=True)
        sched = build_scheduler(opt, FAST, steps_per_epoch=5, total_steps=len(batches))
        models.append(model)
        steps.append(TrainStep(model, opt, nn.CrossEntropyLoss(), rt, cuda_graph=rt.cuda_graph, warmup_steps=2))
        schedulers.append(sched)
    with eager_rt.activated():
        for x, y in batches:
            losses = []
            for step, sched in zip(steps, schedulers):
                xs = x.contiguous(memory_format=torch.channels_last)
                losses.append(step(xs, y)[0].item())
                sched.step()
            assert losses[1] == pytest.approx(losses[0], rel=1e-3, abs=1e-3)
    assert steps[1].captured and not steps[0].captured
    for p, q in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        torch.testing.assert_close(q.float(), p.float(), rtol=2e-2, atol=2e-3)
