"""The pieces under the CLI: recipes' schedules, the runtime choice, evaluation, loading."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from densekit.data import Dataset, Split
from densekit.errors import UserError
from densekit.models import DenseNet
from densekit.rundir import ModelInfo, Preprocessing, RunDir
from densekit.train.engine import EvalResult, eval_loader, evaluate
from densekit.train.recipes import FAST, PAPER, augment_for, lr_factor, param_groups
from densekit.train.runtime import bf16_preferred, select_runtime


def test_paper_schedule_divides_by_ten_at_half_and_three_quarters():
    # 4 epochs of 10 steps: lr / 10 from epoch 2 (50%), / 100 from epoch 3 (75%)
    factors = [lr_factor(PAPER, s, 10, 40) for s in range(40)]
    assert factors[:20] == [1.0] * 20
    assert factors[20:30] == pytest.approx([0.1] * 10) and factors[30:] == pytest.approx([0.01] * 10)
    assert [lr_factor(PAPER, s * 100, 100, 30000) for s in (149, 150, 224, 225)] == pytest.approx([1, 0.1, 0.1, 0.01])


def test_fast_schedule_warms_up_then_anneals_to_zero():
    total = 100
    factors = [lr_factor(FAST, s, 10, total) for s in range(total)]
    warm = int(FAST.warmup_fraction * total)
    assert factors[0] == pytest.approx(1 / warm) and factors[warm - 1] == 1.0 and factors[warm] == 1.0
    assert all(a > b for a, b in zip(factors[warm:-1], factors[warm + 1:]))  # strictly decreasing
    assert factors[-1] == pytest.approx(FAST.final_lr_fraction, abs=1e-12)
    assert max(factors) == 1.0 and min(factors) >= 0


def test_fast_recipe_does_not_decay_norms_and_biases():
    model = DenseNet(growth_rate=4, block_config=(1, 1), stem="cifar", num_classes=3, in_chans=1)
    decay, no_decay = param_groups(model, FAST)
    assert decay["weight_decay"] == FAST.weight_decay and no_decay["weight_decay"] == 0
    assert {id(p) for p in no_decay["params"]} == {id(p) for n, p in model.named_parameters()
                                                   if "norm" in n or n.endswith("bias")}
    assert len(param_groups(model, PAPER)) == 1  # the paper decays everything


def test_no_flips_for_digits():
    assert augment_for(PAPER, "cifar10").hflip and not augment_for(PAPER, "mnist").hflip
    assert augment_for(PAPER, "mnist").crop_padding == 4


def test_runtime_choice():
    rt = select_runtime("cpu")
    assert rt.device == torch.device("cpu") and not rt.channels_last
    assert rt.precision == ("bf16" if bf16_preferred(rt.device) else "fp32")
    assert select_runtime("cpu", precision="fp32").precision == "fp32"
    assert select_runtime("cpu", channels_last=True).channels_last
    with pytest.raises(UserError, match="device must be one of auto, cpu, cuda"):
        select_runtime("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="sees no CUDA device"):
            select_runtime("cuda")
        assert select_runtime("auto").device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runtime_on_cuda_uses_bf16_and_channels_last():
    rt = select_runtime("auto")
    assert rt.device.type == "cuda" and rt.precision == "bf16" and rt.channels_last
    model = rt.prepare(DenseNet(growth_rate=4, block_config=(1, 1), stem="cifar", num_classes=3))
    assert model.features.conv0.weight.is_contiguous(memory_format=torch.channels_last)


def test_activated_restores_global_settings():
    before = torch.are_deterministic_algorithms_enabled()
    with select_runtime("cpu", deterministic=True).activated():
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before


def test_evaluate_counts_and_per_class():
    torch.manual_seed(0)
    model = DenseNet(growth_rate=4, block_config=(1, 1), stem="cifar", num_classes=3, in_chans=1).train()
    split = Split(images=torch.randint(0, 256, (23, 1, 8, 8), dtype=torch.uint8),
                  labels=torch.tensor([0] * 10 + [1] * 13))
    rt = select_runtime("cpu", precision="fp32")  # as the logits below
    result = evaluate(model, eval_loader(split, (0.5,), (0.25,), rt, batch_size=5), rt, 3)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        x = (split.images.float() / 255 - 0.5) / 0.25
        logits = model(x)
    pred = logits.argmax(1)
    assert result.total == 23 and result.correct == int((pred == split.labels).sum())
    assert result.loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, split.labels)), rel=1e-5)
    assert result.confusion.sum(axis=1).tolist() == [10, 13, 0]
    per_class = result.per_class
    assert per_class[2] is None
    assert per_class[0] == float((pred[:10] == 0).float().mean())


def test_eval_result_of_nothing_is_nan():
    r = EvalResult.from_confusion(math.nan, np.zeros((2, 2), dtype=np.int64))
    assert math.isnan(r.accuracy) and r.per_class == [None, None]


def test_load_run_model_rejects_bad_run_dirs(tmp_path):
    with pytest.raises(UserError, match="run directory not found"):
        RunDir(tmp_path / "nope").load_model()
    with pytest.raises(UserError, match="not a densekit run directory"):
        RunDir(tmp_path).load_model()
    model = DenseNet(growth_rate=4, block_config=(1, 1), stem="cifar", num_classes=2, in_chans=1)
    ds = Dataset(name="mnist", train=None, val=None, test=None, classes=["a", "b"], in_chans=1, image_size=(8, 8),
                 mean=(0.5,), std=(0.2,))
    kwargs = dict(growth_rate=4, block_config=[1, 1], stem="cifar", num_classes=2, in_chans=1)
    run = RunDir(tmp_path)
    run.write_info(ModelInfo("tiny", {}, kwargs, ds.name, None, tuple(ds.classes),
                             Preprocessing(ds.in_chans, ds.image_size, ds.mean, ds.std)))
    run.save_weights(model)
    loaded = RunDir(tmp_path).load_model()
    assert loaded.pretrained_cfg["classes"] == ["a", "b"] and loaded.pretrained_cfg["input_size"] == (1, 8, 8)
    # a weights file that does not fit the description is refused, not half-loaded
    other = DenseNet(growth_rate=4, block_config=(1, 1), stem="cifar", num_classes=3, in_chans=1)
    run.save_weights(other)
    with pytest.raises(UserError, match="does not match model.json"):
        RunDir(tmp_path).load_model()
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read safetensors"):
        RunDir(tmp_path).load_model()


def test_gpu_presets_fit_their_goals():
    # The 60-second preset's goal needs a model under 1M parameters; the default model on
    # Fashion-MNIST (1 channel, 10 classes) is the 768K DenseNet-BC of the benchmark table.
    from densekit import create_model
    from densekit.train.recipes import LONG, SPRINT, get_recipe
    from densekit.train.config import DEFAULT_MODEL

    model = create_model(DEFAULT_MODEL, in_chans=1, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 768_730
    assert get_recipe("sprint") is SPRINT and get_recipe("long") is LONG
    assert LONG.epochs > SPRINT.epochs and augment_for(LONG, "fashion-mnist").erase == 10
    assert augment_for(SPRINT, "fashion-mnist").erase == 0


def test_resume_keeps_this_process_choice_of_sgd_kernel(tmp_path):
    # A run begun eagerly (foreach SGD) and resumed where the step is graphed needs fused SGD:
    # the optimizer's state comes from the checkpoint, how it runs does not.
    from densekit.train.recipes import build_optimizer, build_scheduler

    model = DenseNet(growth_rate=4, block_config=(1, 1), stem="cifar", num_classes=3, in_chans=1)
    eager = build_optimizer(model, FAST, 0.1)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    eager.step()
    run = RunDir(tmp_path)
    config = dict(model="densenet_bc_100_k12", model_args={}, dataset="mnist", data_dir=None, image_size=None,
                  recipe="fast", epochs=2, batch_size=2, lr=0.1, seed=0, train_limit=None, init=None,
                  deterministic=False, save_every=200, val_fraction=0.1, keep="best", patience=None, workers=None,
                  skip_bad_images=False)
    meta = dict(config=config, data=dict(train_images=8, val_images=1, test_images=2, classes=["a", "b", "c"],
                                         image_size=[8, 8], in_chans=1),
                epoch=0, step_in_epoch=0, global_step=0, steps_per_epoch=4, total_steps=8,
                stats=dict(loss_sum=0.0, correct=0, seen=0, seconds=0.0, lr=0.1, data_seconds=0.0), history=[],
                train_seconds=0.0, data_seconds=0.0,
                best_epoch=0, stopped_early=False)
    run.save_resume(model, eager, build_scheduler(eager, FAST, 4, 8), {}, meta)
    fused = build_optimizer(model, FAST, 0.1, fused=True)
    run.load_resume(model, fused, build_scheduler(fused, FAST, 4, 8))
    assert all(g["fused"] for g in fused.param_groups)
    assert all(torch.equal(fused.state[p]["momentum_buffer"], eager.state[p]["momentum_buffer"])
               for p in model.parameters())


def test_the_kept_epoch_is_the_best_score_with_ties_to_the_lower_loss():
    from densekit.train.trainer import improves

    best = dict(val_acc=0.9, val_loss=0.5)
    assert improves(0.92, 0.9, best, "val_acc")            # a higher accuracy wins whatever the loss
    assert not improves(0.88, 0.1, best, "val_acc")
    assert improves(0.9, 0.4, best, "val_acc")             # a tie goes to the lower loss ...
    assert not improves(0.9, 0.5, best, "val_acc")         # ... and to the earlier epoch when that ties too
    assert not improves(math.nan, 0.1, best, "val_acc")    # no score never wins
    assert improves(0.5, 1.0, dict(val_auroc=math.nan, val_loss=0.1), "val_auroc")  # over no score
    assert improves(0.5, 1.0, None, "val_acc")
    assert improves(0.9, 0.4, dict(val_acc=0.9, val_loss=None), "val_acc")  # a loss stored as null (NaN)
    assert not improves(0.9, math.nan, best, "val_acc")
