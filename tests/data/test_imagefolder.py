"""imagefolder: class folders, val/test, gray vs colour, and layout errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from densekit.data import DataError, load_dataset, load_images

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)


def make_folder(root, write_image, solid_image, layout, colour=None, test_name="val"):
    """layout: {split: {class: [gray values]}}; ``colour`` (split, class, index) -> RGB."""
    paths = {}
    for split, classes in layout.items():
        split_dir = root / (test_name if split == "test" else split)
        split_dir.mkdir(parents=True, exist_ok=True)
        for cls, values in classes.items():
            (split_dir / cls).mkdir(parents=True, exist_ok=True)
            for i, v in enumerate(values):
                pixels = solid_image(9, 13, colour[1] if colour and colour[0] == (split, cls, i) else v)
                paths[(split, cls, i)] = write_image(split_dir / cls / f"{i:03d}.png", pixels)
    return paths


LAYOUT = {
    "train": {"dog": [10, 20], "cat": [30], "emu": [40, 50, 60]},
    "test": {"cat": [70], "dog": [80, 90], "emu": []},
}


@pytest.mark.parametrize("test_name", ["val", "test"])
def test_grayscale_folder(tmp_path, write_image, solid_image, test_name):
    make_folder(tmp_path, write_image, solid_image, LAYOUT, test_name=test_name)
    (tmp_path / "train" / "dog" / "README.txt").write_text("not an image")
    (tmp_path / "train" / ".cache").mkdir()
    # macOS leaves AppleDouble files beside the real ones when copying to other disks
    (tmp_path / "train" / "dog" / "._000.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    ds = load_dataset("imagefolder", tmp_path, image_size=8)
    assert ds.classes == ["cat", "dog", "emu"]
    assert ds.in_chans == 1 and ds.image_size == (8, 8)
    assert ds.train.images.shape == (6, 1, 8, 8) and ds.test.images.shape == (3, 1, 8, 8)
    assert ds.train.labels.tolist() == [0, 1, 1, 2, 2, 2]
    assert ds.test.labels.tolist() == [0, 1, 1]
    assert [int(ds.train.images[i].unique()) for i in range(6)] == [30, 10, 20, 40, 50, 60]
    assert [int(ds.test.images[i].unique()) for i in range(3)] == [70, 80, 90]
    values = np.array([30, 10, 20, 40, 50, 60]) / 255
    assert ds.mean == pytest.approx((values.mean(),), abs=1e-12)
    assert ds.std == pytest.approx((values.std(),), abs=1e-12)


def test_default_image_size_is_64(tmp_path, write_image, solid_image):
    make_folder(tmp_path, write_image, solid_image, LAYOUT)
    ds = load_dataset("imagefolder", tmp_path)
    assert ds.image_size == (64, 64) and ds.train.images.shape == (6, 1, 64, 64)


def test_one_colour_image_makes_all_rgb(tmp_path, write_image, solid_image):
    # the only colour image is in the test split
    make_folder(tmp_path, write_image, solid_image, LAYOUT, colour=(("test", "dog", 1), (250, 0, 5)))
    ds = load_dataset("imagefolder", tmp_path, image_size=4)
    assert ds.in_chans == 3 and ds.train.images.shape == (6, 3, 4, 4)
    assert ds.train.images[1, :, 0, 0].tolist() == [10, 10, 10]
    assert ds.test.images[2, :, 0, 0].tolist() == [250, 0, 5]
    assert len(ds.mean) == 3 and ds.mean[0] == pytest.approx(ds.mean[2])


def test_same_path_as_predict(tmp_path, write_image, solid_image):
    """The reader and `densekit predict` (load_images) must see identical pixels."""
    rng = np.random.default_rng(0)
    path = write_image(tmp_path / "train" / "a" / "x.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    write_image(tmp_path / "val" / "a" / "y.png", solid_image(5, 5, (1, 2, 3)))
    ds = load_dataset("imagefolder", tmp_path, image_size=12)
    assert torch.equal(ds.train.images, load_images([path], 3, (12, 12)))


def test_nested_files_and_upper_case_suffix(tmp_path, write_image, solid_image):
    make_folder(tmp_path, write_image, solid_image, {"train": {"a": [1]}, "test": {"a": [2]}})
    write_image(tmp_path / "train" / "a" / "sub" / "deep.PNG", solid_image(3, 3, 7))
    ds = load_dataset("imagefolder", tmp_path, image_size=3)
    assert [int(x.unique()) for x in ds.train.images] == [1, 7]


def test_val_classes_must_match(tmp_path, write_image, solid_image):
    make_folder(tmp_path, write_image, solid_image,
                {"train": {"a": [1], "b": [2]}, "test": {"a": [3], "c": [4]}})
    with pytest.raises(DataError) as info:
        load_dataset("imagefolder", tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'val'}: class folders must match {tmp_path / 'train'}")
    assert "missing ['b']" in msg and "not in train ['c']" in msg


def test_empty_train_folder(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'train'))}: empty"):
        load_dataset("imagefolder", tmp_path)


def test_train_class_without_images(tmp_path, write_image, solid_image):
    make_folder(tmp_path, write_image, solid_image, {"train": {"a": [1], "b": []}, "test": {"a": [1], "b": [2]}})
    (tmp_path / "train" / "b" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'train' / 'b'))}: no images"):
        load_dataset("imagefolder", tmp_path)


def test_test_split_without_images(tmp_path, write_image, solid_image):
    make_folder(tmp_path, write_image, solid_image, {"train": {"a": [1]}, "test": {"a": []}})
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'val'))}: no images"):
        load_dataset("imagefolder", tmp_path)


def test_missing_train_or_val(tmp_path, write_image, solid_image):
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'nope'))}: data directory not found"):
        load_dataset("imagefolder", tmp_path / "nope")
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path))}: no train folder"):
        load_dataset("imagefolder", tmp_path)
    make_folder(tmp_path, write_image, solid_image, {"train": {"a": [1]}})
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path))}: no val or test folder"):
        load_dataset("imagefolder", tmp_path)


def test_unreadable_image_is_named(tmp_path, write_image, solid_image):
    make_folder(tmp_path, write_image, solid_image, LAYOUT)
    bad = tmp_path / "val" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(DataError, match=f"^{re.escape(str(bad))}: "):
        load_dataset("imagefolder", tmp_path)


def test_train_limit_and_image_size_validation(tmp_path, write_image, solid_image):
    make_folder(tmp_path, write_image, solid_image, LAYOUT)
    ds = load_dataset("imagefolder", tmp_path, train_limit=2, image_size=4)
    assert ds.train.labels.tolist() == [0, 1] and len(ds.test) == 3
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("imagefolder", tmp_path, image_size=0)
