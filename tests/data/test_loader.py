"""DeviceLoader and Augment: batching, normalization, determinism, resume, and the
batched crop/flip checked against hand-computed images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from densekit.data import Augment, DeviceLoader, Split
from densekit.data.core import channel_stats
from densekit.data.loader import crop_flip, erase_squares


def make_split(n=10, c=2, h=4, w=5, seed=0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(
        images=torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8),
        labels=torch.arange(n, dtype=torch.int64),
    )


def loader(split, batch_size=4, **kw) -> DeviceLoader:
    mean, std = channel_stats(split.images)
    return DeviceLoader(split, batch_size, mean=mean, std=std, **kw)


def collect(batches):
    return [(x.clone(), y.clone()) for x, y in batches]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_batches_shapes_and_count():
    split = make_split()
    ld = loader(split)
    batches = collect(ld)
    assert len(ld) == 3 and len(batches) == 3
    assert [tuple(x.shape) for x, _ in batches] == [(4, 2, 4, 5), (4, 2, 4, 5), (2, 2, 4, 5)]
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in batches)
    assert torch.cat([y for _, y in batches]).tolist() == list(range(10))


def test_drop_last():
    split = make_split()
    ld = loader(split, drop_last=True)
    assert len(ld) == 2
    assert [y.tolist() for _, y in ld] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len(loader(split, batch_size=11, drop_last=True)) == 0
    assert list(loader(split, batch_size=11, drop_last=True).epoch(0)) == []
    assert len(loader(split, batch_size=5, drop_last=True)) == 2
    assert len(loader(split, batch_size=11)) == 1


def test_normalization_values():
    split = make_split(n=50, c=3)
    mean, std = channel_stats(split.images)
    x = torch.cat([x for x, _ in loader(split, batch_size=7)])
    assert x.mean(dim=(0, 2, 3)).tolist() == pytest.approx([0.0] * 3, abs=1e-5)
    assert x.std(dim=(0, 2, 3), unbiased=False).tolist() == pytest.approx([1.0] * 3, abs=1e-5)
    expected = (split.images.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(x.double(), expected, atol=1e-5)


def test_explicit_mean_std():
    split = Split(images=torch.full((2, 1, 2, 2), 51, dtype=torch.uint8), labels=torch.zeros(2, dtype=torch.int64))
    (x, _), = DeviceLoader(split, 2, mean=(0.1,), std=(0.5,))
    assert torch.allclose(x, torch.full_like(x, (0.2 - 0.1) / 0.5))


def test_shuffle_is_deterministic_per_seed_and_epoch():
    split = make_split(n=20)
    a = collect(loader(split, shuffle=True, seed=3).epoch(5))
    b = collect(loader(split, shuffle=True, seed=3).epoch(5))
    assert same(a, b)
    order = torch.cat([y for _, y in a])
    assert sorted(order.tolist()) == list(range(20)) and order.tolist() != list(range(20))
    other_epoch = torch.cat([y for _, y in loader(split, shuffle=True, seed=3).epoch(6)])
    other_seed = torch.cat([y for _, y in loader(split, shuffle=True, seed=4).epoch(5)])
    assert other_epoch.tolist() != order.tolist() and other_seed.tolist() != order.tolist()
    # images travel with their labels
    mean, std = channel_stats(split.images)
    for x, y in a:
        (expected, _), = DeviceLoader(Split(split.images[y], y), len(y), mean=mean, std=std)
        assert torch.equal(x, expected)


def test_epoch_draws_do_not_depend_on_global_rng():
    split = make_split(n=16)
    kw = dict(shuffle=True, augment=Augment(crop_padding=2, hflip=True), seed=1)
    torch.manual_seed(0)
    a = collect(loader(split, **kw).epoch(2))
    torch.manual_seed(12345)
    torch.rand(100)
    b = collect(loader(split, **kw).epoch(2))
    assert same(a, b)


@pytest.mark.parametrize("augment", [None, Augment(crop_padding=2, hflip=True),
                                     Augment(crop_padding=1, hflip=True, erase=2)])
@pytest.mark.parametrize("start", [0, 1, 3, 5])
def test_resume_from_start_step(augment, start):
    split = make_split(n=18)
    ld = loader(split, batch_size=4, shuffle=True, augment=augment, seed=7)
    full = collect(ld.epoch(3))
    assert len(full) == 5
    # a fresh loader, as after a restart
    resumed = collect(loader(split, batch_size=4, shuffle=True, augment=augment, seed=7).epoch(3, start_step=start))
    assert same(resumed, full[start:])


def test_start_step_and_epoch_validation():
    ld = loader(make_split())
    for bad in (-1, 4, 1.0):
        with pytest.raises(ValueError, match="start_step"):
            ld.epoch(0, start_step=bad)
    with pytest.raises(ValueError, match="epoch"):
        ld.epoch(-1)


def test_iter_is_epoch_zero():
    split = make_split(n=12)
    ld = loader(split, shuffle=True, augment=Augment(crop_padding=1, hflip=True), seed=9)
    assert same(collect(ld), collect(ld.epoch(0)))
    assert not same(collect(ld), collect(ld.epoch(1)))


# --- the augmentation itself ---------------------------------------------------------

IMG = torch.tensor([[1, 2, 3],
                    [4, 5, 6],
                    [7, 8, 9]], dtype=torch.uint8).view(1, 1, 3, 3)


@pytest.mark.parametrize("offset, flip, expected", [
    ((1, 1), False, [[1, 2, 3], [4, 5, 6], [7, 8, 9]]),   # centre: the image itself
    ((0, 0), False, [[0, 0, 0], [0, 1, 2], [0, 4, 5]]),   # window at top-left: image moves down-right
    ((2, 1), False, [[4, 5, 6], [7, 8, 9], [0, 0, 0]]),   # window at the bottom: image moves up
    ((1, 2), False, [[2, 3, 0], [5, 6, 0], [8, 9, 0]]),   # window at the right: image moves left
    ((1, 1), True, [[3, 2, 1], [6, 5, 4], [9, 8, 7]]),    # flip only
    ((0, 2), True, [[0, 0, 0], [0, 3, 2], [0, 6, 5]]),    # window at top-right, then mirrored
])
def test_crop_flip_by_hand(offset, flip, expected):
    out = crop_flip(IMG, 1, torch.tensor([offset]), torch.tensor([flip]))
    assert out[0, 0].tolist() == expected


def test_crop_flip_per_sample_and_channel():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.uint8).view(2, 3, 4, 5)
    offsets = torch.tensor([[0, 3], [2, 1]])
    flips = torch.tensor([True, False])
    out = crop_flip(x, 2, offsets, flips)
    padded = F.pad(x, (2, 2, 2, 2))
    assert torch.equal(out[0], padded[0, :, 0:4, 3:8].flip(-1))
    assert torch.equal(out[1], padded[1, :, 2:6, 1:6])
    assert torch.equal(crop_flip(x, 0, None, flips), torch.stack([x[0].flip(-1), x[1]]))
    assert torch.equal(crop_flip(x, 2, offsets, None), torch.stack([padded[0, :, 0:4, 3:8], padded[1, :, 2:6, 1:6]]))


def test_loader_flips_about_half_and_only_flips():
    n = 400
    img = torch.arange(12, dtype=torch.uint8).view(1, 1, 3, 4) * 20
    split = Split(images=img.expand(n, 1, 3, 4).clone(), labels=torch.zeros(n, dtype=torch.int64))
    # std 1/255 and mean 0 give back the raw pixel values
    ld = DeviceLoader(split, 64, mean=(0.0,), std=(1.0 / 255,), augment=Augment(hflip=True))
    x = torch.cat([x for x, _ in ld]).round().to(torch.uint8)
    is_plain = (x == img).flatten(1).all(1)
    is_flipped = (x == img.flip(-1)).flatten(1).all(1)
    assert bool((is_plain | is_flipped).all())
    assert 0.4 < is_flipped.float().mean().item() < 0.6


def test_loader_crops_cover_every_offset():
    n, p = 300, 2
    img = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4)
    split = Split(images=img.expand(n, 1, 4, 4).clone(), labels=torch.zeros(n, dtype=torch.int64))
    ld = DeviceLoader(split, 100, mean=(0.0,), std=(1.0 / 255,), augment=Augment(crop_padding=p))
    x = torch.cat([x for x, _ in ld]).round().to(torch.uint8)
    padded = F.pad(img, (p, p, p, p))[0, 0]
    windows = {(dy, dx): padded[dy:dy + 4, dx:dx + 4] for dy in range(2 * p + 1) for dx in range(2 * p + 1)}
    seen = set()
    for sample in x[:, 0]:
        match = [k for k, w in windows.items() if torch.equal(sample, w)]
        assert len(match) == 1
        seen.add(match[0])
    assert seen == set(windows)


def test_erase_squares_by_hand():
    x = torch.ones(2, 1, 6, 6)
    out = erase_squares(x, 3, torch.tensor([[0, 0], [3, 4]]))
    expected = torch.ones(2, 1, 6, 6)
    expected[0, 0, :2, :2] = 0  # clipped at the top-left corner
    expected[1, 0, 2:5, 3:6] = 0
    assert torch.equal(out, expected)


def test_loader_erases_one_square_per_image_and_keeps_other_draws():
    split = make_split(n=40, c=1, h=12, w=12)  # random pixels: none sits exactly at the mean
    plain = collect(loader(split, batch_size=8, shuffle=True, augment=Augment(crop_padding=1, hflip=True), seed=3))
    erased = collect(loader(split, batch_size=8, shuffle=True, augment=Augment(crop_padding=1, hflip=True, erase=4),
                            seed=3))
    for (x0, y0), (x1, y1) in zip(plain, erased):
        assert torch.equal(y0, y1)  # same order: the erase draws come after the others
        assert (x0 != 0).all()
        changed = x0 != x1
        assert (x1[changed] == 0).all()
        counts = changed.flatten(1).sum(1)
        assert (counts >= 4).all() and (counts <= 16).all()  # a 4x4 square, clipped to >= 2x2


def test_erase_keeps_channels_last():
    split = make_split(n=8, c=3, h=6, w=6)
    x, _ = next(iter(loader(split, batch_size=8, augment=Augment(erase=2), channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def test_augment_validation_and_noop():
    with pytest.raises(ValueError, match="crop_padding"):
        Augment(crop_padding=-1)
    with pytest.raises(ValueError, match="erase"):
        Augment(erase=True)
    split = make_split()
    assert same(collect(loader(split, augment=Augment())), collect(loader(split)))


def test_channels_last_and_dtype():
    split = make_split(n=6, c=3, h=5, w=5)
    ref = collect(loader(split, batch_size=3))
    cl = collect(loader(split, batch_size=3, channels_last=True))
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in cl)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(ref, cl))
    half = collect(loader(split, batch_size=3, dtype=torch.bfloat16))
    assert all(x.dtype == torch.bfloat16 for x, _ in half)
    assert all(torch.allclose(h.float(), r, atol=2e-2) for (h, _), (r, _) in zip(half, ref))
    double = collect(loader(split, batch_size=3, dtype=torch.float64))
    assert all(x.dtype == torch.float64 for x, _ in double)


@pytest.mark.parametrize("kwargs, name", [
    (dict(batch_size=0), "batch_size"),
    (dict(mean=(0.5,), std=(0.5,)), "mean and std"),
    (dict(std=(0.5, 0.0)), "std must be > 0"),
    (dict(dtype=torch.int32), "dtype"),
])
def test_argument_validation(kwargs, name):
    args = dict(batch_size=4, mean=(0.5, 0.5), std=(0.5, 0.5)) | kwargs
    with pytest.raises(ValueError, match=name):
        DeviceLoader(make_split(), args.pop("batch_size"), **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_cpu():
    split = make_split(n=40, c=3, h=8, w=8)
    kw = dict(batch_size=16, shuffle=True, augment=Augment(crop_padding=2, hflip=True), seed=5)
    cpu = collect(loader(split, **kw).epoch(1))
    gpu = collect(loader(split, device="cuda", **kw).epoch(1))
    assert all(x.device.type == "cuda" for x, _ in gpu)
    assert all(torch.equal(a, b.cpu()) and torch.equal(ya, yb.cpu()) for (a, ya), (b, yb) in zip(cpu, gpu))


@pytest.mark.parametrize("world,batch_size,drop_last", [(2, 4, True), (3, 4, False), (4, 3, False)])
def test_shards_of_all_ranks_make_up_the_batch(world, batch_size, drop_last):
    # data-parallel ranks draw the same epoch and each takes a contiguous share: put back
    # together in rank order, the shares are exactly one process's batches, augmentation included
    split = make_split(n=11, h=6, w=6)
    kw = dict(batch_size=batch_size, shuffle=True, drop_last=drop_last, seed=5,
              augment=Augment(crop_padding=2, hflip=True, erase=2))
    whole = collect(loader(split, **kw).epoch(1, 1))
    shards = [collect(loader(split, shard=(r, world), **kw).epoch(1, 1)) for r in range(world)]
    assert all(len(s) == len(whole) for s in shards)
    for i, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([s[i][0] for s in shards]), x)
        assert torch.equal(torch.cat([s[i][1] for s in shards]), y)
        sizes = [len(s[i][1]) for s in shards]
        assert max(sizes) - min(sizes) <= 1


def test_shard_is_checked_and_one_rank_is_no_shard():
    split = make_split()
    for bad in [(2, 2), (-1, 2), (0, 0), ("0", 2)]:
        with pytest.raises(ValueError, match="shard must be"):
            loader(split, shard=bad)
    assert loader(split, shard=(0, 1)).shard is None
    assert same(collect(loader(split, shard=(0, 1))), collect(loader(split)))


def test_erased_squares_cover_the_resized_batch_evenly():
    # images resized per batch (12 px -> 24 px): the squares are drawn in the batch's frame
    split = make_split(n=400, c=1, h=12, w=12)
    x = torch.cat([b for b, _ in loader(split, batch_size=100, augment=Augment(erase=4), size=(24, 24), seed=1)])
    erased = (x == 0).float().mean(0)[0]  # per pixel: how often it was erased
    quadrants = [erased[:12, :12], erased[:12, 12:], erased[12:, :12], erased[12:, 12:]]
    shares = [float(q.mean()) for q in quadrants]
    assert min(shares) > 0.6 * max(shares), shares  # was 0.107 / 0.004 / 0.004 / 0.0002 in the top-left frame
