"""densekit: densely connected convolutional networks for PyTorch."""

from .models import DenseBlock, DenseLayer, DenseNet, Transition, create_model, list_models

__version__ = "0.1.0"

__all__ = ["create_model", "fit", "list_models", "load", "DenseLayer", "DenseBlock", "Transition", "DenseNet"]


def fit(model, train_data, val_data=None, test_data=None, **kwargs):
    """Train (or fine-tune) ``model`` in place on a user's own datasets into a run directory:
    ``densekit.train.api.fit`` says what it takes."""
    from .train.api import fit as _fit

    return _fit(model, train_data, val_data, test_data, **kwargs)


def load(run_dir, device="cpu"):
    """Load a trained run directory (model.safetensors + model.json) ready for inference.

    Returns the model in eval mode on ``device`` ("cpu", "cuda", "cuda:N" or "auto"), with
    ``model.pretrained_cfg``: ``classes``, ``in_chans``, ``image_size`` (H, W), ``input_size``
    (C, H, W), ``mean`` and ``std``. Feed it ``(x / 255 - mean) / std`` for uint8 images ``x``.

    Example: ``model = densekit.load("runs/my-run")``, then
    ``model.pretrained_cfg["classes"][model(x).argmax(1)[0]]`` names the first image's class.
    """
    from .rundir import RunDir
    from .train.runtime import select_runtime

    return RunDir(run_dir).load_model(select_runtime(str(device)).device)
