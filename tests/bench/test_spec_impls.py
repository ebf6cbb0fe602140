"""The benchmark compares like with like: same network, same numbers, or no ratio at all."""

import importlib.util

import pytest
import torch

from densekit import create_model
from densekit.bench import BenchSpec, Config, build, model_spec, torchvision_reference, unavailable_reason
from densekit.errors import UserError


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def config(model="densenet_bc_16_k4", impl="torchvision", **kw):
    base = dict(model=model, batch_size=2, input_size=16, in_chans=3, dtype="fp32", layout="nchw",
                device="cpu", mode="train", impl=impl, steps=1, warmup=0)
    return Config(**{**base, **kw})


@pytest.mark.parametrize("in_chans", [1, 3])
def test_cifar_reference_is_the_same_function(in_chans):
    torch.manual_seed(0)
    ours = build(config(in_chans=in_chans, impl="densekit")).eval()
    theirs = torchvision_reference("densenet_bc_16_k4", in_chans=in_chans).eval()
    for m in ours.modules():  # non-trivial statistics, so a missing or extra BN would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    # norm0/relu0 are gone from the reference, so densekit's weights load into it strictly
    # (torchvision calls the final norm "norm5" whatever the number of blocks)
    state = {k.replace("features.norm4.", "features.norm5."): v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(state, strict=True)
    x = torch.randn(2, in_chans, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["densenet_bc_100_k12", "densenet121"])
def test_reference_has_densekits_parameter_count(name):
    assert n_params(torchvision_reference(name)) == n_params(create_model(name))


def test_bc100_reference_numbers():
    # 3 blocks of 16 bottleneck layers, k=12, 24 stem maps: the paper's 0.8M-parameter network
    tv = torchvision_reference("densenet_bc_100_k12")
    assert n_params(tv) == 769_162
    assert isinstance(tv.features.pool0, torch.nn.Identity)
    assert tv.features.conv0.kernel_size == (3, 3) and tv.features.conv0.stride == (1, 1)


def test_variants_torchvision_cannot_express_are_unavailable():
    assert "bottleneck" in unavailable_reason(config("densenet_100_k12"))
    assert "one growth rate" in unavailable_reason(config("dense_resnet121", input_size=32))
    assert unavailable_reason(config("densenet_bc_100_k12")) is None
    assert unavailable_reason(config("densenet_100_k12", impl="densekit")) is None
    with pytest.raises(ValueError, match="bottleneck"):
        build(config("densenet_100_k12"))


def test_timm_reason():
    reason = unavailable_reason(config(impl="timm"))
    if importlib.util.find_spec("timm") is None:
        assert reason == "timm is not installed"
    else:
        assert "registers no model" in reason
        assert unavailable_reason(config("densenet121", impl="timm", input_size=64)) is None


def test_depth_names_build_the_papers_networks():
    assert model_spec("densenet121") == ("densenet121", {})
    base, over = model_spec("densenet_bc_190_k12")
    assert base == "densenet_bc_100_k12"
    assert over == dict(growth_rate=12, block_config=(31, 31, 31), num_init_features=24)
    # a derived name equal to a registered one is the registered network
    assert n_params(create_model("densenet_bc_250_k24")) == n_params(
        create_model("densenet_bc_100_k12", growth_rate=24, block_config=(41,) * 3, num_init_features=48))
    for bad in ("densenet_bc_101_k12", "densenet_bc_4_k12", "densnet121"):
        with pytest.raises(UserError):
            model_spec(bad)


def test_spec_expands_depths_and_groups_cases():
    spec = BenchSpec(models=["densenet_bc_100_k12"], depths=[10, 16], batch_sizes=[2], input_sizes=[8],
                     devices=["cpu"], modes=["train"], impls=["densekit", "torchvision"])
    assert spec.models == ["densenet_bc_10_k12", "densenet_bc_16_k12"]
    configs = spec.configs()
    assert [(c.model, c.impl) for c in configs] == [
        ("densenet_bc_10_k12", "densekit"), ("densenet_bc_10_k12", "torchvision"),
        ("densenet_bc_16_k12", "densekit"), ("densenet_bc_16_k12", "torchvision")]
    assert all(c.in_chans == 3 and c.steps == 20 for c in configs)
    assert "--models densenet_bc_10_k12 densenet_bc_16_k12" in spec.command()


def test_compiled_implementations_build_the_eager_network():
    # measure.py compiles; the network (and so its parameters) is the eager implementation's
    from densekit.bench.spec import base_impl

    for impl, eager in (("densekit-compile", "densekit"), ("torchvision-compile", "torchvision")):
        assert base_impl(impl) == eager
        config = Config("densenet_bc_16_k4", 2, 8, 3, "fp32", "nchw", "cpu", "train", impl, 1, 1)
        twin = Config("densenet_bc_16_k4", 2, 8, 3, "fp32", "nchw", "cpu", "train", eager, 1, 1)
        assert unavailable_reason(config) is None
        assert type(build(config)) is type(build(twin))
        assert sum(p.numel() for p in build(config).parameters()) == sum(p.numel() for p in build(twin).parameters())


def test_the_optimized_copy_is_densekit_network_for_inference_only():
    # measure.py copies densekit's network with optimize_for_inference; training it is refused
    from densekit.bench.measure import measure
    from densekit.bench.spec import FAMILIES, base_impl

    assert base_impl("densekit-optimized") == "densekit" and "densekit-optimized" in FAMILIES["densekit"]
    assert "inference only" in unavailable_reason(config(impl="densekit-optimized", mode="train"))
    infer = config(impl="densekit-optimized", mode="infer", steps=2, warmup=1)
    assert unavailable_reason(infer) is None
    assert type(build(infer)) is type(build(config(impl="densekit")))
    result = measure(infer)
    assert len(result["step_s"]) == 2 and all(s > 0 for s in result["step_s"])


def test_the_memory_efficient_implementations_set_the_flag_on_each_side():
    # densekit-me and torchvision-me: the same networks with memory_efficient=True on every layer
    from densekit.bench.spec import FAMILIES

    for impl, family in (("densekit-me", "densekit"), ("torchvision-me", "torchvision")):
        assert impl in FAMILIES[family]
        net = build(config(impl=impl))
        plain = build(config(impl=family))
        layers = [m for m in net.modules() if hasattr(m, "memory_efficient") and hasattr(m, "norm1")]
        assert layers and all(m.memory_efficient for m in layers)
        assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in plain.parameters())
