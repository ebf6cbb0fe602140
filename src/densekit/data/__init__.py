"""Datasets as uint8 tensors, and the device-resident loader that batches them.

One module per file format: ``idx`` (MNIST, Fashion-MNIST), ``cifar`` (CIFAR-10/100),
``imagefolder`` (a folder per class); ``images`` decodes image files for both
``imagefolder`` and ``densekit predict``; ``loader`` serves normalized batches of data held
in memory, ``streaming`` those of files decoded in worker processes, and ``batches.loader_for``
picks the one a split needs.
"""

from .batches import loader_for
from .core import DataError, Dataset, FileSplit, Split
from .datasets import DATASETS, default_data_dir, load_dataset
from .images import load_images
from .loader import Augment, DeviceLoader
from .streaming import StreamingLoader

__all__ = [
    "DATASETS",
    "Augment",
    "DataError",
    "Dataset",
    "DeviceLoader",
    "FileSplit",
    "Split",
    "StreamingLoader",
    "default_data_dir",
    "load_dataset",
    "load_images",
    "loader_for",
]
