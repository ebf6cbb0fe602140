"""``densekit predict``: classify image files with a trained run, one JSON line per image (a
multi-label run's: every label's probability, and the labels at or above ``--threshold``)."""

from __future__ import annotations

from .common import add_device_argument, positive_int, probability


def add_arguments(p) -> None:
    p.add_argument("run_dir", metavar="DIR", help="run directory written by `densekit train`")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files (PNG, JPEG, ...; any size and channels)")
    p.add_argument("--top-k", type=positive_int, default=1, metavar="K",
                   help="also list the K most likely classes (default: 1)")
    p.add_argument("--threshold", type=probability, default=0.5, metavar="P",
                   help="multi-label runs: name the labels whose probability is at least P (default: 0.5); "
                        "every label's probability is printed")
    add_device_argument(p, precision=True)


def run(args) -> int:
    from ..train import predict

    for row in predict(args.run_dir, args.images, top_k=args.top_k, device=args.device,
                       threshold=args.threshold, precision=args.precision or "auto"):
        print(row.to_json(), flush=True)
    return 0
