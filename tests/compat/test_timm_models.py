"""timm's generic model tests, run against densekit's models.

Source: huggingface/pytorch-image-models (timm), ``tests/test_models.py``, Apache-2.0, as
read in November 2026 (the version with the ``gemma4_vit*`` filters and the NaFlex tests; its
commit was not recorded). The FeatureInfo constructor checks come from
``timm/models/_features.py`` at 07535f408a346b84f9cc38dfed40379446060195.

Ported: test_model_forward, test_model_backward, test_model_default_cfgs,
test_model_forward_features, test_model_forward_intermediates, test_model_forward_torchscript,
test_model_forward_fx and test_model_backward_fx (with ``_create_fx_model``), and
``_get_input_size`` with timm's TARGET_*/MAX_* sizes. The test bodies, assertions and
tolerances are timm's, line for line. Not ported: test_model_inference and
test_model_load_pretrained / _features_pretrained (they download weights), the *_non_std,
forward_intermediates_features (``feature_cls='getter'``) and fx_torchscript tests, and the
NaFlex / gemma4 tests (other architectures).

Adapted, and why:

* The model factory. ``timm.list_models(...)`` is ``_list_models`` below: densekit's
  ``densekit.list_models()`` (all 14 names) with timm's ``filter`` / ``exclude_filters``
  applied by fnmatch as timm does; ``name_matches_cfg`` and ``include_tags`` do not change
  the list (every densekit name is its own config). ``timm.create_model(name, pretrained=False,
  ...)`` is ``densekit.create_model(name, pretrained=False, ...)``. ``get_pretrained_cfg_value
  (name, key)`` is ``densekit.create_model(name).pretrained_cfg.get(key)``, built once per name
  (cached: the config is fixed by the name, and building the large models three times a test
  cost seconds).
* ``list_models(module=FEAT_INTER_FILTERS)``: timm's list of model modules with
  ``forward_intermediates`` does not hold timm's own DenseNet; every densekit model has
  ``forward_intermediates``, so test_model_forward_intermediates takes densekit's names (with
  the size rule below).
* ``timm.models.FeatureInfo(model.feature_info, n)`` is ``densekit.models.FeatureInfo
  (model.feature_info)`` (densekit's takes no ``out_indices``; all maps are kept, which is
  what timm's ``n = len(feature_info)`` asks); ``_feature_info`` first makes the checks timm's
  constructor makes (``num_chs`` > 0, ``reduction`` non-decreasing, ``module`` present).
  It does not add timm's ``index`` key to the model's dicts (no test reads it).
* ``get_notrace_modules()`` / ``get_notrace_functions()`` are ``list(densekit.models.
  NOTRACE_MODULES)`` and ``[]``. ``get_channel_dim`` / ``get_spatial_dim`` are timm's
  (``timm/layers/format.py``): 1 and (2, 3) for NCHW, the only format here.
* ``EARLY_POOL_MODELS`` lists timm classes; densekit's DenseNet pools last, so it is empty.
* Torchscript: timm's EXCLUDE_JIT_FILTERS lists 'densenet*' because timm's own DenseNet does
  not script; densekit's reference path does, so that entry is dropped. timm builds the model
  under ``set_scriptable(True)`` (a model built to be scriptable); densekit's equivalent is
  ``create_model(name, fused=False)``. The default model (``fused=True``) is scripted too: in
  TorchScript its blocks take the reference path. Both are parametrized (``reference`` / ``fused``).
* timm sets the JIT profiling executor at import for the whole process; here a module
  fixture sets it and restores the previous settings afterwards (other test folders script too).
* Dropped: ``pytest.mark.timeout`` (no pytest-timeout here), timm's CI markers, the
  ``GITHUB_ACTIONS`` branches (the local lists are used), and ``TORCH_BACKEND`` /
  ``TORCH_DEVICE`` (CPU only: ``torch_device = 'cpu'``).
* Size: see ``SLOW_MODELS``: every test but test_model_forward_features (all 14 names) runs on
  one model of each kind (5 names), as timm's EXCLUDE_FILTERS leave out its big models on CI;
  the torchscript test also leaves out dense_resnet121 (EXCLUDE_JIT_FILTERS). One torch
  thread (tests/compat/conftest.py), as in the project's other test folders.
"""

import fnmatch
import functools
import math

import pytest
import torch

import densekit
import densekit.models

try:
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names, NodePathTracer
    has_fx_feature_extraction = True
except ImportError:
    has_fx_feature_extraction = False

# torch 2.14 deprecates torch.jit.script / save / load (a FutureWarning at each call)
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")

torch_device = 'cpu'


# -- the factory: densekit for timm ------------------------------------------------------------

def _list_models(filter='', exclude_filters=(), name_matches_cfg=False, include_tags=False):
    """timm.list_models over densekit's names: ``filter`` and ``exclude_filters`` are fnmatch
    patterns (one or a list), as in timm."""
    names = densekit.list_models()
    if filter:
        filters = filter if isinstance(filter, (tuple, list)) else [filter]
        names = [n for n in names if any(fnmatch.fnmatch(n, f) for f in filters)]
    if exclude_filters:
        if not isinstance(exclude_filters, (tuple, list)):
            exclude_filters = [exclude_filters]
        names = [n for n in names if not any(fnmatch.fnmatch(n, f) for f in exclude_filters)]
    return names


list_models = _list_models


def create_model(model_name, pretrained=False, **kwargs):
    return densekit.create_model(model_name, pretrained=pretrained, **kwargs)


@functools.lru_cache(maxsize=None)
def _pretrained_cfg(model_name):
    return dict(densekit.create_model(model_name).pretrained_cfg)


def get_pretrained_cfg_value(model_name, cfg_key):
    return _pretrained_cfg(model_name).get(cfg_key)


def get_notrace_modules():
    return list(densekit.models.NOTRACE_MODULES)


def get_notrace_functions():
    return []


def get_spatial_dim(fmt):
    # timm/layers/format.py
    if fmt == 'NLC':
        dim = (1,)
    elif fmt == 'NCL':
        dim = (2,)
    elif fmt == 'NHWC':
        dim = (1, 2)
    else:
        dim = (2, 3)
    return dim


def get_channel_dim(fmt):
    # timm/layers/format.py
    if fmt == 'NHWC':
        dim = 3
    elif fmt == 'NLC':
        dim = 2
    else:
        dim = 1
    return dim


def _feature_info(feature_info):
    """timm.models.FeatureInfo(feature_info, len(feature_info)): timm's constructor checks,
    then densekit's FeatureInfo."""
    prev_reduction = 1
    for i, fi in enumerate(feature_info):
        # sanity check the mandatory fields, there may be additional fields depending on the model
        assert 'num_chs' in fi and fi['num_chs'] > 0
        assert 'reduction' in fi and fi['reduction'] >= prev_reduction
        prev_reduction = fi['reduction']
        assert 'module' in fi
    return densekit.models.FeatureInfo(feature_info)


@pytest.fixture(autouse=True, scope='module')
def _jit_profiling_settings():
    # timm, at import: "legacy executor is too slow to compile large models for unit tests,
    # no need for the fusion performance here". Set for this module only, then restored.
    if not hasattr(torch._C, '_jit_set_profiling_executor'):
        yield
        return
    prev_executor = torch._C._jit_set_profiling_executor(True)
    prev_mode = torch._C._jit_set_profiling_mode(False)
    yield
    torch._C._jit_set_profiling_executor(prev_executor)
    torch._C._jit_set_profiling_mode(prev_mode)


# transformer / hybrid models don't support full set of spatial / feature APIs and/or have spatial output.
NON_STD_FILTERS = [
    'vit_*', 'naflexvit*', 'tnt_*', 'pit_*', 'coat_*', 'cait_*', '*mixer_*', 'gmlp_*', 'resmlp_*', 'twins_*',
    'convit_*', 'levit*', 'visformer*', 'deit*', 'xcit_*', 'crossvit_*', 'beit*', 'aimv2*', 'swiftformer_*',
    'poolformer_*', 'volo_*', 'sequencer2d_*', 'mvitv2*', 'gcvit*', 'efficientformer*', 'sam_hiera*',
    'eva_*', 'flexivit*', 'eva02*', 'samvit_*', 'efficientvit_m*', 'tiny_vit_*', 'hiera_*', 'vitamin*', 'test_vit*',
    'gemma4_vit*',
]

# timm's non-CI lists (the GITHUB_ACTIONS branch is dropped)
EXCLUDE_FILTERS = ['*enormous*', '*_7b_*']

EXCLUDE_JIT_FILTERS = [
    'hiera_*', '*naflex*', '*_7b_*', 'hrnet*', 'dpn*', 'selecsls*',  # timm's 'densenet*' dropped (see docstring)
    'gemma4_vit*',
    # densekit, for time: dense_resnet121 (36.6 M parameters, 58 layers up to k=128) took 6 s to
    # compile and run in both forms; its layers are the DenseLayer / Transition classes the
    # other four models script, and its stem is nn.Conv2d-BatchNorm2d-ReLU
    'dense_resnet121',
]

# densekit, for time (the compat suite runs in about a minute on a 2-core CPU): every test but
# test_model_forward_features runs on one model of each kind, the smallest, as timm's
# EXCLUDE_FILTERS leave out its big models on CI: densenet121 (ImageNet stem, bottleneck),
# dense_resnet121 (ResNet stem, a growth rate per block), densenet_bc_40_k12 (CIFAR stem,
# bottleneck), densenet_bc_40_k12_s2 (stride-2 stem) and densenet_40_k12 (CIFAR stem, no
# bottleneck). SLOW_MODELS, the other nine, are deeper or wider versions of the same layers
# (0.8-37 M parameters, 224 px for the ImageNet ones) and took 1-4 s per test there, and
# TorchScript compiles every layer; test_model_forward_features runs on all 14 names. (The
# torchscript test also leaves out dense_resnet121: see EXCLUDE_JIT_FILTERS.)
# (tests/compat/test_torchvision_models.py runs densenet121/161/169/201 at 224 px, with
# TorchScript, fx and backward; test_monai_densenet.py runs densenet121/169/201/264 in 1D, 2D, 3D.)
SLOW_MODELS = ['densenet161', 'densenet169', 'densenet201', 'densenet264', 'densenet_100_k12', 'densenet_100_k24',
               'densenet_bc_100_k12', 'densenet_bc_190_k40', 'densenet_bc_250_k24']

TARGET_FWD_SIZE = MAX_FWD_SIZE = 384
TARGET_BWD_SIZE = 128
MAX_BWD_SIZE = 320
MAX_FWD_OUT_SIZE = 448
TARGET_JIT_SIZE = 128
MAX_JIT_SIZE = 320
TARGET_FFEAT_SIZE = 96
MAX_FFEAT_SIZE = 256
TARGET_FWD_FX_SIZE = 128
MAX_FWD_FX_SIZE = 256
TARGET_BWD_FX_SIZE = 128
MAX_BWD_FX_SIZE = 224


def _get_input_size(model=None, model_name='', target=None):
    if model is None:
        assert model_name, "One of model or model_name must be provided"
        input_size = get_pretrained_cfg_value(model_name, 'input_size')
        fixed_input_size = get_pretrained_cfg_value(model_name, 'fixed_input_size')
        min_input_size = get_pretrained_cfg_value(model_name, 'min_input_size')
    else:
        default_cfg = model.default_cfg
        input_size = default_cfg['input_size']
        fixed_input_size = default_cfg.get('fixed_input_size', None)
        min_input_size = default_cfg.get('min_input_size', None)
    assert input_size is not None

    if fixed_input_size:
        return input_size

    if min_input_size:
        if target and max(input_size) > target:
            input_size = min_input_size
    else:
        if target and max(input_size) > target:
            input_size = tuple([min(x, target) for x in input_size])
    return input_size


@pytest.mark.parametrize('model_name', list_models(exclude_filters=EXCLUDE_FILTERS + SLOW_MODELS))
@pytest.mark.parametrize('batch_size', [1])
def test_model_forward(model_name, batch_size):
    """Run a single forward pass with each model"""
    model = create_model(model_name, pretrained=False)
    model.eval()

    input_size = _get_input_size(model=model, target=TARGET_FWD_SIZE)
    if max(input_size) > MAX_FWD_SIZE:
        pytest.skip("Fixed input size model > limit.")
    inputs = torch.randn((batch_size, *input_size))
    inputs = inputs.to(torch_device)
    model.to(torch_device)
    outputs = model(inputs)

    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any(), 'Output included NaNs'

    # Test that grad-checkpointing, if supported, doesn't cause model failures or change in output
    try:
        model.set_grad_checkpointing()
    except Exception:
        # throws if not supported, that's fine
        pass
    else:
        outputs2 = model(inputs)
        if isinstance(outputs, tuple):
            outputs2 = torch.cat(outputs2)
        assert torch.allclose(outputs, outputs2, rtol=1e-4, atol=1e-5), 'Output does not match'


@pytest.mark.parametrize('model_name', list_models(exclude_filters=EXCLUDE_FILTERS + SLOW_MODELS, name_matches_cfg=True))
@pytest.mark.parametrize('batch_size', [2])
def test_model_backward(model_name, batch_size):
    """Run a single forward pass with each model"""
    input_size = _get_input_size(model_name=model_name, target=TARGET_BWD_SIZE)
    if max(input_size) > MAX_BWD_SIZE:
        pytest.skip("Fixed input size model > limit.")

    model = create_model(model_name, pretrained=False, num_classes=42)
    encoder_only = model.num_classes == 0  # FIXME better approach?
    num_params = sum([x.numel() for x in model.parameters()])
    model.train()

    inputs = torch.randn((batch_size, *input_size))
    inputs = inputs.to(torch_device)
    model.to(torch_device)
    outputs = model(inputs)
    if isinstance(outputs, tuple):
        outputs = torch.cat(outputs)
    outputs.mean().backward()
    for n, x in model.named_parameters():
        assert x.grad is not None, f'No gradient for {n}'
    num_grad = sum([x.grad.numel() for x in model.parameters() if x.grad is not None])

    if encoder_only:
        output_fmt = getattr(model, 'output_fmt', 'NCHW')
        feat_axis = get_channel_dim(output_fmt)
        assert outputs.shape[feat_axis] == model.num_features, f'unpooled feature dim {outputs.shape[feat_axis]} != model.num_features {model.num_features}'
    else:
        assert outputs.shape[-1] == 42
    assert num_params == num_grad, 'Some parameters are missing gradients'
    assert not torch.isnan(outputs).any(), 'Output included NaNs'


# models with extra conv/linear layers after pooling (timm classes; densekit's DenseNet pools last)
EARLY_POOL_MODELS = ()


@pytest.mark.parametrize('model_name', list_models(
    exclude_filters=EXCLUDE_FILTERS + NON_STD_FILTERS + SLOW_MODELS, include_tags=True))
@pytest.mark.parametrize('batch_size', [1])
def test_model_default_cfgs(model_name, batch_size):
    """Run a single forward pass with each model"""
    model = create_model(model_name, pretrained=False)
    model.eval()
    model.to(torch_device)
    assert getattr(model, 'num_classes') >= 0
    assert getattr(model, 'num_features') > 0
    assert getattr(model, 'head_hidden_size') > 0
    state_dict = model.state_dict()
    cfg = model.default_cfg

    pool_size = cfg['pool_size']
    input_size = model.default_cfg['input_size']
    output_fmt = getattr(model, 'output_fmt', 'NCHW')
    spatial_axis = get_spatial_dim(output_fmt)
    assert len(spatial_axis) == 2  # TODO add 1D sequence support
    feat_axis = get_channel_dim(output_fmt)

    if all([x <= MAX_FWD_OUT_SIZE for x in input_size]) and \
            not any([fnmatch.fnmatch(model_name, x) for x in EXCLUDE_FILTERS]):
        # output sizes only checked if default res <= 448 * 448 to keep resource down
        input_size = tuple([min(x, MAX_FWD_OUT_SIZE) for x in input_size])
        input_tensor = torch.randn((batch_size, *input_size), device=torch_device)

        # test forward_features (always unpooled) & forward_head w/ pre_logits
        outputs = model.forward_features(input_tensor)
        outputs_pre = model.forward_head(outputs, pre_logits=True)
        assert outputs.shape[spatial_axis[0]] == pool_size[0], f'unpooled feature shape {outputs.shape} != config'
        assert outputs.shape[spatial_axis[1]] == pool_size[1], f'unpooled feature shape {outputs.shape} != config'
        assert outputs.shape[feat_axis] == model.num_features, f'unpooled feature dim {outputs.shape[feat_axis]} != model.num_features {model.num_features}'
        assert outputs_pre.shape[1] == model.head_hidden_size, f'pre_logits feature dim {outputs_pre.shape[1]} != model.head_hidden_size {model.head_hidden_size}'

        # test forward after deleting the classifier, output should be poooled, size(-1) == model.num_features
        model.reset_classifier(0)
        assert model.num_classes == 0, f'Expected num_classes to be 0 after reset_classifier(0), but got {model.num_classes}'
        model.to(torch_device)
        outputs = model.forward(input_tensor)
        assert len(outputs.shape) == 2
        assert outputs.shape[1] == model.head_hidden_size, f'feature dim w/ removed classifier {outputs.shape[1]} != model.head_hidden_size {model.head_hidden_size}'
        assert outputs.shape == outputs_pre.shape, f'output shape of pre_logits {outputs_pre.shape} does not match reset_head(0) {outputs.shape}'

        # test model forward after removing pooling and classifier
        if not isinstance(model, EARLY_POOL_MODELS):
            model.reset_classifier(0, '')  # reset classifier and disable global pooling
            model.to(torch_device)
            outputs = model.forward(input_tensor)
            assert len(outputs.shape) == 4
            assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]

        # test classifier + global pool deletion via __init__
        if 'pruned' not in model_name and not isinstance(model, EARLY_POOL_MODELS):
            model = create_model(model_name, pretrained=False, num_classes=0, global_pool='').eval()
            model.to(torch_device)
            outputs = model.forward(input_tensor)
            assert len(outputs.shape) == 4
            assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]

    # check classifier name matches default_cfg
    if cfg.get('num_classes', None):
        classifier = cfg['classifier']
        if not isinstance(classifier, (tuple, list)):
            classifier = classifier,
        for c in classifier:
            assert c + ".weight" in state_dict.keys(), f'{c} not in model params'

    # check first conv(s) names match default_cfg
    first_conv = cfg['first_conv']
    if isinstance(first_conv, str):
        first_conv = (first_conv,)
    assert isinstance(first_conv, (tuple, list))
    for fc in first_conv:
        assert fc + ".weight" in state_dict.keys(), f'{fc} not in model params'


@pytest.mark.parametrize('fused', [False, True], ids=['reference', 'fused'])
@pytest.mark.parametrize(
    'model_name', list_models(exclude_filters=EXCLUDE_FILTERS + EXCLUDE_JIT_FILTERS + SLOW_MODELS,
                              name_matches_cfg=True))
@pytest.mark.parametrize('batch_size', [1])
def test_model_forward_torchscript(model_name, batch_size, fused):
    """Run a single forward pass with each model"""
    input_size = _get_input_size(model_name=model_name, target=TARGET_JIT_SIZE)
    if max(input_size) > MAX_JIT_SIZE:
        pytest.skip("Fixed input size model > limit.")

    # timm: `with set_scriptable(True): model = create_model(model_name, pretrained=False)`;
    # densekit: fused=False is the model built to script, fused=True the default model.
    model = create_model(model_name, pretrained=False, fused=fused)
    model.eval()

    model = torch.jit.script(model)
    model.to(torch_device)
    outputs = model(torch.randn((batch_size, *input_size)))

    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any(), 'Output included NaNs'


EXCLUDE_FEAT_FILTERS = NON_STD_FILTERS[:]


@pytest.mark.parametrize('model_name', list_models(exclude_filters=EXCLUDE_FILTERS + EXCLUDE_FEAT_FILTERS))
@pytest.mark.parametrize('batch_size', [1])
def test_model_forward_features(model_name, batch_size):
    """Run a single forward pass with each model in feature extraction mode"""
    model = create_model(model_name, pretrained=False, features_only=True)
    model.eval()
    expected_channels = model.feature_info.channels()
    expected_reduction = model.feature_info.reduction()
    assert len(expected_channels) >= 3  # all models here should have at least 3 default feat levels

    input_size = _get_input_size(model=model, target=TARGET_FFEAT_SIZE)
    if max(input_size) > MAX_FFEAT_SIZE:
        pytest.skip("Fixed input size model > limit.")
    output_fmt = getattr(model, 'output_fmt', 'NCHW')
    feat_axis = get_channel_dim(output_fmt)
    spatial_axis = get_spatial_dim(output_fmt)

    outputs = model(torch.randn((batch_size, *input_size)))
    assert len(expected_channels) == len(outputs)
    spatial_size = input_size[-2:]
    for e, r, o in zip(expected_channels, expected_reduction, outputs):
        assert e == o.shape[feat_axis]
        assert o.shape[spatial_axis[0]] <= math.ceil(spatial_size[0] / r) + 1
        assert o.shape[spatial_axis[1]] <= math.ceil(spatial_size[1] / r) + 1
        assert o.shape[0] == batch_size
        assert not torch.isnan(o).any()


# timm: list_models(module=FEAT_INTER_FILTERS, ...): every densekit model has forward_intermediates
@pytest.mark.parametrize('model_name', list_models(exclude_filters=EXCLUDE_FILTERS + SLOW_MODELS))
@pytest.mark.parametrize('batch_size', [1])
def test_model_forward_intermediates(model_name, batch_size):
    """Run a single forward pass with each model in feature extraction mode"""
    model = create_model(model_name, pretrained=False)
    model.eval()
    feature_info = _feature_info(model.feature_info)
    expected_channels = feature_info.channels()
    expected_reduction = feature_info.reduction()
    assert len(expected_channels) >= 3  # all models here should have at least 3 feature levels

    input_size = _get_input_size(model=model, target=TARGET_FFEAT_SIZE)
    if max(input_size) > MAX_FFEAT_SIZE:
        pytest.skip("Fixed input size model > limit.")
    output_fmt = 'NCHW'  # NOTE output_fmt determined by forward_intermediates() arg, not model attribute
    feat_axis = get_channel_dim(output_fmt)
    spatial_axis = get_spatial_dim(output_fmt)

    inpt = torch.randn((batch_size, *input_size))
    output, intermediates = model.forward_intermediates(
        inpt,
        output_fmt=output_fmt,
    )
    assert len(expected_channels) == len(intermediates)
    spatial_size = input_size[-2:]
    for e, r, o in zip(expected_channels, expected_reduction, intermediates):
        assert e == o.shape[feat_axis]
        assert o.shape[spatial_axis[0]] <= math.ceil(spatial_size[0] / r) + 1
        assert o.shape[spatial_axis[1]] <= math.ceil(spatial_size[1] / r) + 1
        assert o.shape[0] == batch_size
        assert not torch.isnan(o).any()

    output2 = model.forward_features(inpt)
    assert torch.allclose(output, output2)

    # Test that grad-checkpointing, if supported
    try:
        model.set_grad_checkpointing()
    except Exception:
        # throws if not supported, that's fine
        pass
    else:
        output3, _ = model.forward_intermediates(
            inpt,
            output_fmt=output_fmt,
        )
        assert torch.allclose(output, output3, rtol=1e-4, atol=1e-5), 'Output does not match'


def _create_fx_model(model, train=False):
    # This block of code does a bit of juggling to handle any case where there are multiple outputs in train mode
    # So we trace once and look at the graph, and get the indices of the nodes that lead into the original fx output
    # node. Then we use those indices to select from train_nodes returned by torchvision get_graph_node_names
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(),
        autowrap_functions=get_notrace_functions(),
        #enable_cpatching=True,
        param_shapes_constant=True
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)

    eval_return_nodes = [eval_nodes[-1]]
    train_return_nodes = [train_nodes[-1]]
    if train:
        tracer = NodePathTracer(**tracer_kwargs)
        graph = tracer.trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_node_names = [n.name for n in graph_nodes[0]._input_nodes.keys()]
        graph_node_names = [n.name for n in graph_nodes]
        output_node_indices = [-graph_node_names.index(node_name) for node_name in output_node_names]
        train_return_nodes = [train_nodes[ix] for ix in output_node_indices]

    fx_model = create_feature_extractor(
        model,
        train_return_nodes=train_return_nodes,
        eval_return_nodes=eval_return_nodes,
        tracer_kwargs=tracer_kwargs,
    )
    return fx_model


EXCLUDE_FX_FILTERS = [
    'vit_gi*', 'hiera*',
    # gemma4_vit mixes raw-image / NaFlex dispatch on runtime-``ndim`` / dict
    # shape, which ``torch.fx`` cannot narrow (matching how naflexvit handles it).
    'gemma4_vit*',
]


@pytest.mark.parametrize('model_name', list_models(exclude_filters=EXCLUDE_FILTERS + EXCLUDE_FX_FILTERS + SLOW_MODELS))
@pytest.mark.parametrize('batch_size', [1])
def test_model_forward_fx(model_name, batch_size):
    """
    Symbolically trace each model and run single forward pass through the resulting GraphModule
    Also check that the output of a forward pass through the GraphModule is the same as that from the original Module
    """
    if not has_fx_feature_extraction:
        pytest.skip("Can't test FX. Torch >= 1.10 and Torchvision >= 0.11 are required.")

    model = create_model(model_name, pretrained=False)
    model.eval()

    input_size = _get_input_size(model=model, target=TARGET_FWD_FX_SIZE)
    if max(input_size) > MAX_FWD_FX_SIZE:
        pytest.skip("Fixed input size model > limit.")
    with torch.inference_mode():
        inputs = torch.randn((batch_size, *input_size))
        outputs = model(inputs)
        if isinstance(outputs, tuple):
            outputs = torch.cat(outputs)

        model = _create_fx_model(model)
        fx_outputs = tuple(model(inputs).values())
        if isinstance(fx_outputs, tuple):
            fx_outputs = torch.cat(fx_outputs)

    assert torch.all(fx_outputs == outputs)
    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any(), 'Output included NaNs'


@pytest.mark.parametrize('model_name', list_models(
    exclude_filters=EXCLUDE_FILTERS + EXCLUDE_FX_FILTERS + SLOW_MODELS, name_matches_cfg=True))
@pytest.mark.parametrize('batch_size', [2])
def test_model_backward_fx(model_name, batch_size):
    """Symbolically trace each model and run single backward pass through the resulting GraphModule"""
    if not has_fx_feature_extraction:
        pytest.skip("Can't test FX. Torch >= 1.10 and Torchvision >= 0.11 are required.")

    input_size = _get_input_size(model_name=model_name, target=TARGET_BWD_FX_SIZE)
    if max(input_size) > MAX_BWD_FX_SIZE:
        pytest.skip("Fixed input size model > limit.")

    model = create_model(model_name, pretrained=False, num_classes=42)
    model.train()
    num_params = sum([x.numel() for x in model.parameters()])

    model = _create_fx_model(model, train=True)
    outputs = tuple(model(torch.randn((batch_size, *input_size))).values())
    if isinstance(outputs, tuple):
        outputs = torch.cat(outputs)
    outputs.mean().backward()
    for n, x in model.named_parameters():
        assert x.grad is not None, f'No gradient for {n}'
    num_grad = sum([x.grad.numel() for x in model.parameters() if x.grad is not None])

    assert outputs.shape[-1] == 42
    assert num_params == num_grad, 'Some parameters are missing gradients'
    assert not torch.isnan(outputs).any(), 'Output included NaNs'
