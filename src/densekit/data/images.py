"""Image files to uint8 tensors: the one decode path for ``predict`` and ``imagefolder``.

Every image is decoded as RGB by ``torchvision.io.decode_image``, which lets libpng and
libjpeg expand palettes, drop alpha, and convert CMYK and grayscale correctly (decoding
"unchanged" would hand back palette indices or CMYK planes as if they were pixels).
Formats torchvision cannot decode (BMP, TIFF, PPM) go through Pillow instead.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from .. import checks
from .core import DataError

log = logging.getLogger(__name__)

# Suffixes the imagefolder reader picks up (lower case). The first group is decoded by
# torchvision, the rest by Pillow.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")

# An image's pixels, read from its header before it is decoded: a few kilobytes of PNG can
# declare a 100,000 x 100,000 image and make the decoder allocate 30 GB (Pillow's own
# decompression-bomb limit is 179 million pixels; torchvision's decoders have none).
MAX_PIXELS = 178_956_970  # Pillow's limit: 2 x its 89,478,485-pixel warning

# torchvision prefixes its decoder errors with the C++ source location.
_CPP_PREFIX = re.compile(r"^.*?\.cpp:\d+,\s*")


def _decode_torchvision(data: bytes) -> torch.Tensor:
    img = decode_image(
        torch.frombuffer(bytearray(data), dtype=torch.uint8),
        mode=ImageReadMode.RGB,
        apply_exif_orientation=True,
    )
    if img.dim() == 4:  # an animated GIF: its frames; keep the first
        img = img[0]
    if img.dtype != torch.uint8:  # 16-bit PNG
        img = TF.to_dtype(img, torch.uint8, scale=True)
    return img


def _decode_pillow(path: Path) -> torch.Tensor:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def read_image(path: str | os.PathLike, image_size: tuple[int, int]) -> torch.Tensor:
    """Decode one image file to uint8 RGB (3, H, W), resized with antialiasing."""
    img = decode_file(path)
    if tuple(img.shape[1:]) != tuple(image_size):
        img = TF.resize(img, list(image_size), antialias=True)
    return img


def decode_file(path: str | os.PathLike) -> torch.Tensor:
    """Decode one image file to uint8 RGB (3, H, W) at its own size; DataError names a file
    that is missing, empty or not a readable image."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"{path}: image file not found") from e
    except IsADirectoryError as e:
        raise DataError(f"{path}: is a directory, expected an image file") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    if not data:
        raise DataError(f"{path}: empty file, expected an image")
    _check_pixels(path, data)
    try:
        img = _decode_torchvision(data)
    except RuntimeError as tv_error:
        reason = _CPP_PREFIX.sub("", str(tv_error))
        if not reason.startswith("Unsupported image file"):
            raise DataError(f"{path}: cannot decode image: {reason}") from tv_error
        try:
            img = _decode_pillow(path)
        except Exception as pil_error:  # Pillow raises many types for bad files
            raise DataError(
                f"{path}: not a readable image (tried PNG, JPEG, GIF, WebP, then Pillow: {pil_error})"
            ) from pil_error
    if img.dim() != 3 or img.shape[0] != 3 or min(img.shape[1:]) < 1:
        raise DataError(f"{path}: decoded to an unexpected shape {tuple(img.shape)}, expected 3 x H x W")
    return img


def header(path: str | os.PathLike) -> tuple[tuple[int, int], str]:
    """An image file's (width, height) and Pillow mode, from its header alone (no decoding);
    DataError names a file that is not an image or too large to decode."""
    from PIL import Image

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                size, mode = im.size, im.mode
    except Image.DecompressionBombError:
        raise DataError(f"{path}: an image of more than the {MAX_PIXELS:,} pixels densekit decodes") from None
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except Exception as e:  # Pillow raises many types for files it cannot identify
        raise DataError(f"{path}: not a readable image ({' '.join(str(e).split())[:200]})") from None
    if size[0] * size[1] > MAX_PIXELS or min(size) < 1:
        raise DataError(f"{path}: a {size[0]} x {size[1]} image, which densekit does not decode")
    return size, mode


def _check_pixels(path: Path, data: bytes) -> None:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # said below, once, as an error
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.DecompressionBombError:
        w = h = None
    except Exception:  # not an image Pillow knows: the decoders below say so, with the reason
        return
    if w is None or w * h > MAX_PIXELS:
        size = "an image" if w is None else f"a {w} x {h} image"
        raise DataError(f"{path}: {size} of more than the {MAX_PIXELS:,} pixels densekit decodes; refusing to "
                        "decode it")


def is_gray(img: torch.Tensor) -> bool:
    """True when an RGB image has R == G == B everywhere, i.e. carries no colour."""
    return bool((img[0] == img[1]).all() and (img[1] == img[2]).all())


def to_channels(img: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Convert a uint8 RGB (3, H, W) image to ``in_chans`` (1 or 3) channels."""
    if in_chans == 3:
        return img
    # A gray source decoded as RGB has three equal planes; taking one keeps it exact
    # instead of rounding it through the luma weights.
    return img[:1] if is_gray(img) else TF.rgb_to_grayscale(img, num_output_channels=1)


def _check_args(in_chans: int, image_size: tuple[int, int]) -> tuple[int, int]:
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans!r}")
    try:
        h, w = image_size
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be a (height, width) pair, got {image_size!r}") from None
    for side in (h, w):
        checks.positive_int("image_size", side)
    return h, w


def load_images(paths: Sequence[str | os.PathLike], in_chans: int, image_size: tuple[int, int],
                crop_pct: float | None = None) -> torch.Tensor:
    """Decode image files of any size and channel layout into uint8 (N, in_chans, H, W).

    Gray, gray+alpha, RGB, RGBA and palette images are all accepted; alpha is dropped,
    ``in_chans`` 1 means grayscale and 3 means RGB. With ``crop_pct`` None every image is
    resized whole to ``image_size`` (height, width) with antialiasing; with a number, its short
    side is resized to ``image_size / crop_pct`` and the center cropped, as evaluation frames
    photos (``streaming``). A missing or undecodable file raises DataError naming it.
    """
    h, w = _check_args(in_chans, image_size)
    out = torch.empty((len(paths), in_chans, h, w), dtype=torch.uint8)
    for i, path in enumerate(paths):
        if crop_pct is None:
            out[i] = to_channels(read_image(path, (h, w)), in_chans)
        else:  # in the order evaluation takes (streaming.ImageFiles): channels, resize, crop
            img = to_channels(decode_file(path), in_chans)
            out[i] = TF.center_crop(TF.resize(img, int(h / crop_pct), antialias=True), [h, w])
    return out
