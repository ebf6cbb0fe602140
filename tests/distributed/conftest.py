"""The shared writers, tiny model and fixtures (testkit)."""

from testkit import TINY, one_thread, run_cli, write_mnist  # noqa: F401
