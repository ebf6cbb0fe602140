"""torchvision's model tests for its DenseNets, run against densekit's models.

Source: pytorch/vision, ``test/test_models.py``, BSD-3-Clause, as read in November 2026 (the
pytest version with ``list_model_fns`` and ``_check_fx_compatible``; its commit was not recorded). ``set_rng_seed`` and ``freeze_rng_state`` are
torchvision's ``test/common_utils.py`` helpers (as at 871088d343ad145357630e517817ca02c46dd50f).

Ported: ``_check_jit_scriptable``, ``_check_fx_compatible``, ``_check_input_backprop``,
``_get_image`` (its random-image branch), test_classification_model for torchvision's four
DenseNets (densenet121/161/169/201: ``num_classes=50``, input (1, 3, 224, 224), eval) and
test_memory_efficient_densenet (input (1, 3, 300, 300)). The bodies, assertions and
tolerances are torchvision's.

Adapted, and why:

* The model factory: ``models.<name>(**kwargs)`` is ``densekit.create_model(name, **kwargs)``
  (``num_classes=50``; ``memory_efficient`` has torchvision's meaning in densekit: gradient
  checkpointing). test_classification_model takes densekit's default, ``fused=True``;
  test_memory_efficient_densenet builds ``fused=False``, the reference path that torchvision's
  DenseNet is and on which checkpointing acts (fused blocks have their own lean backward).
* The expected output: torchvision compares ``out`` with a pickle it stores for each model
  (``test/expect/ModelTester.test_<name>_expect.pkl``), which is not here. ``_assert_expected``
  instead builds torchvision's own model of the same name, ``torchvision.models.<name>
  (num_classes=50)``, loads the densekit model's state dict into it strictly, and compares its
  output on the same input with torchvision's ``assert_close(..., rtol=prec, atol=prec,
  check_dtype=False, check_device=False)`` and the same ``prec`` (0.1). This checks that
  densekit's model computes what torchvision's code computes with the same weights (the pickle
  also pins torchvision's initial weights under seed 0, which this does not), and that the
  state dicts match key for key.
* ``freeze_rng_state`` and ``set_rng_seed`` are written here (small equivalents of
  torchvision's test/common_utils.py): save and restore the torch RNG state; seed torch,
  ``random`` and numpy.
* CPU only: ``dev`` is parametrized over ``["cpu"]`` (torchvision's ``cpu_and_cuda()``), so the
  CUDA autocast branch and ``SKIP_BIG_MODEL`` / ``is_skippable`` (CUDA and Windows entries) do
  not apply; the ``torch.backends.cudnn.flags`` decorator is kept. Test ids name the model.
  One torch thread (tests/compat/conftest.py), as in the project's other test folders.
"""

import contextlib
import os
import random
from tempfile import TemporaryDirectory

import numpy as np
import pytest
import torch
import torch.fx
import torchvision

import densekit

# torch 2.14 deprecates torch.jit.script / save / load (a FutureWarning at each call)
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")

DENSENETS = ["densenet121", "densenet161", "densenet169", "densenet201"]


# -- torchvision's test/common_utils.py, the two helpers used here ---------------------------

def set_rng_seed(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@contextlib.contextmanager
def freeze_rng_state():
    rng_state = torch.get_rng_state()
    if torch.cuda.is_available():
        cuda_rng_state = torch.cuda.get_rng_state()
    try:
        yield
    finally:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda_rng_state)
        torch.set_rng_state(rng_state)


def cpu_and_cuda():
    return ("cpu",)  # CPU only here


# -- the factory: densekit for torchvision.models ----------------------------------------------

def _model_fn(model_name, **fixed):
    def model_fn(**kwargs):
        return densekit.create_model(model_name, **fixed, **kwargs)
    model_fn.__name__ = model_name
    return model_fn


def _get_image(input_shape, real_image, device, dtype=None):
    """torchvision's ``_get_image``: the random image (``real_image`` is only for detection models)."""
    assert not real_image
    # RNG always on CPU, to ensure x in cuda tests is bitwise identical to x in cpu tests
    return torch.rand(input_shape).to(device=device, dtype=dtype)


def _assert_expected(output, name, prec=None, atol=None, rtol=None, *, model, inputs):
    """torchvision's ``_assert_expected`` with the recorded pickle replaced by the output of
    torchvision's own ``name`` model holding ``model``'s weights (loaded strictly)."""
    reference = getattr(torchvision.models, name)(num_classes=model.num_classes)
    reference.load_state_dict(model.state_dict(), strict=True)
    reference.eval().to(inputs.device)
    with torch.no_grad(), freeze_rng_state():
        expected = reference(inputs)
    rtol = rtol or prec  # keeping prec param for legacy reason, but could be removed ideally
    atol = atol or prec
    torch.testing.assert_close(output, expected, rtol=rtol, atol=atol, check_dtype=False, check_device=False)


def _check_jit_scriptable(nn_module, args, unwrapper=None, eager_out=None):
    """Check that a nn.Module's results in TorchScript match eager and that it can be exported"""

    def get_export_import_copy(m):
        """Save and load a TorchScript model"""
        with TemporaryDirectory() as dir:
            path = os.path.join(dir, "script.pt")
            m.save(path)
            imported = torch.jit.load(path)
        return imported

    sm = torch.jit.script(nn_module)
    sm.eval()

    if eager_out is None:
        with torch.no_grad(), freeze_rng_state():
            eager_out = nn_module(*args)

    with torch.no_grad(), freeze_rng_state():
        script_out = sm(*args)
        if unwrapper:
            script_out = unwrapper(script_out)

    torch.testing.assert_close(eager_out, script_out, atol=1e-4, rtol=1e-4)

    m_import = get_export_import_copy(sm)
    with torch.no_grad(), freeze_rng_state():
        imported_script_out = m_import(*args)
        if unwrapper:
            imported_script_out = unwrapper(imported_script_out)

    torch.testing.assert_close(script_out, imported_script_out, atol=3e-4, rtol=3e-4)


def _check_fx_compatible(model, inputs, eager_out=None):
    model_fx = torch.fx.symbolic_trace(model)
    if eager_out is None:
        eager_out = model(inputs)
    with torch.no_grad(), freeze_rng_state():
        fx_out = model_fx(inputs)
    torch.testing.assert_close(eager_out, fx_out)


def _check_input_backprop(model, inputs):
    if isinstance(inputs, list):
        requires_grad = list()
        for inp in inputs:
            requires_grad.append(inp.requires_grad)
            inp.requires_grad_(True)
    else:
        requires_grad = inputs.requires_grad
        inputs.requires_grad_(True)

    out = model(inputs)

    if isinstance(out, dict):
        out["out"].sum().backward()
    else:
        if isinstance(out[0], dict):
            out[0]["scores"].sum().backward()
        else:
            out[0].sum().backward()

    if isinstance(inputs, list):
        for i, inp in enumerate(inputs):
            assert inputs[i].grad is not None
            inp.requires_grad_(requires_grad[i])
    else:
        assert inputs.grad is not None
        inputs.requires_grad_(requires_grad)


# If 'unwrapper' is provided it will be called with the script model outputs
# before they are compared to the eager model outputs. (none of the DenseNets has one)
script_model_unwrapper = {}

# no entries for the DenseNets in torchvision's _model_params
_model_params = {}


# torchvision's DenseNets run the reference path, where memory_efficient (gradient checkpointing)
# acts; densekit's fused blocks never checkpoint, so the test builds its models with fused=False.
@pytest.mark.parametrize("model_fn", [_model_fn(n, fused=False) for n in ["densenet121", "densenet169",
                                                                          "densenet201", "densenet161"]],
                         ids=lambda f: f.__name__)
def test_memory_efficient_densenet(model_fn):
    input_shape = (1, 3, 300, 300)
    x = torch.rand(input_shape)

    model1 = model_fn(num_classes=50, memory_efficient=True)
    params = model1.state_dict()
    num_params = sum(x.numel() for x in model1.parameters())
    model1.eval()
    out1 = model1(x)
    out1.sum().backward()
    num_grad = sum(x.grad.numel() for x in model1.parameters() if x.grad is not None)

    model2 = model_fn(num_classes=50, memory_efficient=False)
    model2.load_state_dict(params)
    model2.eval()
    out2 = model2(x)

    assert num_params == num_grad
    torch.testing.assert_close(out1, out2, rtol=0.0, atol=1e-5)

    _check_input_backprop(model1, x)
    _check_input_backprop(model2, x)


@torch.backends.cudnn.flags(allow_tf32=False)  # see: https://github.com/pytorch/vision/issues/7618
@pytest.mark.parametrize("model_fn", [_model_fn(n) for n in DENSENETS], ids=lambda f: f.__name__)
@pytest.mark.parametrize("dev", cpu_and_cuda())
def test_classification_model(model_fn, dev):
    set_rng_seed(0)
    defaults = {
        "num_classes": 50,
        "input_shape": (1, 3, 224, 224),
    }
    model_name = model_fn.__name__
    kwargs = {**defaults, **_model_params.get(model_name, {})}
    num_classes = kwargs.get("num_classes")
    input_shape = kwargs.pop("input_shape")
    real_image = kwargs.pop("real_image", False)

    model = model_fn(**kwargs)
    model.eval().to(device=dev)
    x = _get_image(input_shape=input_shape, real_image=real_image, device=dev)
    out = model(x)
    # FIXME: this if/else is nasty and only here to please our CI prior to the
    # release. We rethink these tests altogether.
    if model_name == "resnet101":
        prec = 0.2
    else:
        # FIXME: this is probably still way too high.
        prec = 0.1
    _assert_expected(out.cpu(), model_name, prec=prec, model=model, inputs=x)
    assert out.shape[-1] == num_classes
    _check_jit_scriptable(model, (x,), unwrapper=script_model_unwrapper.get(model_name, None), eager_out=out)
    _check_fx_compatible(model, x, eager_out=out)

    _check_input_backprop(model, x)
