"""Fixtures shared by the model tests."""

import pytest

from densekit.models import native


@pytest.fixture(params=["native", "torch-ops"])
def cpu_kernels(request):
    """The fused block's CPU passes as native kernels (where a C compiler built them) and as
    torch ops (the path CUDA and machines without a compiler take)."""
    if request.param == "torch-ops":
        with native.disabled():
            yield request.param
    elif not native.available():
        pytest.skip("native kernels unavailable (no C compiler)")
    else:
        yield request.param
