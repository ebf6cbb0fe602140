"""``densekit prune``: network-slim a trained run into a new run directory."""

from __future__ import annotations

from ..prune import FINE_TUNE_EPOCHS, ROUND_TO, ROUND_WIDTH, UNITS
from .common import add_device_argument


def add_arguments(p) -> None:
    p.add_argument("run_dir", metavar="DIR", help="run directory written by `densekit train` (or an earlier prune)")
    p.add_argument("--amount", type=float, required=True,
                   help="fraction in [0, 1) of the prunable channels (dense layers' inputs and bottleneck widths, "
                        "and each block's outputs as its transition or the final norm reads them) "
                        "to remove, those with the smallest |BN gamma| across the network; one threshold "
                        "is placed so that what goes, in whole maps or rounded counts, comes nearest it")
    p.add_argument("--round-to", type=int, default=ROUND_TO, metavar="N",
                   help="with --unit channel, keep a multiple of N channels, its largest, in each batch norm "
                        "of a layer's inputs or a block's outputs; either way the default of --round-width "
                        "follows it (default %(default)s: onnxruntime's CPU convolutions run channels in blocks "
                        "of 8, or 16 with AVX-512; 1 keeps the exact amount)")
    p.add_argument("--round-width", type=int, metavar="N",
                   help=f"keep a multiple of N channels in each bottleneck's width, whatever the unit "
                        f"(default: --round-to's, at most {ROUND_WIDTH})")
    p.add_argument("--unit", choices=UNITS, default=UNITS[0],
                   help="what a layer's inputs and a block's outputs lose: whole maps (the block input, or one "
                        "earlier layer's new maps) where at least half of a map's channels rank below the "
                        "threshold, which the ONNX export's blocked convolutions can skip (default), or single "
                        "channels, in multiples of --round-to (at large amounts, 0.6, whole maps cost more "
                        "accuracy)")
    p.add_argument("--out", metavar="OUT", required=True, help="new run directory (must not exist or be empty)")
    p.add_argument("--data-dir", help="folder with the run's dataset, to measure the accuracy before and after "
                                      "(default: where the run read it)")
    p.add_argument("--no-speed", action="store_true",
                   help="do not measure the inference speed of both models (32 forward passes of a batch of 64)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_device_argument(p)


def summary_lines(s) -> list[str]:
    """What ``densekit prune`` prints: a PruneReport in a few lines."""
    c = s.channels
    lines = [
        f"pruned {c.removed:,} of {c.prunable:,} prunable channels ({100 * c.removed_fraction:.2f}%) "
        f"in {s.pruned_layers} dense layers and the outputs of {s.pruned_blocks} blocks of {s.model}"
        + (" (inputs and outputs in whole maps)" if s.unit == "map" else ""),
        f"parameters {s.params_before:,} -> {s.params_after:,} ({s.params_ratio:.3f}x), "
        f"MACs {s.macs_before / 1e6:.1f} M -> {s.macs_after / 1e6:.1f} M ({s.macs_ratio:.3f}x)",
        f"{s.dataset} {s.split} accuracy ({s.test_images} images) {100 * s.test_accuracy_before:.2f}% -> "
        f"{100 * s.test_accuracy_after:.2f}%",
    ]
    if s.speedup is not None:
        lines.append(f"inference on {s.device}, batch {s.speed_batch}: {s.images_per_second_before:,.0f} -> "
                     f"{s.images_per_second_after:,.0f} images/s ({s.speedup:.2f}x, median of alternating rounds)")
    if s.reference_path_blocks:
        lines.append(f"{s.reference_path_blocks} pruned dense block(s) run the reference path: they hold a module "
                     "the fused block does not take")
    lr = "" if s.fine_tune_lr is None else f" --lr {s.fine_tune_lr:.3g}"
    lines.append(f"saved in {s.out}; fine-tune with: densekit train --init {s.out} --epochs {FINE_TUNE_EPOCHS}{lr} "
                 "--out DIR")
    return lines


def run(args) -> int:
    from ..prune import prune_run

    summary = prune_run(args.run_dir, args.out, args.amount, device=args.device, data_dir=args.data_dir,
                        speed=not args.no_speed, round_to=args.round_to, round_width=args.round_width, unit=args.unit)
    print(summary.to_json() if args.json else "\n".join(summary_lines(summary)))
    return 0
