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
import densekit.export
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


def pruned(seed: int = 0, unit: str = "channel", **kwargs) -> densekit.DenseNet:
    model = model_of(seed, **{"stem": "cifar", "block_config": (4, 4), **kwargs})
    prune_model(model, 0.4, unit=unit)
    assert any(getattr(m, "input_index", None) is not None for m in model.modules())
    assert any(getattr(m, "output_index", None) is not None for m in model.modules())
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
    "pruned-no-bottleneck-three-blocks-max-pool": lambda: pruned(bn_size=0, block_config=(3, 3, 3),
                                                                 global_pool="max"),
    "pruned-by-map": lambda: pruned(unit="map"),
    "growth-per-block": lambda: model_of(stem="cifar", growth_rate=[12, 20, 8], block_config=(2, 2, 2)),
}


def swapped_relu():
    model = model_of(stem="cifar")
    model.features.denseblock1.denselayer2.relu1 = nn.GELU()
    return model


def reflect_padding():
    model = model_of(stem="cifar")
    model.features.conv0.padding_mode = "reflect"
    return model


def no_bias_head():
    model = model_of(stem="cifar")
    model.classifier = nn.Linear(model.num_features, 5, bias=False)
    return model.eval()


class Head(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


# Not the stock modules: exported as they are, never as a copy computing another function.
OTHERS = {
    "swapped-activation": swapped_relu,
    "reflect-padding": reflect_padding,
    "linear-subclass-head": lambda: setattr(m := model_of(stem="cifar"), "classifier", Head(m.num_features, 5)) or m,
    "no-stem-norm": lambda: setattr((m := model_of(stem="imagenet")).features, "norm0", nn.Identity()) or m,
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


def test_pruning_by_map_lets_the_copy_skip_maps():
    """Pruned per channel, each layer still touches nearly every map and reads it whole in the
    copy; pruned per map by the same amount, the copy reads fewer maps and costs fewer MACs."""
    from densekit.models.profile import count_macs

    copies = {unit: aligned_copy(plain(pruned(unit=unit))) for unit in ("channel", "map")}
    reads = {unit: sum(len(layer.maps) for stage in c.stages if hasattr(stage, "layers") for layer in stage.layers)
             for unit, c in copies.items()}
    # two blocks of four layers, where layer i reads i + 1 maps: 20 in all; per channel every
    # layer of this seeded model still touches every map
    assert reads == {"channel": 20, "map": 12}
    macs = {unit: count_macs(c, (3, 32, 32)) for unit, c in copies.items()}
    assert macs["map"] < 0.97 * macs["channel"]


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


@pytest.mark.parametrize("key", OTHERS)
def test_models_of_other_modules_are_exported_as_they_are(key, tmp_path):
    model = OTHERS[key]().eval()
    assert aligned_copy(plain(model)) is None
    report = export_onnx(model, tmp_path / "m.onnx", input_size=(3, 32, 32))
    assert report.aligned is None and report.check.max_rel_diff <= 1e-5
    assert "channel_alignment" not in densekit.export.read_metadata(tmp_path / "m.onnx")


def test_a_head_without_bias_is_padded_too(tmp_path):
    model = no_bias_head()
    report = export_onnx(model, tmp_path / "m.onnx", input_size=(3, 32, 32))
    assert report.aligned == 16 and report.check.max_rel_diff <= 1e-5


@pytest.mark.parametrize("key", ["pruned", "growth-per-block"])
def test_the_onnx_file_holds_the_padded_widths(key, tmp_path):
    """Whatever the CPU: every convolution of the file but the stem's reads and writes a
    multiple of 16 channels, and the file says so; with align=0 the model's own widths."""
    model = MODELS[key]()
    for align in (16, 0):
        path = tmp_path / f"{align}.onnx"
        export_onnx(model, path, input_size=(3, 32, 32), align=align, check=False)
        graph = onnx.load(str(path)).graph
        weights = {t.name: tuple(t.dims) for t in graph.initializer}
        convs = [weights[node.input[1]] for node in graph.node if node.op_type == "Conv"]
        assert len(convs) > 10
        aligned = all(w[0] % 16 == 0 and (w[1] % 16 == 0 or w[1] == 3) for w in convs)
        assert aligned == bool(align)
        assert densekit.export.read_metadata(path).get("channel_alignment") == (align or None)


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
            assert ops.get("ReorderInput", 0) >= 3 and ops.get("BatchNormalization", 0) >= 3


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
