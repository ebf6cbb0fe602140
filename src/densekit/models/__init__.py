from .densenet import DenseNet
from .layers import DenseBlock, DenseLayer, Transition
from .registry import create_model, get_variant, list_models, model_kwargs, register
from .variants import VARIANTS, Variant

__all__ = ["DenseNet", "DenseBlock", "DenseLayer", "Transition", "Variant", "VARIANTS",
           "create_model", "get_variant", "list_models", "model_kwargs", "register"]
