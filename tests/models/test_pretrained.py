"""Pretrained weights: torchvision and timm files, run directories, the hub cache, and refusals.

Most files come from a tiny torchvision DenseNet (four blocks of one layer, k=8), built by
``densenet121`` with ``model_args`` to match; one test loads a whole densenet121."""

import argparse
import re

import pytest
import safetensors.torch
import torch
import torchvision

from densekit.checks import ArgumentError
from densekit.models import DenseNet, create_model
from densekit.models.pretrained import IMAGENET_PREPROCESSING, build_pretrained, infer_model, read_weights
from densekit.prune import prune_model
from densekit.rundir import ModelInfo, Preprocessing, RunDir, pruned_structure
from testkit import one_thread  # noqa: F401

TINY = dict(growth_rate=8, block_config=(1, 1, 1, 1), num_init_features=8)
TINY_ARGS = dict(model="densenet121", model_args=TINY)


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Batch-norm weights and statistics away from their defaults, so that eval logits test them."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def tv():
    torch.manual_seed(0)
    return randomized(torchvision.models.DenseNet(**TINY))


def legacy(state: dict) -> dict:
    """torchvision's names before 0.3 ("norm.1"), without num_batches_tracked (PyTorch < 0.4.1)."""
    return {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v
            for k, v in state.items() if not k.endswith("num_batches_tracked")}


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def refusal(source) -> str:
    with pytest.raises(ArgumentError) as e:
        read_weights(source)
    assert e.value.template.startswith("{pretrained} ") and "\n" not in str(e.value)
    return str(e.value)


def test_published_densenet121_file_gives_torchvision_logits(tmp_path):
    torch.manual_seed(0)
    ref = randomized(torchvision.models.densenet121())
    path = tmp_path / "densenet121-a639ec97.pth"
    torch.save(legacy(ref.state_dict()), path, _use_new_zipfile_serialization=False)  # as published in 2017
    weights = read_weights(path)
    assert (weights.kind, weights.model, weights.model_kwargs, weights.classes) == \
        ("torchvision", "densenet121", None, None)
    assert weights.preprocessing == IMAGENET_PREPROCESSING
    assert "features.denseblock1.denselayer1.norm1.weight" in weights.state_dict
    model, kwargs, report = build_pretrained(weights, num_classes=1000, in_chans=3)
    assert kwargs["block_config"] == [6, 12, 24, 16] and kwargs["fused"] is True
    assert report.new == [] and len(report.loaded) == len(model.state_dict()) == 727
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(logits(model, x), logits(ref, x), atol=1e-5, rtol=1e-4)


def test_new_head_for_other_classes(tmp_path, tv):
    torch.save(tv.state_dict(), tmp_path / "w.pth")
    model, kwargs, report = build_pretrained(read_weights(tmp_path / "w.pth"), 7, 3, **TINY_ARGS)
    assert report.new == ["classifier.weight", "classifier.bias"] and report.adapted == []
    assert report.summary() == "loaded 77 tensors, 2 new (classifier.weight, classifier.bias)"
    assert model.classifier.weight.shape == (7, 16) and not model.classifier.bias.any()
    theirs = tv.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(value, theirs[key]), key
    assert kwargs["num_classes"] == 7 and kwargs["growth_rate"] == 8 and kwargs["block_config"] == [1, 1, 1, 1]


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_training_checkpoint_is_unwrapped(tmp_path, tv, wrapper):
    # timm's (state_dict) and torchvision's references' (model) checkpoints, saved from DataParallel
    state = {f"module.{k}": v for k, v in tv.state_dict().items()}
    torch.save({"epoch": 3, wrapper: state, "args": argparse.Namespace(lr=0.1)}, tmp_path / "c.pt")
    model, _, report = build_pretrained(read_weights(tmp_path / "c.pt"), 1000, 3, **TINY_ARGS)
    x = torch.randn(1, 3, 64, 64)
    assert report.new == [] and torch.allclose(logits(model, x), logits(tv, x), atol=1e-5)


def test_timm_safetensors(tmp_path, tv):
    # timm's DenseNet keeps torchvision's names (its BatchNormAct2d subclasses BatchNorm2d)
    state = {k: v.contiguous() for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    weights = read_weights(tmp_path / "model.safetensors")
    assert weights.kind == "timm" and weights.model is None  # no registered model is this tiny
    model, _, _ = build_pretrained(weights, 1000, 3, **TINY_ARGS)
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(logits(model, x), logits(tv, x), atol=1e-5)


def write_run(path, model: DenseNet, kwargs: dict, classes=("a", "b", "c")) -> RunDir:
    info = ModelInfo("densenet_bc_100_k12", {}, kwargs, "mnist", None, classes,
                     Preprocessing(1, (16, 16), (0.3,), (0.25,)), pruned=pruned_structure(model))
    return RunDir.create(path, model, info, {})


@pytest.mark.parametrize("pruned", [False, True])
def test_run_directory(tmp_path, pruned):
    torch.manual_seed(0)
    kwargs = dict(growth_rate=4, block_config=[2, 2], num_init_features=4, stem="cifar", num_classes=3, in_chans=1)
    net = randomized(DenseNet(**kwargs))
    if pruned:
        prune_model(net, 0.3)
        assert pruned_structure(net)
    run = write_run(tmp_path / "run", net, kwargs)
    weights = read_weights(run.path)
    assert (weights.kind, weights.model, weights.model_kwargs, weights.classes) == \
        ("densekit", "densenet_bc_100_k12", kwargs, ("a", "b", "c"))
    assert weights.preprocessing == dict(in_chans=1, image_size=(16, 16), mean=(0.3,), std=(0.25,), crop_pct=None)
    x = torch.randn(2, 1, 16, 16)
    model, got, report = build_pretrained(weights, 3, 1, classes=["a", "b", "c"])
    assert got == kwargs and report.new == [] and pruned_structure(model) == pruned_structure(net)
    torch.testing.assert_close(logits(model, x), logits(run.load_model(), x))
    for num_classes, classes in ((3, ["c", "b", "a"]), (3, None), (5, list("abcde"))):
        model, got, report = build_pretrained(weights, num_classes, 1, classes=classes)
        assert report.new == ["classifier.weight", "classifier.bias"] and got["num_classes"] == num_classes


def test_wrong_growth_rate_names_the_first_misfit(tmp_path):
    torch.manual_seed(0)
    torch.save(torchvision.models.DenseNet(**dict(TINY, growth_rate=12)).state_dict(), tmp_path / "k12.pth")
    weights = read_weights(tmp_path / "k12.pth")
    with pytest.raises(ArgumentError) as e:
        build_pretrained(weights, 10, 3, **TINY_ARGS)
    assert e.value.template == (f"{{pretrained}} {tmp_path / 'k12.pth'} does not fit densenet121: "
                                "features.denseblock1.denselayer1.conv1.weight is (48, 8, 1, 1) in the file, "
                                "(32, 8, 1, 1) in the model")
    with pytest.raises(ArgumentError, match="fits no registered model; the closest, densenet"):
        build_pretrained(weights, 10, 3)
    state = torchvision.models.DenseNet(**TINY).state_dict()
    del state["features.norm5.running_var"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(ArgumentError, match=r"features\.norm5\.running_var is missing from the file$"):
        build_pretrained(read_weights(tmp_path / "short.pth"), 10, 3, **TINY_ARGS)
    torch.save({**state, "features.norm5.running_var": torch.ones(16), "extra": torch.ones(1)}, tmp_path / "x.pth")
    with pytest.raises(ArgumentError, match="extra is in the file, not in the model$"):
        build_pretrained(read_weights(tmp_path / "x.pth"), 10, 3, **TINY_ARGS)


def test_refusals_are_one_line_and_name_the_path(tmp_path, tv):
    assert "no such file or folder" in refusal(tmp_path / "missing.pth")
    (tmp_path / "empty").mkdir()
    assert "not a densekit run directory" in refusal(tmp_path / "empty")
    (tmp_path / "garbage.pth").write_bytes(b"\x80\x02garbage" * 100)
    assert "not a weights file that torch.load reads without running code" in refusal(tmp_path / "garbage.pth")
    (tmp_path / "garbage.safetensors").write_bytes(b"garbage" * 100)
    assert "cannot read safetensors" in refusal(tmp_path / "garbage.safetensors")
    torch.save(tv, tmp_path / "module.pth")  # a pickled module: weights_only refuses it
    assert "(Unsupported global: GLOBAL torchvision.models.densenet.DenseNet" in refusal(tmp_path / "module.pth")
    torch.save({"features.conv0.weight": torch.ones(1), "epochs": 3}, tmp_path / "mixed.pth")
    assert "epochs is int, not a tensor of weights" in refusal(tmp_path / "mixed.pth")
    torch.save({"features.conv0.weight": torch.ones(1, dtype=torch.complex64)}, tmp_path / "complex.pth")
    assert "not a tensor of weights" in refusal(tmp_path / "complex.pth")
    torch.save({"features.conv0.weight": torch.tensor([float("nan")])}, tmp_path / "nan.pth")
    assert "NaN" in refusal(tmp_path / "nan.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    assert "not a state dict" in refusal(tmp_path / "list.pth")
    for name in ("missing.pth", "empty", "garbage.pth", "garbage.safetensors", "module.pth", "mixed.pth", "list.pth"):
        assert str(tmp_path / name) in refusal(tmp_path / name)


def test_bare_name_reads_torch_hub_cache_only(tmp_path, monkeypatch, tv):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    hub = tmp_path / "hub" / "checkpoints"
    message = refusal("densenet121")
    assert message == (f"pretrained densenet121: no weights file in {hub}, and densekit downloads nothing: put "
                       "https://download.pytorch.org/models/densenet121-a639ec97.pth there, or give the file's path")
    assert "nor a model with published weights (densenet121, densenet161, densenet169, densenet201)" in \
        refusal("densenet_bc_100_k12")
    hub.mkdir(parents=True)
    torch.save(legacy(tv.state_dict()), hub / "densenet121-a639ec97.pth")
    weights = read_weights("densenet121")
    assert weights.source == "densenet121" and weights.kind == "torchvision"
    model, _, _ = build_pretrained(weights, 1000, 3, **TINY_ARGS)
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(logits(model, x), logits(tv, x), atol=1e-5)


def test_input_channels_adapted_both_ways(tmp_path, tv):
    torch.save(tv.state_dict(), tmp_path / "rgb.pth")
    rgb = read_weights(tmp_path / "rgb.pth")
    gray_model, kwargs, report = build_pretrained(rgb, 1000, 1, **TINY_ARGS)
    assert report.adapted == ["features.conv0.weight"] and kwargs["in_chans"] == 1
    assert report.summary() == "loaded 79 tensors, 1 adapted (features.conv0.weight: 3 -> 1 channels)"
    gray = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(logits(gray_model, gray), logits(tv, gray.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-4)

    safetensors.torch.save_file(gray_model.state_dict(), tmp_path / "gray.safetensors")
    back, _, report = build_pretrained(read_weights(tmp_path / "gray.safetensors"), 1000, 3, **TINY_ARGS)
    assert report.summary() == "loaded 79 tensors, 1 adapted (features.conv0.weight: 1 -> 3 channels)"
    torch.testing.assert_close(logits(back, gray.repeat(1, 3, 1, 1)), logits(gray_model, gray), atol=1e-5, rtol=1e-4)

    with pytest.raises(ArgumentError, match="stem for 3 input channel.*in_chans 2 can be made only from"):
        build_pretrained(rgb, 1000, 2, **TINY_ARGS)


def test_infer_model_tells_densenet121_from_169():
    with torch.device("meta"):
        tv121, tv169 = torchvision.models.densenet121(), torchvision.models.densenet169()
    assert infer_model(tv121.state_dict()) == "densenet121"
    assert infer_model(tv169.state_dict()) == "densenet169"
    cifar = create_model("densenet_bc_100_k12", num_classes=0, in_chans=1).state_dict()
    assert infer_model(cifar) == "densenet_bc_100_k12"  # any input channels, no classifier
    with pytest.raises(ArgumentError, match="no registered model fits the weights; the closest, densenet121, differs: "
                                            r"features\.denseblock4\.denselayer16\.norm1\.weight is missing"):
        infer_model({k: v for k, v in tv121.state_dict().items() if "denseblock4.denselayer16" not in k})
