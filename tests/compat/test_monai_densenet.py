"""MONAI's DenseNet network tests, run against densekit's models.

Source: Project-MONAI/MONAI, ``tests/networks/nets/test_densenet.py``, Apache-2.0 (Copyright (c)
MONAI Consortium), as read in November 2026 (the version that imports from ``tests.test_utils``
and loads torchvision with ``weights="DEFAULT"``; its commit was not recorded).
``test_script_save`` is MONAI's ``tests/test_utils.py`` (``test_script_save(net, *inputs,
device=None, rtol=1e-4, atol=0.0)``, which calls ``monai.networks.utils.convert_to_torchscript
(..., verify=True, rtol=rtol, atol=atol)`` on the CPU).

Ported: TestDENSENET, as pytest functions: test_densenet_shape over MONAI's 12 cases
(3 input cases x 4 models) and test_script over its 4 script cases (TEST_CASE_1, 3D, x 4
models), with MONAI's cases, input and expected shapes and assertions. Not ported:
TestPretrainedDENSENET (it downloads weights).

Adapted, and why:

* The model factory: MONAI's ``DenseNet121`` / ``Densenet169`` / ``densenet201`` /
  ``DenseNet264`` ``(spatial_dims, in_channels, out_channels, pretrained=False, norm=..., act=...)``
  become ``densekit.create_model("densenet121" / "densenet169" / "densenet201" / "densenet264",
  pretrained=False, spatial_dims=spatial_dims, in_chans=in_channels, num_classes=out_channels)``.
  densekit has no ``norm`` / ``act`` arguments (its layers are BatchNorm-ReLU, which its fused
  block is built on), so the factory drops them: TEST_CASE_1's ``norm=("instance", {"eps":
  1e-5})`` and TEST_CASE_2's ``act="PRELU"`` run with BatchNorm and ReLU. The cases check
  shapes, which these arguments do not change.
* ``monai.networks.eval_mode`` is ``eval_mode`` below: the model in eval mode under
  ``torch.no_grad()``, its training flags restored after.
* ``test_script_save`` is written here from MONAI's ``test_script_save`` and
  ``convert_to_torchscript(verify=True)``: eval, ``torch.jit.script`` under ``no_grad``,
  ``torch.jit.save`` to a temporary file, ``torch.jit.load``, then the outputs of the model and
  of the loaded module, each after ``set_determinism(seed=0)``, compared with
  ``torch.testing.assert_close(rtol=1e-4, atol=0.0)`` (MONAI's defaults). Added: the in-memory
  scripted module's output is compared the same way. ``set_determinism`` here seeds torch,
  numpy and ``random`` (MONAI's also sets cuDNN flags, which the CPU does not use).
* The script cases build the models with ``fused=False``: scripted, a densekit model runs its
  reference path, and MONAI's rtol 1e-4 / atol 0 comparison holds only against the same
  computation (the fused eager path differs by rounding, ~1e-7 on near-zero logits).
* ``device`` is the CPU (MONAI picks CUDA when there is one). One torch thread
  (tests/compat/conftest.py), as in the project's other test folders.
"""

import contextlib
import os
import random
import tempfile

import numpy as np
import pytest
import torch

import densekit

# torch 2.14 deprecates torch.jit.script / save / load (a FutureWarning at each call)
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")

device = "cpu"


# -- the factory: densekit for monai.networks.nets ---------------------------------------------

def _monai_factory(model_name, monai_name, **fixed):
    def model(spatial_dims, in_channels, out_channels, pretrained=False, progress=True, norm=None, act=None):
        # norm / act: densekit's layers are BatchNorm-ReLU (see the docstring)
        return densekit.create_model(model_name, pretrained=pretrained, spatial_dims=spatial_dims,
                                     in_chans=in_channels, num_classes=out_channels, **fixed)
    model.__name__ = monai_name
    return model


DenseNet121 = _monai_factory("densenet121", "DenseNet121")
Densenet169 = _monai_factory("densenet169", "Densenet169")
densenet201 = _monai_factory("densenet201", "densenet201")
DenseNet264 = _monai_factory("densenet264", "DenseNet264")


@contextlib.contextmanager
def eval_mode(*nets):
    """monai.networks.eval_mode: eval mode and no_grad, the training flags restored after."""
    training = [n for n in nets if n.training]
    try:
        with torch.no_grad():
            yield [n.eval() for n in nets]
    finally:
        for n in training:
            n.train()


def set_determinism(seed=0):
    if seed is None:
        torch.seed()
        random.seed()
        np.random.seed()
        return
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def test_script_save(net, *inputs, device=None, rtol=1e-4, atol=0.0):
    """MONAI's test_script_save (convert_to_torchscript with verify=True), on the CPU."""
    device = "cpu"
    with tempfile.TemporaryDirectory() as tempdir:
        filename = os.path.join(tempdir, "model.ts")
        model = net
        model.eval()
        with torch.no_grad():
            script_module = torch.jit.script(model)
            torch.jit.save(m=script_module, f=filename)

        inputs = [i.to(device) if isinstance(i, torch.Tensor) else i for i in inputs]
        ts_model = torch.jit.load(filename)
        ts_model.eval().to(device)
        script_module.eval().to(device)
        model = model.to(device)

        with torch.no_grad():
            set_determinism(seed=0)
            torch_out = model(*inputs)
            set_determinism(seed=0)
            torchscript_out = ts_model(*inputs)
            set_determinism(seed=0)
            scripted_out = script_module(*inputs)  # added: the in-memory scripted module too
            set_determinism(seed=None)
        # compare TorchScript and PyTorch results
        torch.testing.assert_close(torch_out, torchscript_out, rtol=rtol, atol=atol)
        torch.testing.assert_close(torch_out, scripted_out, rtol=rtol, atol=atol)


test_script_save.__test__ = False  # a helper, not a test


TEST_CASE_1 = [  # 4-channel 3D, batch 2
    {"pretrained": False, "spatial_dims": 3, "in_channels": 2, "out_channels": 3, "norm": ("instance", {"eps": 1e-5})},
    (2, 2, 32, 64, 48),
    (2, 3),
]

TEST_CASE_2 = [  # 4-channel 2D, batch 2
    {"pretrained": False, "spatial_dims": 2, "in_channels": 2, "out_channels": 3, "act": "PRELU"},
    (2, 2, 32, 64),
    (2, 3),
]

TEST_CASE_3 = [  # 4-channel 1D, batch 1
    {"pretrained": False, "spatial_dims": 1, "in_channels": 2, "out_channels": 3},
    (1, 2, 32),
    (1, 3),
]

TEST_CASES = []
for case in [TEST_CASE_1, TEST_CASE_2, TEST_CASE_3]:
    for model in [DenseNet121, Densenet169, densenet201, DenseNet264]:
        TEST_CASES.append([model, *case])

# Scripted, a densekit model runs its reference path (the fused ops are Python and native
# code that TorchScript cannot compile). MONAI compares eager and scripted outputs at rtol 1e-4
# and atol 0, which only the same computation meets on near-zero logits (the fused eager path
# differs from the reference path by its rounding, ~1e-7): the script cases build the models
# on the reference path (fused=False), as MONAI's own DenseNet is.
TEST_SCRIPT_CASES = [[_monai_factory(f"densenet{n}", m.__name__, fused=False), *TEST_CASE_1]
                     for n, m in (("121", DenseNet121), ("169", Densenet169), ("201", densenet201),
                                  ("264", DenseNet264))]


def _ids(cases):
    return [f"{c[0].__name__}-{c[1]['spatial_dims']}d" for c in cases]


@pytest.mark.parametrize("model, input_param, input_shape, expected_shape", TEST_CASES, ids=_ids(TEST_CASES))
def test_densenet_shape(model, input_param, input_shape, expected_shape):
    net = model(**input_param).to(device)
    with eval_mode(net):
        result = net.forward(torch.randn(input_shape).to(device))
        assert result.shape == expected_shape


@pytest.mark.parametrize("model, input_param, input_shape, expected_shape", TEST_SCRIPT_CASES,
                         ids=_ids(TEST_SCRIPT_CASES))
def test_script(model, input_param, input_shape, expected_shape):
    net = model(**input_param)
    test_data = torch.randn(input_shape)
    test_script_save(net, test_data)
