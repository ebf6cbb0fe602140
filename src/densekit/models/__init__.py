from .densenet import IMAGENET_MEAN, IMAGENET_STD, NOTRACE_MODULES, DenseNet, FeatureInfo
from .frozen import FrozenDenseBlock, optimize_for_inference
from .layers import DenseBlock, DenseLayer, Transition, reference_path, restore_fused, set_fused
from .registry import create_model, get_variant, list_models, model_kwargs, register
from .variants import VARIANTS, Variant

__all__ = ["DenseNet", "DenseBlock", "DenseLayer", "Transition", "FeatureInfo", "Variant", "VARIANTS",
           "IMAGENET_MEAN", "IMAGENET_STD", "NOTRACE_MODULES", "create_model", "get_variant", "list_models",
           "model_kwargs", "reference_path", "register", "restore_fused", "set_fused", "FrozenDenseBlock",
           "optimize_for_inference"]
