"""Writers for the tiny image files the data tests build in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def save_image(path: Path, pixels: np.ndarray | Image.Image, fmt: str | None = None, **kw) -> Path:
    """Write ``pixels`` as an image file; the suffix picks the format unless ``fmt`` does.

    An array (H, W) is saved as gray, (H, W, 2) gray+alpha, (H, W, 3) RGB, (H, W, 4) RGBA.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    im = pixels if isinstance(pixels, Image.Image) else Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    im.save(path, format=fmt, **kw)
    return path


def solid(h: int, w: int, colour) -> np.ndarray:
    """An (h, w) gray or (h, w, C) image filled with one value per channel."""
    colour = np.atleast_1d(np.asarray(colour, dtype=np.uint8))
    arr = np.broadcast_to(colour, (h, w, len(colour))).copy()
    return arr[..., 0] if len(colour) == 1 else arr


@pytest.fixture
def write_image():
    return save_image


@pytest.fixture
def solid_image():
    return solid
