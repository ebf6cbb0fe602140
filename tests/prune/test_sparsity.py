"""Sparsity training (network slimming's L1 penalty on the batch-norm scales that pruning
ranks channels by): the step's subgradient, and `densekit train --sparsity` end to end."""

from __future__ import annotations

import json

import pytest
import torch

import densekit
from densekit.models.layers import prunable_norms
from densekit.train.runtime import select_runtime
from densekit.train.step import TrainStep
from densekit.rundir import RunDir

from testkit import TINY as _TINY, write_mnist

TINY = [*_TINY, "--model-arg", "block_config=(2,2)"]
RUN = ["--dataset", "mnist", "--epochs", "2", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def writers_data(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("sparsity") / "mnist")


def _model() -> densekit.DenseNet:
    torch.manual_seed(0)
    model = densekit.DenseNet(4, (2, 2), num_init_features=6, bn_size=2, num_classes=3, in_chans=1, stem="cifar")
    with torch.no_grad():
        for _, _, bn in prunable_norms(model):
            bn.weight.uniform_(-1, 1)  # both signs, as trained scales can have
    return model


def test_the_step_adds_lambda_times_the_sign_of_each_prunable_scale():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scales = [bn.weight for _, _, bn in prunable_norms(model)]
    assert len(scales) == 10  # 4 layers: inputs and width; 2 blocks: the transition's and final norm
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    zero = lambda logits, y: logits.sum() * 0.0  # noqa: E731  every gradient 0 but the penalty's
    step = TrainStep(model, opt, zero, select_runtime("cpu"), sparsity=(scales, 0.125))
    step(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64))
    ids = {id(p) for p in scales}
    for n, p in model.named_parameters():
        expected = before[n] - 0.125 * torch.sign(before[n]) if id(p) in ids else before[n]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=0, msg=n)
        assert not p.grad.requires_grad and p.grad.grad_fn is None, n  # no autograd history builds up


def test_train_with_sparsity_shrinks_the_scales_and_records_lambda(cli, writers_data, tmp_path, caplog):
    caplog.set_level("INFO")
    data = writers_data
    runs = {}
    for lam in ("0", "0.01"):
        out = tmp_path / f"s{lam}"
        rc, _, err = cli("train", *TINY, *RUN, "--data-dir", data, "--out", out, "--sparsity", lam, "--keep", "last")
        assert rc == 0, err
        assert json.loads((out / "summary.json").read_text())["sparsity"] == float(lam)
        model = RunDir(out).load_model()
        runs[lam] = torch.cat([bn.weight.detach().abs() for _, _, bn in prunable_norms(model)]).mean()
    assert "sparsity training: L1 penalty 0.01" in caplog.text
    assert runs["0.01"] < runs["0"] - 0.01  # 16 steps of lr-scaled 0.01 pulls: a clear drop
    # another lambda is another run
    rc, _, err = cli("train", *TINY, *RUN, "--data-dir", data, "--out", tmp_path / "s0.01", "--sparsity", "0.02",
                     "--resume")
    assert rc == 2 and "sparsity" in err


@pytest.mark.parametrize("extra,message", [
    (["--recipe", "finetune"], "needs an SGD recipe"),  # AdamW would scale the penalty away
    (["--pretrained", "RUN", "--freeze-backbone"], "--freeze-backbone"),
])
def test_sparsity_where_it_cannot_act_is_refused(cli, writers_data, tmp_path, extra, message):
    source = tmp_path / "src"
    if "RUN" in extra:
        rc, _, err = cli("train", *TINY, *RUN, "--data-dir", writers_data, "--out", source, "--epochs", "1")
        assert rc == 0, err
    extra = [str(source) if a == "RUN" else a for a in extra]
    rc, _, err = cli("train", *TINY, *RUN, "--data-dir", writers_data, "--out", tmp_path / "r", "--sparsity",
                     "1e-4", *extra)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("lam", ["1", "-0.1", "nan"])
def test_a_bad_lambda_exits_2(cli, writers_data, tmp_path, lam):
    rc, _, err = cli("train", *TINY, *RUN, "--data-dir", writers_data, "--out", tmp_path / "r", "--sparsity", lam)
    assert rc == 2 and "--sparsity" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
