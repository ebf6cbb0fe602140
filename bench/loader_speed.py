"""How fast densekit's loader delivers training batches from an image folder, alone (no model):
decoding and augmentation (random resized crop, flip) in DataLoader worker processes.

    python bench/loader_speed.py DIR [--image-size 224] [--workers 2] [--batch-size 32] [--batches 60]

Prints one JSON object: images/s over the timed batches (the first batch, which waits for the
workers to start, is not timed), and the listing time (headers of every file, the statistics
of a sample), which is what a training run pays before its first step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=60, help="timed batches (default: 60)")
    args = p.parse_args(argv)
    from densekit.data import load_dataset, loader_for

    start = time.perf_counter()
    data = load_dataset("imagefolder", args.data_dir, image_size=args.image_size, workers=args.workers)
    listed = time.perf_counter() - start
    loader = loader_for(data, data.train, args.batch_size, train=True, device=torch.device("cpu"),
                        workers=args.workers)
    batches = iter(loader.epoch(0))
    start = time.perf_counter()
    next(batches)
    first = time.perf_counter() - start
    start, images = time.perf_counter(), 0
    for _, (x, _) in zip(range(args.batches), batches):
        images += len(x)
    seconds = time.perf_counter() - start
    print(json.dumps(dict(data_dir=args.data_dir, streaming=data.streaming, train_images=len(data.train),
                          image_size=args.image_size, workers=args.workers, batch_size=args.batch_size,
                          listing_seconds=round(listed, 2), first_batch_seconds=round(first, 2),
                          timed_images=images, images_per_second=round(images / seconds, 1))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
