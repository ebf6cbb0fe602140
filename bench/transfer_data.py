"""Write the real-image datasets for measuring transfer learning and multi-label training on a
CPU: Fashion-MNIST rearranged three ways.

    python bench/transfer_data.py mosaics OUT [--train 1000] [--val 500] [--test 2000] [--empty 0.5]
    python bench/transfer_data.py split-classes OUT --classes 0-4 [--per-class N | --train N] [--val N] [--test-all]
    python bench/transfer_data.py photos OUT [--classes 7] [--train 70] [--test 35] [--size 224]

Fashion-MNIST is the one real image dataset on the benchmark machines, so each task that needs
a different shape of data is built from it:

``mosaics`` (multi-label, in ChestX-ray14's CSV layout)
    56x56 grayscale PNGs in OUT/images/, each a 2x2 grid whose quadrants are independently a
    Fashion-MNIST image (probability 1 - ``--empty``) or black. An image's labels are the set
    of classes it shows (a class shown twice counts once). OUT/train.csv, OUT/val.csv and
    OUT/test.csv have ChestX-ray14's two label columns: "Image Index" (the file, relative to
    OUT) and "Finding Labels" (class names, sorted, joined by "|"; "No Finding" when all four
    quadrants are black). Class names are kept as they are ("T-shirt/top"): "|" is the only
    separator, and no name contains one. Test mosaics use only Fashion-MNIST's test images.
    Train and val mosaics draw from disjoint parts of its training images (split in
    proportion to --train and --val), so that no garment seen in training is scored in
    validation; within a part every image is used once before any is used again. A split
    asked for 0 images gets no CSV.

``split-classes`` (transfer between disjoint label sets)
    An image folder (OUT/train/<class>/, OUT/val/<class>/, OUT/test/<class>/) of the chosen
    classes only, as 28 px grayscale PNGs named by their Fashion-MNIST index, so that a model
    trained on classes 0-4 can be fine-tuned on 5-9. ``--per-class N`` or ``--train N`` (in
    total, balanced across the classes) limits the training images, as a few-label transfer
    run needs; ``--val N`` (also balanced) comes from the training images not taken, and
    ``--test-all`` writes every test image of those classes. A split not asked for gets no
    folder (densekit then holds out part of train for validation). Each class's images are
    drawn by its own generator seeded by (--seed, class), so class 5 gets the same images
    whether it is asked for alone or with others.

``photos`` (fine-tuning an ImageNet-sized model)
    An image folder (OUT/train/<class>/, OUT/test/<class>/) of RGB JPEGs (quality 90) of the
    first ``--classes`` classes, enlarged (bicubic) to ``--size`` px and tinted with a random
    colour, as photos are: a densenet121 fine-tune at 224 px on a slow CPU needs a few dozen
    such images, not 60,000. Counts are totals, balanced across the classes.

Class folder names replace "/" with "-" ("T-shirt-top"). Every random choice is made up front
from ``--seed`` and PNG/JPEG encoding is deterministic, so the same arguments write identical
bytes; encoding is spread over the CPU cores. An existing OUT is refused (exit code 2).
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 28  # a Fashion-MNIST image's side in pixels
NO_FINDING = "No Finding"  # ChestX-ray14's label for an image with no finding
SEPARATOR = "|"  # ChestX-ray14's separator between labels


class TooFew(ValueError):
    """More images asked of a class than Fashion-MNIST has."""


@dataclass(frozen=True)
class Job:
    """One file to write: its pixels (2-D gray) and, for photos, the size and tint."""

    path: Path
    pixels: np.ndarray
    size: int | None = None
    tint: tuple[int, int, int] | None = None


def _write(job: Job) -> int:
    image = Image.fromarray(job.pixels)
    if job.tint is None:
        image.save(job.path)
        return job.path.stat().st_size
    big = image.resize((job.size, job.size), Image.BICUBIC)
    rgb = np.asarray(big, dtype=np.float32)[..., None] * (np.array(job.tint, np.float32) / 255)
    Image.fromarray(rgb.astype(np.uint8)).save(job.path, quality=90)
    return job.path.stat().st_size


def _encode(jobs: Sequence[Job]) -> int:
    """Write every job over the CPU cores; the bytes on disk."""
    with multiprocessing.Pool(len(os.sched_getaffinity(0))) as pool:
        return sum(pool.imap_unordered(_write, jobs, chunksize=max(1, min(256, len(jobs) // 64))))


def _folder_name(name: str) -> str:
    # "T-shirt/top" would otherwise be a folder "T-shirt" with a subfolder "top".
    return name.replace("/", "-")


def _fashion_mnist():
    from densekit.data import load_dataset

    return load_dataset("fashion-mnist", val_fraction=0.0)


def _arrays(split) -> tuple[np.ndarray, np.ndarray]:
    return split.images[:, 0].numpy(), split.labels.numpy()


def _quotas(total: int, n_classes: int) -> list[int]:
    """``total`` split as evenly as possible over the classes, the first ones taking the remainder."""
    return [total // n_classes + (i < total % n_classes) for i in range(n_classes)]


def _parse_classes(text: str) -> list[int]:
    """"0-4" -> [0, 1, 2, 3, 4]; "5,6,9" -> [5, 6, 9]; indices into Fashion-MNIST's 10 classes."""
    try:
        if "-" in text:
            first, last = (int(part) for part in text.split("-"))
            classes = list(range(first, last + 1))
        else:
            classes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a range like 0-4 or a list like 5,6,7; got {text!r}") from None
    if not classes or any(not 0 <= c <= 9 for c in classes) or len(set(classes)) != len(classes):
        raise argparse.ArgumentTypeError(f"expected distinct class indices in 0..9, got {text!r}")
    return classes


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {value}")
    return value


# --- mosaics ---------------------------------------------------------------------------------


def _draw(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices from ``pool``, each used once before any is used again."""
    rounds = -(-n // len(pool)) if n else 0
    return np.concatenate([rng.permutation(pool) for _ in range(rounds)] or [pool[:0]])[:n]


def _mosaics(images: np.ndarray, labels: np.ndarray, pool: np.ndarray, n: int, empty: float,
             rng: np.random.Generator) -> tuple[np.ndarray, list[set[int]]]:
    """``n`` 2x2 mosaics (n, 56, 56) of images from ``pool`` and the set of classes in each."""
    shown = rng.random((n, 4)) >= empty
    picked = _draw(pool, int(shown.sum()), rng)
    quadrants = np.zeros((n, 4, SIDE, SIDE), np.uint8)
    quadrants[shown] = images[picked]
    item_class = np.full((n, 4), -1)
    item_class[shown] = labels[picked]
    grid = quadrants.reshape(n, 2, 2, SIDE, SIDE).transpose(0, 1, 3, 2, 4).reshape(n, 2 * SIDE, 2 * SIDE)
    return grid, [{int(c) for c in row if c >= 0} for row in item_class]


def _finding_labels(present: set[int], classes: list[str]) -> str:
    return SEPARATOR.join(sorted(classes[c] for c in present)) or NO_FINDING


def _label_frequency(name: str, sets: list[set[int]], classes: list[str]) -> str:
    counts = [sum(c in s for s in sets) for c in range(len(classes))] + [sum(not s for s in sets)]
    parts = [f"{label} {k} ({100 * k / len(sets):.1f}%)" for label, k in zip([*classes, NO_FINDING], counts)]
    mean = sum(len(s) for s in sets) / len(sets)
    return f"  {name} ({len(sets)} images, {mean:.2f} labels each): " + ", ".join(parts)


def mosaics(args: argparse.Namespace) -> int:
    data = _fashion_mnist()
    classes = data.classes
    assert not any(SEPARATOR in c or c == NO_FINDING for c in classes), classes
    train_images, train_labels = _arrays(data.train)
    test_images, test_labels = _arrays(data.test)
    rng = np.random.default_rng(args.seed)
    # Train and val share Fashion-MNIST's training images; disjoint parts keep val unseen.
    order = rng.permutation(len(train_images))
    n_val_pool = round(len(order) * args.val / (args.train + args.val)) if args.val else 0
    pools = {"train": (train_images, train_labels, order[n_val_pool:], args.train),
             "val": (train_images, train_labels, order[:n_val_pool], args.val),
             "test": (test_images, test_labels, np.arange(len(test_images)), args.test)}
    digits = max(5, len(str(args.train + args.val + args.test)))
    (args.out / "images").mkdir(parents=True)
    jobs, number = [], 0
    print(f"mosaics in {args.out}, label frequency:")
    for split, (images, labels, pool, n) in pools.items():
        if n == 0:
            continue
        grids, sets = _mosaics(images, labels, pool, n, args.empty, rng)
        names = [f"images/{number + i + 1:0{digits}d}.png" for i in range(n)]
        number += n
        jobs += [Job(args.out / name, grid) for name, grid in zip(names, grids)]
        with open(args.out / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["Image Index", "Finding Labels"])
            writer.writerows([name, _finding_labels(s, classes)] for name, s in zip(names, sets))
        print(_label_frequency(split, sets, classes))
    size = _encode(jobs)
    print(f"wrote {len(jobs)} PNGs ({2 * SIDE}x{2 * SIDE} gray, {size / 2**20:.1f} MiB) and "
          f"{sum(n > 0 for *_, n in pools.values())} CSVs to {args.out} in {time.perf_counter() - args.start:.1f} s")
    return 0


# --- split-classes and photos: image folders ----------------------------------------------------


def _pick(labels: np.ndarray, classes: list[int], take: list[int | None], seed: int) -> list[list[np.ndarray]]:
    """For each class, indices of its images for each count in ``take`` (None: all not
    otherwise taken), disjoint; the first count comes from the front of a shuffle seeded by
    (seed, class), the others from its back, so that changing one count leaves the others' picks
    as they were."""
    picks = []
    for c, *counts in zip(classes, *take):
        shuffled = np.random.default_rng([seed, c]).permutation(np.flatnonzero(labels == c))
        rest = sum(k for k in counts[1:] if k is not None)
        first = len(shuffled) - rest if counts[0] is None else counts[0]
        if first + rest > len(shuffled):
            raise TooFew(f"class {c} has {len(shuffled)} images, {first + rest} asked for")
        parts, end = [shuffled[:first]], len(shuffled)
        for k in counts[1:]:
            parts.append(shuffled[end - k:end])
            end -= k
        picks.append(parts)
    return picks


def _folder_jobs(out: Path, split: str, names: list[str], images: np.ndarray, indices: list[np.ndarray],
                 suffix: str) -> list[Job]:
    jobs = []
    for name, chosen in zip(names, indices):
        folder = out / split / _folder_name(name)
        folder.mkdir(parents=True)
        jobs += [Job(folder / f"{i:05d}{suffix}", images[i]) for i in sorted(chosen)]
    return jobs


def split_classes(args: argparse.Namespace) -> int:
    data = _fashion_mnist()
    train_images, train_labels = _arrays(data.train)
    test_images, test_labels = _arrays(data.test)
    k = len(args.classes)
    if args.per_class is not None:
        train_take = [args.per_class] * k
    elif args.train is not None:
        train_take = _quotas(args.train, k)
    else:
        train_take = [None] * k
    picks = _pick(train_labels, args.classes, [train_take, _quotas(args.val, k)], args.seed)
    names = [data.classes[c] for c in args.classes]
    splits = {"train": _folder_jobs(args.out, "train", names, train_images, [p[0] for p in picks], ".png")}
    if args.val:
        splits["val"] = _folder_jobs(args.out, "val", names, train_images, [p[1] for p in picks], ".png")
    if args.test_all:
        splits["test"] = _folder_jobs(args.out, "test", names, test_images,
                                      [np.flatnonzero(test_labels == c) for c in args.classes], ".png")
    size = _encode([job for jobs in splits.values() for job in jobs])
    _print_folder(args, splits, names, size, f"{SIDE} px gray PNGs")
    return 0


def photos(args: argparse.Namespace) -> int:
    data = _fashion_mnist()
    train_images, train_labels = _arrays(data.train)
    test_images, test_labels = _arrays(data.test)
    classes = list(range(args.classes))
    names = [data.classes[c] for c in classes]
    train_picks = _pick(train_labels, classes, [_quotas(args.train, args.classes)], args.seed)
    test_picks = _pick(test_labels, classes, [_quotas(args.test, args.classes)], args.seed)
    splits = {"train": _folder_jobs(args.out, "train", names, train_images, [p[0] for p in train_picks], ".jpg")}
    if args.test:
        splits["test"] = _folder_jobs(args.out, "test", names, test_images, [p[0] for p in test_picks], ".jpg")
    rng = np.random.default_rng(args.seed)
    for jobs in splits.values():
        tints = rng.integers(128, 256, (len(jobs), 3))
        jobs[:] = [Job(j.path, j.pixels, args.size, tuple(int(t) for t in tint)) for j, tint in zip(jobs, tints)]
    size = _encode([job for jobs in splits.values() for job in jobs])
    _print_folder(args, splits, names, size, f"{args.size} px RGB JPEGs")
    return 0


def _print_folder(args: argparse.Namespace, splits: dict[str, list[Job]], names: list[str], size: int,
                  kind: str) -> None:
    total = sum(len(jobs) for jobs in splits.values())
    print(f"wrote {total} {kind} ({size / 2**20:.1f} MiB) to {args.out} in {time.perf_counter() - args.start:.1f} s:")
    for split, jobs in splits.items():
        per_class = [sum(j.path.parent.name == _folder_name(n) for j in jobs) for n in names]
        print(f"  {split}: {len(jobs)} (" + ", ".join(f"{n} {k}" for n, k in zip(names, per_class)) + ")")


# --- command line -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mosaics", help="2x2 multi-label mosaics and ChestX-ray14-style CSVs")
    m.add_argument("out", type=Path, help="the folder to write (must not exist)")
    m.add_argument("--train", type=_count, default=1000, help="training mosaics (default: 1000)")
    m.add_argument("--val", type=_count, default=500, help="validation mosaics (default: 500)")
    m.add_argument("--test", type=_count, default=2000, help="test mosaics, from test images only (default: 2000)")
    m.add_argument("--empty", type=_probability, default=0.5,
                   help="probability that a quadrant is black (default: 0.5)")
    m.set_defaults(run=mosaics)

    s = sub.add_parser("split-classes", help="an image folder of some of the classes, for transfer")
    s.add_argument("out", type=Path, help="the folder to write (must not exist)")
    s.add_argument("--classes", type=_parse_classes, required=True,
                   help="class indices: a range (0-4) or a list (5,6,7,8,9)")
    limit = s.add_mutually_exclusive_group()
    limit.add_argument("--per-class", type=_count, help="training images per class (default: all not in val)")
    limit.add_argument("--train", type=_count, help="training images in total, balanced over the classes")
    s.add_argument("--val", type=_count, default=0,
                   help="validation images in total, balanced, from training images not taken (default: 0, "
                        "no val folder)")
    s.add_argument("--test-all", action="store_true", help="write every test image of the classes to test/")
    s.set_defaults(run=split_classes)

    f = sub.add_parser("photos", help="a small folder of photo-sized RGB JPEGs, for fine-tuning")
    f.add_argument("out", type=Path, help="the folder to write (must not exist)")
    f.add_argument("--classes", type=int, choices=range(1, 11), default=7, metavar="N",
                   help="use the first N classes, 1..10 (default: 7)")
    f.add_argument("--train", type=_count, default=70, help="training images in total, balanced (default: 70)")
    f.add_argument("--test", type=_count, default=35, help="test images in total, balanced (default: 35)")
    f.add_argument("--size", type=int, default=224, help="width and height in pixels (default: 224)")
    f.set_defaults(run=photos)

    for command in (m, s, f):
        command.add_argument("--seed", type=int, default=0, help="the same seed writes the same bytes (default: 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.command == "mosaics" and args.train == 0:
        p.error("mosaics: --train must be at least 1")
    if args.command == "photos" and args.size < 1:
        p.error(f"photos: --size must be at least 1, got {args.size}")
    n_classes = args.classes if args.command == "photos" else len(getattr(args, "classes", ()))
    if args.command != "mosaics" and (getattr(args, "per_class", None) == 0 or
                                      args.train is not None and args.train < n_classes):
        p.error(f"{args.command}: the training split needs at least one image per class ({n_classes} classes)")
    if args.out.exists():
        print(f"transfer_data.py: {args.out} exists; give a new folder", file=sys.stderr)
        return 2
    args.start = time.perf_counter()
    try:
        return args.run(args)
    except TooFew as e:  # raised before anything is written
        print(f"transfer_data.py {args.command}: {e}; ask for fewer", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
