"""Write an image folder of photo-sized JPEGs made from Fashion-MNIST, for measuring how
densekit trains on collections too large to decode into memory.

    python bench/photo_folder.py DIR [--images 20000] [--min-side 256] [--max-side 384]

Fashion-MNIST is the one real image dataset on the benchmark machines; its 28x28 images are
enlarged (bicubic) to a random width and height in [min-side, max-side] (so aspect ratios
vary, as photos' do), tinted with a random colour so that the files are RGB, and saved as
JPEG (quality 90) in DIR/train/<class>/. The first ``--images`` training images are used.
Decoded at the default sizes, 20,000 of them take about 6 GB; on disk about 0.3 GB.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _write(job: tuple[Path, np.ndarray, int, int, tuple[int, int, int]]) -> int:
    path, pixels, width, height, tint = job
    big = Image.fromarray(pixels).resize((width, height), Image.BICUBIC)
    rgb = np.asarray(big, dtype=np.float32)[..., None] * (np.array(tint, np.float32) / 255)
    Image.fromarray(rgb.astype(np.uint8)).save(path, quality=90)
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the folder to write (must not exist)")
    p.add_argument("--images", type=int, default=20_000, help="how many images (default: 20000)")
    p.add_argument("--min-side", type=int, default=256, help="smallest width or height (default: 256)")
    p.add_argument("--max-side", type=int, default=384, help="largest width or height (default: 384)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.out.exists():
        print(f"photo_folder.py: {args.out} exists; give a new folder", file=sys.stderr)
        return 2
    from densekit.data import load_dataset

    data = load_dataset("fashion-mnist", val_fraction=0.0)
    images, labels = data.train.images[:args.images, 0].numpy(), data.train.labels[:args.images].numpy()
    rng = np.random.default_rng(args.seed)
    sides = rng.integers(args.min_side, args.max_side + 1, (len(images), 2))
    tints = rng.integers(128, 256, (len(images), 3))
    for name in data.classes:
        (args.out / "train" / name.replace("/", "-")).mkdir(parents=True)
    jobs = [(args.out / "train" / data.classes[int(y)].replace("/", "-") / f"{i:05d}.jpg", x, int(w), int(h),
             tuple(int(c) for c in t)) for i, (x, y, (w, h), t) in enumerate(zip(images, labels, sides, tints))]
    start = time.perf_counter()
    with multiprocessing.Pool(len(os.sched_getaffinity(0))) as pool:
        size = sum(pool.imap_unordered(_write, jobs, chunksize=64))
    decoded = int((sides[:, 0] * sides[:, 1]).sum()) * 3
    print(f"wrote {len(jobs)} JPEGs to {args.out} in {time.perf_counter() - start:.0f} s: {size / 2**30:.2f} GiB on "
          f"disk, {decoded / 2**30:.2f} GiB decoded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
