"""densekit: densely connected convolutional networks for PyTorch."""

from .models import DenseBlock, DenseLayer, DenseNet, Transition, create_model, list_models

__version__ = "0.1.0"

__all__ = ["create_model", "list_models", "load", "DenseLayer", "DenseBlock", "Transition", "DenseNet"]


def load(run_dir, device="cpu"):
    """Load a trained run directory (model.safetensors + model.json) ready for inference."""
    from .train.checkpoint import load_run_model

    return load_run_model(run_dir, device=device)
