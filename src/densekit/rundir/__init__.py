"""The run directory: what a training run writes, and the one place that reads it back.

``run`` holds :class:`RunDir`, the only code that knows the files' names and formats;
``files`` how they are written (whole or not at all, never over what a user had) and read
(never more than a file of its kind can hold, never a FIFO or device); ``schema`` what
their JSON may contain, checked before anything is built from it.
"""

from .files import publish, publish_json, refuse_existing, refuse_nonempty
from .run import ModelInfo, Preprocessing, RunDir, load_strictly, pretrained_cfg, pruned_counts, pruned_structure
from .schema import FORMAT, FORMAT_VERSION, LIMITS

__all__ = ["FORMAT", "FORMAT_VERSION", "LIMITS", "ModelInfo", "Preprocessing", "RunDir", "load_strictly",
           "pretrained_cfg", "publish", "publish_json", "pruned_counts", "pruned_structure", "refuse_existing", "refuse_nonempty"]
