"""load_images: every channel layout and format to 1 or 3 channels, antialiased
resizing, and errors that name the file."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from densekit.data import DataError, load_images

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; until densekit
# moves, the notice is expected here and would only drown the test report.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)


def luma(rgb) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".gif", ".webp", ".tif", ".ppm"])
def test_formats_rgb(tmp_path, write_image, solid_image, suffix):
    colour = (200, 100, 50)
    options = {"quality": 100} if suffix == ".jpg" else {}
    path = write_image(tmp_path / f"img{suffix}", solid_image(10, 7, colour), **options)
    out = load_images([path], 3, (4, 5))
    assert out.shape == (1, 3, 4, 5) and out.dtype == torch.uint8
    # JPEG (chroma subsampling), WebP (lossy by default) and GIF (palette) change colours a little
    tol = 6 if suffix in (".jpg", ".webp", ".gif") else 0
    for c in range(3):
        assert (out[0, c].int() - colour[c]).abs().max() <= tol, (suffix, c, out[0, c])


def test_gray_and_gray_alpha(tmp_path, write_image, solid_image):
    gray = write_image(tmp_path / "g.png", solid_image(6, 6, 77))
    gray_alpha = write_image(tmp_path / "ga.png", solid_image(6, 6, (90, 0)))
    with Image.open(gray_alpha) as im:
        assert im.mode == "LA"
    rgb = load_images([gray, gray_alpha], 3, (3, 3))
    assert rgb[0].unique().tolist() == [77] and rgb[1].unique().tolist() == [90]
    one = load_images([gray, gray_alpha], 1, (3, 3))
    assert one.shape == (2, 1, 3, 3)
    assert one[0].unique().tolist() == [77] and one[1].unique().tolist() == [90]


def test_rgba_alpha_dropped_colour_kept(tmp_path, write_image, solid_image):
    path = write_image(tmp_path / "rgba.png", solid_image(4, 4, (10, 20, 30, 0)))
    with Image.open(path) as im:
        assert im.mode == "RGBA"
    out = load_images([path], 3, (4, 4))
    assert [out[0, c].unique().tolist() for c in range(3)] == [[10], [20], [30]]


def test_rgb_to_gray_uses_luma(tmp_path, write_image, solid_image):
    colour = (200, 100, 50)
    path = write_image(tmp_path / "c.png", solid_image(5, 5, colour))
    out = load_images([path], 1, (5, 5))
    assert out.shape == (1, 1, 5, 5)
    assert abs(int(out[0, 0, 0, 0]) - luma(colour)) <= 1  # 124.2
    assert out.unique().numel() == 1


def test_palette_gives_colours_not_indices(tmp_path, write_image):
    im = Image.new("P", (4, 2))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 red, 1 green
    im.putpixel((3, 1), 1)
    path = write_image(tmp_path / "p.png", im)
    out = load_images([path], 3, (2, 4))
    assert out[0, :, 0, 0].tolist() == [255, 0, 0]
    assert out[0, :, 1, 3].tolist() == [0, 255, 0]
    gray = load_images([path], 1, (2, 4))
    assert abs(int(gray[0, 0, 0, 0]) - luma((255, 0, 0))) <= 1  # 76, not palette index 0
    assert abs(int(gray[0, 0, 1, 3]) - luma((0, 255, 0))) <= 1  # 150, not palette index 1


def test_sixteen_bit_png_is_scaled(tmp_path, write_image):
    arr = np.array([[0, 65535, 32896]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    out = load_images([path], 1, (1, 3))
    assert out[0, 0, 0].tolist() == [0, 255, 128]


def test_resize_is_antialiased(tmp_path, write_image):
    # A one-pixel line, downsampled 8x: plain bilinear samples at columns 3.5, 11.5, ...
    # and misses column 5 entirely; an antialiasing filter spreads its mass instead.
    arr = np.zeros((32, 32), np.uint8)
    arr[:, 5] = 255
    path = write_image(tmp_path / "line.png", arr)
    out = load_images([path], 1, (4, 4))[0, 0].double()
    assert out[:, 0].min() > 10
    # about 255 / 8 per row (a little more: the filter renormalizes near the border)
    assert all(20 < s < 45 for s in out.sum(dim=1).tolist()), out


def test_any_size_non_square_and_upsampling(tmp_path, write_image, solid_image):
    paths = [
        write_image(tmp_path / "a.png", solid_image(3, 50, 10)),
        write_image(tmp_path / "b.png", solid_image(41, 2, 20)),
        write_image(tmp_path / "c.png", solid_image(1, 1, 30)),
    ]
    out = load_images(paths, 1, (5, 9))
    assert out.shape == (3, 1, 5, 9)
    assert [out[i].unique().tolist() for i in range(3)] == [[10], [20], [30]]


def test_same_size_is_untouched(tmp_path, write_image):
    arr = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    path = write_image(tmp_path / "r.png", arr)
    out = load_images([str(path)], 3, (6, 7))
    assert torch.equal(out[0], torch.from_numpy(arr).permute(2, 0, 1))


def test_empty_list():
    out = load_images([], 3, (8, 8))
    assert out.shape == (0, 3, 8, 8) and out.dtype == torch.uint8


def _png_bytes(tmp_path, write_image, solid_image) -> bytes:
    return write_image(tmp_path / "ok.png", solid_image(16, 16, (1, 2, 3))).read_bytes()


@pytest.mark.parametrize("kind, message", [
    ("missing", "image file not found"),
    ("dir", "is a directory"),
    ("empty", "empty file"),
    ("text", "not a readable image"),
    ("truncated_png", "cannot decode image"),
])
def test_errors_name_the_file(tmp_path, write_image, solid_image, kind, message):
    path = tmp_path / f"bad_{kind}.png"
    if kind == "dir":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("definitely not an image\nsecond line\n")
    elif kind == "truncated_png":
        path.write_bytes(_png_bytes(tmp_path, write_image, solid_image)[:40])
    good = write_image(tmp_path / "good.png", solid_image(4, 4, 5))
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: {message}") as info:
        load_images([good, path], 3, (4, 4))
    assert "\n" not in str(info.value) and ".cpp" not in str(info.value)


def test_truncated_jpeg(tmp_path, write_image, solid_image):
    path = write_image(tmp_path / "t.jpg", solid_image(64, 64, (9, 99, 199)))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: cannot decode image"):
        load_images([path], 3, (8, 8))


@pytest.mark.parametrize("in_chans, size, name", [
    (2, (4, 4), "in_chans"), (4, (4, 4), "in_chans"), (3, 4, "image_size"),
    (3, (0, 4), "image_size"), (3, (4, 4, 4), "image_size"), (3, (4.0, 4), "image_size"),
])
def test_argument_validation(in_chans, size, name):
    with pytest.raises(ValueError, match=name):
        load_images([], in_chans, size)
