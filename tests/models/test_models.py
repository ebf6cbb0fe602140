"""Every registered model, generically: shapes, gradients, published sizes, bad input."""

import pytest
import torch

import densekit
from densekit import DenseBlock, DenseNet, create_model, list_models
from densekit.models import Transition, get_variant
from densekit.models.profile import count_macs

# Published counts: torchvision's model docs (1000 classes); Huang et al. 2017 Table 2
# (10 classes) for the CIFAR networks, given there to 0.1M.
EXACT = {
    "densenet121": 7_978_856,
    "densenet161": 28_681_000,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
}
PAPER_MILLIONS = {
    "densenet_40_k12": 1.0,
    "densenet_100_k12": 7.0,
    "densenet_100_k24": 27.2,
    "densenet_bc_100_k12": 0.8,
    "densenet_bc_250_k24": 15.3,
    "densenet_bc_190_k40": 25.6,
}
# Too heavy to push through a backward pass on every CI run; their blocks are the same code.
HEAVY = {"densenet264", "densenet_bc_190_k40", "densenet_bc_250_k24", "densenet_100_k24", "densenet161", "densenet201"}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(EXACT))
def test_torchvision_parameter_counts(name):
    assert n_params(create_model(name)) == EXACT[name]


@pytest.mark.parametrize("name", sorted(PAPER_MILLIONS))
def test_paper_parameter_counts(name):
    assert round(n_params(create_model(name)) / 1e6, 1) == PAPER_MILLIONS[name]


def test_pinned_counts_of_the_rest():
    # Not published; pinned so that an accidental change of structure shows.
    assert n_params(create_model("densenet264")) == 33_337_704
    assert n_params(create_model("dense_resnet121")) == 36_610_706
    assert n_params(create_model("densenet_bc_40_k12")) == 176_122
    assert n_params(create_model("densenet_bc_40_k12_s2")) == 176_122  # the same layers, stride-2 stem


# torchvision's model docs, as "GFLOPS" (multiply-accumulates of one 224 px image, to 0.01 G).
PUBLISHED_GMACS = {"densenet121": 2.83, "densenet161": 7.73, "densenet169": 3.36, "densenet201": 4.29}


@pytest.mark.parametrize("name", sorted(PUBLISHED_GMACS))
def test_published_macs(name):
    # counted in the paper's order even though the default transitions pool first (fewer MACs)
    model = create_model(name)
    assert round(count_macs(model, (3, 224, 224)) / 1e9, 2) == PUBLISHED_GMACS[name]
    assert all(m.fused for m in model.modules() if isinstance(m, (DenseBlock, Transition)))  # restored
    assert model.training


def test_list_models():
    names = list_models()
    assert len(names) == 14 and names == sorted(names)
    assert list_models("densenet_bc_*") == ["densenet_bc_100_k12", "densenet_bc_190_k40", "densenet_bc_250_k24",
                                           "densenet_bc_40_k12", "densenet_bc_40_k12_s2"]


@pytest.mark.parametrize("name", [n for n in list_models() if n not in HEAVY])
def test_forward_backward_every_model(name):
    torch.manual_seed(0)
    c, *size = get_variant(name).input_size
    size = [max(s // 4, 32) for s in size]
    model = create_model(name, num_classes=7, in_chans=c)
    x = torch.randn(2, c, *size)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    # every conv gets a non-zero gradient: the dense connections really carry signal
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("conv2.weight"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_head_gradient_keeps_the_features_layout(dtype, spatial_dims):
    """Global average pooling hands the final ReLU a gradient in its own channels-last layout
    (the mean's own backward gives a contiguous one), with the mean's backward's values."""
    torch.manual_seed(0)
    model = DenseNet(4, (2, 2), stem="cifar", num_classes=3, spatial_dims=spatial_dims, fused=True).to(dtype)
    layout = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    feats = torch.randn(4, model.num_features, *[5] * spatial_dims, dtype=dtype).contiguous(memory_format=layout)
    grads = []
    for x in (feats.clone().requires_grad_(), feats.contiguous().requires_grad_()):
        relu = torch.relu(x)  # as forward_features ends: not a leaf, whose .grad takes its layout anyway
        relu.register_hook(grads.append)
        logits = model.forward_head(relu)
        logits.backward(torch.linspace(-1, 1, logits.numel(), dtype=dtype).view_as(logits))
    assert grads[0].is_contiguous(memory_format=layout) and not grads[0].is_contiguous()
    assert grads[1].is_contiguous()  # not channels-last: the mean's own backward
    assert torch.equal(grads[0], grads[1])


def test_plain_model_on_channels_last_input_under_torch_func_and_forward_ad():
    """The head's layout-keeping mean stands aside where a hand-written backward cannot serve:
    torch.func's transforms (per-sample gradients) and forward-mode AD, on the plain path."""
    torch.manual_seed(0)
    model = DenseNet(4, (2, 2), stem="cifar", num_classes=3, fused=False).eval()
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xs):
        return torch.func.functional_call(model, p, (xs,)).sum()

    grads = torch.func.grad(loss)(params, x)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x.unsqueeze(1))
    for name, g in grads.items():
        torch.testing.assert_close(per_sample[name].sum(0), g, rtol=1e-4, atol=1e-5)
    tangent = torch.randn_like(x)
    with torch.autograd.forward_ad.dual_level():
        jvp = torch.autograd.forward_ad.unpack_dual(model(torch.autograd.forward_ad.make_dual(x, tangent))).tangent
    want = torch.func.jvp(lambda xs: model(xs), (x,), (tangent,))[1]
    torch.testing.assert_close(jvp, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(HEAVY))
def test_heavy_models_build_and_infer(name):
    model = create_model(name).eval()
    c, *size = get_variant(name).input_size
    with torch.no_grad():
        out = model(torch.randn(1, c, *[max(s // 7, model.min_input_size) for s in size]))
    assert out.shape == (1, get_variant(name).num_classes) and torch.isfinite(out).all()


def test_head_api():
    model = create_model("densenet_bc_100_k12").eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 8, 8) and (feats >= 0).all()
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (2, 342)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, 342)


@pytest.mark.parametrize("name,size", [("densenet121", 64), ("densenet_bc_100_k12", 32), ("dense_resnet121", 32)])
def test_features_only(name, size):
    model = create_model(name, features_only=True).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        feats = model(x)
    assert len(feats) == len(model.feature_info)
    for f, info in zip(feats, model.feature_info):
        assert f.shape[1] == info["num_chs"]
        assert f.shape[2] == size // info["reduction"]
    reductions = [i["reduction"] for i in model.feature_info]
    assert reductions == sorted(reductions)


def test_features_only_out_indices():
    model = create_model("densenet121", features_only=True, out_indices=(2, 4))
    assert [i["reduction"] for i in model.feature_info] == [8, 32]
    assert [i["num_chs"] for i in model.feature_info] == [512, 1024]
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [512, 1024]


@pytest.mark.parametrize("spatial_dims,size", [(1, (64,)), (3, (16, 16, 16))])
def test_1d_and_3d(spatial_dims, size):
    torch.manual_seed(0)
    model = DenseNet(12, (2, 3), stem="cifar", spatial_dims=spatial_dims, in_chans=2, num_classes=4,
                     fused=True)
    x = torch.randn(2, 2, *size)
    out = model(x)
    assert out.shape == (2, 4)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.features.denseblock1.denselayer1.conv2.weight.dim() == spatial_dims + 2
    imagenet = DenseNet(8, (2, 2), spatial_dims=spatial_dims, num_classes=3).eval()
    assert imagenet(torch.randn(1, 3, *[s * 2 for s in size])).shape == (1, 3)


def test_seed_hybrid_uses_every_stage():
    model = create_model("dense_resnet121")
    blocks = [m for n, m in model.features.named_children() if n.startswith("denseblock")]
    assert [len(b) for b in blocks] == [6, 12, 24, 16]
    assert [b.growth_rate for b in blocks] == [16, 32, 64, 128]
    # channels are tracked, never mismatched: each block starts where the last one ended
    assert blocks[0].in_channels == 16
    assert model.feature_info[-1]["reduction"] == 8
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_public_api():
    assert set(densekit.__all__) >= {"create_model", "list_models", "load", "DenseLayer", "DenseBlock",
                                     "Transition", "DenseNet"}


@pytest.mark.parametrize("kwargs,arg", [
    (dict(growth_rate=0), "growth_rate"),
    (dict(growth_rate=-4), "growth_rate"),
    (dict(compression=0), "compression"),
    (dict(compression=1.5), "compression"),
    (dict(block_config=()), "block_config"),
    (dict(block_config=(6, 0)), "block_config"),
    (dict(block_config=(6, -1)), "block_config"),
    (dict(spatial_dims=4), "spatial_dims"),
    (dict(spatial_dims=0), "spatial_dims"),
    (dict(stem="tiny"), "stem"),
    (dict(drop_rate=1.0), "drop_rate"),
    (dict(num_classes=-1), "num_classes"),
    (dict(in_chans=0), "in_chans"),
    (dict(bn_size=-2), "bn_size"),
])
def test_bad_configuration(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        DenseNet(**{"block_config": (2, 2), **kwargs})


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match="unknown model 'densnet121'; known: dense_resnet121, densenet121"):
        create_model("densnet121")
    with pytest.raises(ValueError, match="unknown argument 'growth'"):
        create_model("densenet121", growth=3)


def test_bad_forward_input():
    model = create_model("densenet121")
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="expected a 4D input"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"too small.*>= 29"):
        model(torch.randn(1, 3, 28, 28))
    assert model.eval()(torch.randn(1, 3, 29, 29)).shape == (1, 1000)  # the smallest that fits


@pytest.mark.parametrize("name", list_models())
def test_size_from_arguments_of_every_registered_model(name):
    # what bounds a run directory's model.json before it is built: exact, without building
    from densekit.models import model_kwargs
    from densekit.models.size import estimate

    variant = get_variant(name)
    size = estimate(model_kwargs(name), variant.input_size[1:])
    model = create_model(name)
    assert size.params == n_params(model) and size.min_input == model.min_input_size
    assert size.params == EXACT.get(name, size.params)


def test_densekit_version(capsys):
    from densekit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"densekit {densekit.__version__}"


def test_pretrained_true_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match="downloads no weights"):
        create_model("densenet121", pretrained=True)
    assert create_model("densenet_bc_40_k12", pretrained=False).num_classes == 10
