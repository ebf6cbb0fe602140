"""The ported peer tests (timm, torchvision, MONAI) run against densekit's models.

One torch thread, as in the other folders: on the shared 2-core machine two intra-op threads
wait at OpenMP barriers for a core someone else holds; measured here, a densenet121 forward at
224 px took 3.3 s with two threads against 0.10 s with one while other work ran."""

# the shared fixture: one thread (testkit.py)
from testkit import one_thread  # noqa: F401
