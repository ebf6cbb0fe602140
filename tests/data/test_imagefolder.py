"""imagefolder: class folders, the val/ and test/ splits, gray vs colour, layout errors, and the
two paths: small folders decoded into memory, large ones streamed from disk in workers."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from densekit.data import DataError, load_dataset, load_images
from densekit.data import files
from densekit.data.batches import loader_for
from densekit.data.core import FileSplit
from densekit.data.loader import Augment

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)


def make_folder(root, write_image, solid_image, layout, colour=None, size=(9, 13)):
    """layout: {split: {class: [gray values]}}; ``colour`` (split, class, index) -> RGB."""
    paths = {}
    for split, classes in layout.items():
        split_dir = root / split
        split_dir.mkdir(parents=True, exist_ok=True)
        for cls, values in classes.items():
            (split_dir / cls).mkdir(parents=True, exist_ok=True)
            for i, v in enumerate(values):
                pixels = solid_image(*size, colour[1] if colour and colour[0] == (split, cls, i) else v)
                paths[(split, cls, i)] = write_image(split_dir / cls / f"{i:03d}.png", pixels)
    return paths


LAYOUT = {
    "train": {"dog": [10, 20], "cat": [30], "emu": [40, 50, 60]},
    "val": {"cat": [70], "dog": [80, 90], "emu": []},
}


def test_grayscale_folder_with_its_own_val(tmp_path, write_image, solid_image):
    make_folder(tmp_path, write_image, solid_image, LAYOUT)
    (tmp_path / "train" / "dog" / "README.txt").write_text("not an image")
    (tmp_path / "train" / ".cache").mkdir()
    # macOS leaves AppleDouble files beside the real ones when copying to other disks
    (tmp_path / "train" / "dog" / "._000.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    ds = load_dataset("imagefolder", tmp_path, image_size=8, workers=0)
    assert ds.classes == ["cat", "dog", "emu"] and not ds.streaming
    assert ds.in_chans == 1 and ds.image_size == (8, 8) and ds.test is None
    assert ds.train.images.shape == (6, 1, 8, 8) and ds.val.images.shape == (3, 1, 8, 8)
    assert ds.train.labels.tolist() == [0, 1, 1, 2, 2, 2] and ds.val.labels.tolist() == [0, 1, 1]
    assert [int(ds.train.images[i].unique()) for i in range(6)] == [30, 10, 20, 40, 50, 60]
    assert [int(ds.val.images[i].unique()) for i in range(3)] == [70, 80, 90]
    assert str(tmp_path / "val") in ds.val_source
    values = np.array([30, 10, 20, 40, 50, 60]) / 255
    assert ds.mean == pytest.approx((values.mean(),), abs=1e-12)
    assert ds.std == pytest.approx((values.std(),), abs=1e-12)


def test_test_folder_is_kept_whole_and_val_is_held_out_of_train(tmp_path, write_image, solid_image):
    layout = {"train": {"a": list(range(10, 30)), "b": list(range(40, 60))}, "test": {"a": [1], "b": [2, 3]}}
    make_folder(tmp_path, write_image, solid_image, layout)
    ds = load_dataset("imagefolder", tmp_path, image_size=4, val_fraction=0.25, seed=3, workers=0)
    assert len(ds.test) == 3 and ds.test.labels.tolist() == [0, 1, 1]
    assert torch.bincount(ds.val.labels).tolist() == [5, 5] and len(ds.train) == 30  # stratified
    held = {int(x.unique()) for x in ds.val.images}
    assert held.isdisjoint(int(x.unique()) for x in ds.train.images)
    assert held == {int(x.unique()) for x in load_dataset("imagefolder", tmp_path, image_size=4, val_fraction=0.25,
                                                          seed=3, workers=0).val.images}  # fixed by the seed
    only_train = tmp_path / "only"
    make_folder(only_train, write_image, solid_image, {"train": layout["train"]})
    ds = load_dataset("imagefolder", only_train, image_size=4, workers=0)
    assert ds.test is None and len(ds.val) == 4  # no val/, no test/: 10% held out, nothing tested


def test_default_image_size_is_224_and_aspect_is_kept(tmp_path, write_image):
    # a 40 x 80 image whose halves differ: short side to 224, the center 224 kept, nothing squashed
    img = np.zeros((40, 80), np.uint8)
    img[:, 40:] = 200
    write_image(tmp_path / "train" / "a" / "x.png", img)
    write_image(tmp_path / "val" / "a" / "y.png", img)
    ds = load_dataset("imagefolder", tmp_path, workers=0)
    assert ds.image_size == (224, 224) and ds.train.images.shape == (1, 1, 224, 224)
    row = ds.train.images[0, 0, 112].float()
    assert row[:100].mean() < 10 and row[124:].mean() > 190  # the edge stays in the middle


def test_one_colour_image_makes_all_rgb(tmp_path, write_image, solid_image):
    # the only colour image is in the validation split
    make_folder(tmp_path, write_image, solid_image, LAYOUT, colour=(("val", "dog", 1), (250, 0, 5)))
    ds = load_dataset("imagefolder", tmp_path, image_size=4, workers=0)
    assert ds.in_chans == 3 and ds.train.images.shape == (6, 3, 4, 4)
    assert ds.train.images[1, :, 0, 0].tolist() == [10, 10, 10]
    assert ds.val.images[2, :, 0, 0].tolist() == [250, 0, 5]
    assert len(ds.mean) == 3 and ds.mean[0] == pytest.approx(ds.mean[2])


def test_same_pixels_as_predict(tmp_path, write_image, solid_image):
    """The reader and `densekit predict` (load_images, with the run's framing) see identical pixels."""
    rng = np.random.default_rng(0)
    path = write_image(tmp_path / "train" / "a" / "x.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    write_image(tmp_path / "val" / "a" / "y.png", solid_image(5, 5, (1, 2, 3)))
    ds = load_dataset("imagefolder", tmp_path, image_size=12, workers=0)
    assert torch.equal(ds.train.images, load_images([path], 3, (12, 12), crop_pct=ds.crop_pct))


def test_nested_files_and_upper_case_suffix(tmp_path, write_image, solid_image):
    make_folder(tmp_path, write_image, solid_image, {"train": {"a": [1]}, "val": {"a": [2]}})
    write_image(tmp_path / "train" / "a" / "sub" / "deep.PNG", solid_image(3, 3, 7))
    ds = load_dataset("imagefolder", tmp_path, image_size=3, workers=0)
    assert [int(x.unique()) for x in ds.train.images] == [1, 7]


def test_val_classes_must_match(tmp_path, write_image, solid_image):
    make_folder(tmp_path, write_image, solid_image,
                {"train": {"a": [1], "b": [2]}, "val": {"a": [3], "c": [4]}})
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
    make_folder(tmp_path, write_image, solid_image, {"train": {"a": [1], "b": []}, "val": {"a": [1], "b": [2]}})
    (tmp_path / "train" / "b" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'train' / 'b'))}: no images"):
        load_dataset("imagefolder", tmp_path)


def test_val_split_without_images(tmp_path, write_image, solid_image):
    make_folder(tmp_path, write_image, solid_image, {"train": {"a": [1]}, "val": {"a": []}})
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'val'))}: no images"):
        load_dataset("imagefolder", tmp_path)


def test_missing_folders(tmp_path):
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'nope'))}: data directory not found"):
        load_dataset("imagefolder", tmp_path / "nope")
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path))}: no train folder"):
        load_dataset("imagefolder", tmp_path)


@pytest.mark.parametrize("where", ["header", "body"])
def test_a_corrupt_file_is_named_or_skipped(tmp_path, write_image, solid_image, where, caplog):
    make_folder(tmp_path, write_image, solid_image, LAYOUT)
    bad = tmp_path / "val" / "dog" / "broken.jpg"
    if where == "header":
        bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    else:  # a real JPEG cut short: its header reads, its pixels do not
        write_image(bad, np.full((64, 64, 3), 90, np.uint8), quality=95)
        bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError, match=f"^{re.escape(str(bad))}: .*skip_bad_images"):
        load_dataset("imagefolder", tmp_path, workers=0, image_size=4)
    ds = load_dataset("imagefolder", tmp_path, workers=0, image_size=4, skip_bad_images=True)
    assert len(ds.val) == 3 and f"skipping {bad}" in caplog.text


def test_train_limit_and_image_size_validation(tmp_path, write_image, solid_image):
    make_folder(tmp_path, write_image, solid_image, LAYOUT)
    ds = load_dataset("imagefolder", tmp_path, train_limit=2, image_size=4, workers=0)
    assert ds.train.labels.tolist() == [0, 1] and len(ds.val) == 3
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("imagefolder", tmp_path, image_size=0)


# -- streamed from disk -----------------------------------------------------------------------


@pytest.fixture
def photos(tmp_path, write_image):
    """JPEG and PNG, mixed sizes and aspect ratios, gray and RGB, in nested folders: 2 classes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for i in range(n):
            label = i % 2
            h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            pixels[..., label] = 250  # learnable: the class's colour channel
            if i % 3 == 0:
                pixels = pixels[..., 0]  # gray
            sub = "nested/deeper" if i % 4 == 0 else ""
            suffix = ".jpg" if i % 2 else ".png"
            write_image(tmp_path / split / f"c{label}" / sub / f"{i:02d}{suffix}", pixels)
    return tmp_path


def test_a_large_folder_is_streamed(photos, monkeypatch):
    monkeypatch.setattr(files, "SMALL_IMAGES", 5)  # this folder counts as large
    ds = load_dataset("imagefolder", photos, image_size=32, workers=2, seed=1)
    assert ds.streaming and isinstance(ds.train, FileSplit) and isinstance(ds.test, FileSplit)
    assert ds.in_chans == 3 and len(ds.train) + len(ds.val) == 12 and len(ds.test) == 4 and ds.crop_pct == 0.875
    train = loader_for(ds, ds.train, 4, train=True, device=torch.device("cpu"), seed=1, workers=2)
    batches = list(train.epoch(0))
    assert len(batches) == len(ds.train) // 4 and all(x.shape == (4, 3, 32, 32) for x, _ in batches)
    assert all(x.dtype == torch.float32 and torch.isfinite(x).all() for x, _ in batches)
    # the same draws whichever number of workers decodes them, and when resumed at a step
    again = list(loader_for(ds, ds.train, 4, train=True, device=torch.device("cpu"), seed=1, workers=0).epoch(0, 1))
    for (x, y), (x2, y2) in zip(batches[1:], again):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    other = list(train.epoch(1))
    assert not torch.equal(other[0][0], batches[0][0])  # another epoch, other crops
    # evaluation: every image, in order, framed as predict frames it
    test = list(loader_for(ds, ds.test, 3, train=False, device=torch.device("cpu"), workers=2))
    assert [len(y) for _, y in test] == [3, 1]
    pixels = load_images(ds.test.paths[:1], 3, (32, 32), crop_pct=ds.crop_pct).float() / 255
    mean, std = torch.tensor(ds.mean).view(1, 3, 1, 1), torch.tensor(ds.std).view(1, 3, 1, 1)
    torch.testing.assert_close(test[0][0][:1], (pixels - mean) / std)


def test_a_streamed_file_that_does_not_decode(photos, monkeypatch, caplog):
    monkeypatch.setattr(files, "SMALL_IMAGES", 5)
    ds = load_dataset("imagefolder", photos, image_size=16, workers=0)
    bad = next(p for p in ds.test.paths if p.endswith(".png"))  # libjpeg would decode a cut JPEG, grayed
    with open(bad, "r+b") as f:  # cut after the header was read: found by the worker
        f.truncate(300)
    loader = loader_for(ds, ds.test, 4, train=False, device=torch.device("cpu"), workers=1)
    with pytest.raises(DataError, match=f"^{re.escape(bad)}: .*skip_bad_images"):
        list(loader)
    loader = loader_for(ds, ds.test, 4, train=False, device=torch.device("cpu"), workers=1, skip_bad_images=True)
    assert [len(y) for _, y in loader] == [3] and f"skipping {bad}" in caplog.text


def test_streamed_shards_of_two_ranks_make_up_each_batch(photos, monkeypatch):
    # under --nproc each rank decodes only its share of a batch: together, the whole batch
    monkeypatch.setattr(files, "SMALL_IMAGES", 5)
    ds = load_dataset("imagefolder", photos, image_size=16, workers=0, seed=3)
    make = lambda shard: loader_for(ds, ds.train, 5, train=True, device=torch.device("cpu"), seed=3,  # noqa: E731
                                    workers=1, shard=shard)
    whole = list(make(None).epoch(2, 1))
    ranks = [list(make((rank, 2)).epoch(2, 1)) for rank in (0, 1)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == len(ds.train) // 5 - 1
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *ranks):
        assert (len(y0), len(y1)) == (2, 3)
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_default_workers_share_the_cores_between_training_processes(monkeypatch):
    from densekit.data import streaming

    monkeypatch.setattr(streaming.os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    assert [streaming.default_workers(n) for n in (1, 2, 3, 12, 24)] == [8, 6, 4, 1, 1]


def _cut(path, keep: int = 300) -> str:
    """Cut a PNG after its header: listed as an image, it fails when decoded (libjpeg would
    decode a cut JPEG, grayed, so PNG)."""
    assert os.path.getsize(path) > keep  # else nothing is cut
    with open(path, "r+b") as f:
        f.truncate(keep)
    return str(path)


def test_training_replaces_a_file_that_does_not_decode_and_keeps_every_batch(photos, monkeypatch, caplog):
    monkeypatch.setattr(files, "SMALL_IMAGES", 5)
    ds = load_dataset("imagefolder", photos, image_size=16, workers=0, val_fraction=0.0)
    bad = _cut(next(p for p in ds.train.paths if p.endswith(".png")))
    batches = list(loader_for(ds, ds.train, 1, train=True, device=torch.device("cpu"), workers=1,
                              skip_bad_images=True).epoch(0))
    # every step is taken, each with one image: the bad file's place goes to the next that decodes
    assert len(batches) == len(ds.train) and all(len(y) == 1 for _, y in batches)
    assert f"skipping {bad}" in caplog.text and "takes its place" in caplog.text
    with pytest.raises(DataError, match="skip_bad_images"):
        list(loader_for(ds, ds.train, 1, train=True, device=torch.device("cpu"), workers=0).epoch(0))


def test_streamed_draws_leave_the_global_generator_alone(photos, monkeypatch):
    # dropout draws from the global generator: decoding in this process (workers=0) or in
    # workers, one epoch or a resumed one, must not move it
    monkeypatch.setattr(files, "SMALL_IMAGES", 5)
    ds = load_dataset("imagefolder", photos, image_size=16, workers=0)
    states = []
    for workers, start in ((0, 0), (1, 0), (1, 1)):
        torch.manual_seed(123)
        list(loader_for(ds, ds.train, 2, train=True, device=torch.device("cpu"), workers=workers).epoch(0, start))
        states.append(torch.get_rng_state())
    assert all(torch.equal(states[0], s) for s in states[1:])


def test_a_short_last_batch_leaves_some_ranks_without_images(photos, monkeypatch):
    monkeypatch.setattr(files, "SMALL_IMAGES", 5)
    ds = load_dataset("imagefolder", photos, image_size=16, workers=0)
    rank = [[len(y) for _, y in loader_for(ds, ds.test, 3, train=False, device=torch.device("cpu"), workers=0,
                                           shard=(r, 4))] for r in range(4)]
    # 4 test images in batches of 3 and 1, shared by 4 ranks: empty shares are no batches
    assert rank == [[], [1], [1], [1, 1]]


def test_no_readable_training_image_is_one_line(tmp_path, write_image, solid_image, monkeypatch):
    for cls in ("a", "b"):
        for i in range(2):
            path = write_image(tmp_path / "train" / cls / f"{i}.png", solid_image(20, 20, 40 * i + 10))
            _cut(path, keep=40)  # the IHDR chunk (the size) is whole; the pixels are gone
    for stream in (False, True):
        with pytest.raises(DataError, match="none of .*training images"):
            load_dataset("imagefolder", tmp_path, image_size=16, workers=0, skip_bad_images=True, stream=stream)


def test_the_choice_of_path_can_be_forced(photos):
    assert load_dataset("imagefolder", photos, image_size=16, workers=0, stream=True).streaming
    assert not load_dataset("imagefolder", photos, image_size=16, workers=0, stream=False).streaming


def test_unaugmented_streamed_training_frames_images_as_evaluation_does(photos, monkeypatch):
    # a linear probe's recipe: no random crop (crop_scale None) and no flips, so a training
    # batch holds each image exactly as evaluation sees it; flips alone mirror some of them
    monkeypatch.setattr(files, "SMALL_IMAGES", 5)
    ds = load_dataset("imagefolder", photos, image_size=16, workers=0, val_fraction=0.0)
    plain = Augment(hflip=False, crop_scale=None)
    x, y = next(iter(loader_for(ds, ds.train, 12, train=True, device=torch.device("cpu"), workers=0, augment=plain,
                                seed=4)))
    evaluated = torch.cat([b for b, _ in loader_for(ds, ds.train, 12, train=False, device=torch.device("cpu"),
                                                    workers=0)])
    keys = loader_for(ds, ds.train, 12, train=True, device=torch.device("cpu"), workers=0, seed=4)._keys(0, 0)[0]
    torch.testing.assert_close(x, evaluated[[i for i, _ in keys]])
    flipped, _ = next(iter(loader_for(ds, ds.train, 12, train=True, device=torch.device("cpu"), workers=0,
                                      augment=Augment(hflip=True, crop_scale=None), seed=4)))
    mirrored = [torch.equal(a, b.flip(-1)) and not torch.equal(a, b) for a, b in zip(flipped, x)]
    same = [torch.equal(a, b) for a, b in zip(flipped, x)]
    assert all(m or s for m, s in zip(mirrored, same)) and any(mirrored) and any(same)
