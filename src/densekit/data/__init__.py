"""Datasets as uint8 tensors, and the device-resident loader that batches them.

One module per file format: ``idx`` (MNIST, Fashion-MNIST), ``cifar`` (CIFAR-10/100),
``imagefolder`` (a folder per class); ``images`` decodes image files for both
``imagefolder`` and ``densekit predict``; ``loader`` serves normalized batches.
"""

from .core import DataError, Dataset, Split
from .datasets import DATASETS, default_data_dir, load_dataset
from .images import load_images
from .loader import Augment, DeviceLoader

__all__ = [
    "DATASETS",
    "Augment",
    "DataError",
    "Dataset",
    "DeviceLoader",
    "Split",
    "default_data_dir",
    "load_dataset",
    "load_images",
]
