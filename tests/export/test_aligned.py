"""The ONNX export's channel-aligned copy (densekit/export_aligned.py): the same function as
the model, every count a multiple of 16, and in onnxruntime a graph whose every layer stays in
the blocked layout of its CPU convolutions."""

from __future__ import annotations

import copy
import json
import platform
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import densekit
from densekit.export import export_onnx
from densekit.export_aligned import aligned_copy
from densekit.models import set_fused
from densekit.prune import prune_model


def model_of(seed: int = 0, **kwargs) -> densekit.DenseNet:
    """A small DenseNet with batch norms away from identity, in eval mode."""
    torch.manual_seed(seed)
    model = densekit.DenseNet(**{"growth_rate": 12, "block_config": (3, 3), "num_classes": 5, **kwargs})
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


def pruned(seed: int = 0) -> densekit.DenseNet:
    model = model_of(seed, stem="cifar", block_config=(4, 4))
    prune_model(model, 0.4)
    return model.eval()


def plain(model: nn.Module) -> nn.Module:
    out = copy.deepcopy(model)
    set_fused(out, False)
    return out


MODELS = {
    "imagenet-stem": lambda: model_of(stem="imagenet"),
    "resnet-stem-pooled-features": lambda: model_of(stem="resnet", num_classes=0),
    "no-bottleneck-max-pool-k10": lambda: model_of(stem="cifar", growth_rate=10, bn_size=0, global_pool="max",
                                                   block_config=(2, 2, 2)),
    "unpooled-maps": lambda: model_of(stem="cifar", num_classes=0, global_pool=""),
    "pruned": pruned,
}


@pytest.mark.parametrize("key", MODELS)
def test_the_aligned_copy_computes_the_models_function(key):
    model = MODELS[key]()
    copy_ = aligned_copy(plain(model))
    assert copy_ is not None
    widths = [m.out_channels for m in copy_.modules() if isinstance(m, nn.Conv2d)]
    widths += [m.num_features for m in copy_.modules() if isinstance(m, nn.BatchNorm2d)]
    assert widths and all(w % 16 == 0 for w in widths)
    assert not any(m.weight.shape[1] % 16 for m in copy_.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 3)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(x), copy_(x)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_aligned_unpruned_and_other_models_are_traced_as_they_are(tmp_path):
    """Nothing to gain where every count is already a multiple (densenet121's 32, 64, 128) and
    no layer reads a subset; 1D and feature-list models are exported as they are."""
    aligned = model_of(growth_rate=16, num_init_features=32, stem="imagenet", block_config=(2, 2))
    assert aligned_copy(plain(aligned)) is None
    assert aligned_copy(plain(model_of(spatial_dims=1, stem="cifar"))) is None
    assert aligned_copy(plain(model_of(features_only=True))) is None
    assert aligned_copy(plain(model_of()), 0) is None
    report = export_onnx(aligned, tmp_path / "a.onnx", input_size=(3, 32, 32))
    assert report.aligned is None
    report = export_onnx(model_of(), tmp_path / "b.onnx", input_size=(3, 32, 32))
    assert report.aligned == 16 and report.check.max_rel_diff <= 1e-5


def optimized_ops(path, tmp_path) -> dict[str, int]:
    """The op counts of the graph onnxruntime runs (its CPU provider, all optimizations)."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops: dict[str, int] = {}
    for node in onnx.load(opts.optimized_model_filepath).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="onnxruntime's blocked (NCHWc) convolutions are built for x86 CPUs")
@pytest.mark.parametrize("key", ["imagenet-stem", "pruned"])
def test_onnxruntime_keeps_every_layer_of_the_aligned_export_blocked(key, tmp_path):
    """As the widths are: reorders between layouts around the convolutions, and batch norms
    and ReLUs of their own (a pruned model's reads too). Aligned: one reorder at the end and
    every batch norm and ReLU inside a blocked convolution."""
    model = MODELS[key]()
    for align in (0, 16):
        report = export_onnx(model, tmp_path / f"{align}.onnx", input_size=(3, 32, 32), align=align)
        assert report.check.max_rel_diff <= 1e-5
        ops = optimized_ops(tmp_path / f"{align}.onnx", tmp_path)
        if align:
            assert report.aligned == 16
            assert ops.get("ReorderInput", 0) == 0 and ops.get("ReorderOutput", 0) == 1
            assert not {"BatchNormalization", "Relu", "Split", "Gather"} & set(ops)
        else:
            assert report.aligned is None
            assert ops["ReorderInput"] >= 3 and ops["BatchNormalization"] >= 3


def test_the_cli_pads_by_default_and_align_0_keeps_the_widths(run_dir, tmp_path, cli):
    run = shutil.copytree(run_dir, tmp_path / "run")
    rc, out, err = cli("export", run, "--json", "--out", tmp_path / "a.onnx")
    assert rc == 0, err
    padded = json.loads(out)
    rc, out, err = cli("export", run, "--json", "--align", "0", "--out", tmp_path / "b.onnx")
    assert rc == 0, err
    as_is = json.loads(out)
    assert padded["aligned"] == 16 and as_is["aligned"] is None
    assert padded["check"]["max_rel_diff"] <= 1e-5 and as_is["check"]["max_rel_diff"] <= 1e-5
    x = np.random.default_rng(0).standard_normal((4, 1, 16, 16)).astype(np.float32)
    a, b = (ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
            for f in ("a.onnx", "b.onnx"))
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
