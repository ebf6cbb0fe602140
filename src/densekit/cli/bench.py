"""``densekit bench``: densekit against torchvision, side by side in one run (JSON + markdown)."""

from __future__ import annotations

import time
from pathlib import Path

from ..bench import QUICK, BenchSpec, build_report, load_report, run_bench, to_markdown, write_report
from ..bench.env import default_out, environment
from ..bench.spec import DEVICES, DTYPES, IMPLS, LAYOUTS, MODES
from ..errors import UserError

# the benchmark spec's names for what the flags give
ALIASES = {"batch_sizes": "--batch-size", "input_sizes": "--input-size", "models": "--models"}


def add_arguments(p) -> None:
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help="registered names, or densenet_bc_<L>_k<K> for any CIFAR depth (default: densenet_bc_100_k12)")
    p.add_argument("--depths", nargs="+", type=int, metavar="L",
                   help="run each CIFAR model at these depths L (the memory-against-depth sweep and its linear fit)")
    p.add_argument("--batch-size", nargs="+", type=int, metavar="N", help="default: 64")
    p.add_argument("--input-size", nargs="+", type=int, metavar="PX", help="square input side (default: the model's)")
    p.add_argument("--in-chans", type=int, metavar="C", help="input channels (default: the model's, 3)")
    p.add_argument("--dtype", nargs="+", choices=DTYPES, help="bf16 runs under torch.autocast (default: fp32)")
    p.add_argument("--layout", nargs="+", choices=LAYOUTS, help="memory format of model and input (default: nchw)")
    p.add_argument("--device", nargs="+", choices=DEVICES, help="default: auto (cuda when present)")
    p.add_argument("--mode", nargs="+", choices=MODES, help="training steps and/or inference (default: both)")
    p.add_argument("--impl", nargs="+", choices=IMPLS,
                   help="implementations to compare; ratios are against torchvision in the same dtype and layout, "
                        "and each side's fastest configuration against the other's (default: densekit torchvision)")
    p.add_argument("--steps", type=int, help="timed steps per round (default: 20)")
    p.add_argument("--warmup", type=int, help="untimed steps before them (default: 3)")
    p.add_argument("--rounds", type=int, help="alternating rounds per case; their steps are pooled (default: 2)")
    p.add_argument("--quick", action="store_true",
                   help=f"a tiny run for tests: {QUICK['models'][0]}, batch {QUICK['batch_sizes'][0]}, "
                        f"{QUICK['input_sizes'][0]} px, {QUICK['steps']} steps (explicit flags still win)")
    p.add_argument("--in-process", action="store_true",
                   help="run CPU configurations in this process: faster, but their peak RSS is not measured")
    p.add_argument("--out", metavar="FILE.json",
                   help="results (default: bench/results/<card>-torch<X.Y>.json, or with a time stamp if that "
                        "exists; none for --quick)")
    p.add_argument("--md", metavar="FILE.md", help="also write the markdown table here")
    p.add_argument("--append", action="store_true",
                   help="add to the results already in --out (same card and versions) and recompute the tables")
    p.add_argument("--render", metavar="FILE.json",
                   help="print (and with --md write) the tables of existing results, recomputed from their rounds; run nothing")


def _spec(args) -> BenchSpec:
    given = dict(models=args.models, batch_sizes=args.batch_size, input_sizes=args.input_size,
                 in_chans=args.in_chans, dtypes=args.dtype, layouts=args.layout, devices=args.device,
                 modes=args.mode, impls=args.impl, depths=args.depths, steps=args.steps, warmup=args.warmup,
                 rounds=args.rounds, subprocess=False if args.in_process else None)
    # --quick replaces BenchSpec's defaults; flags given explicitly win over both.
    return BenchSpec(**{**(QUICK if args.quick else {}), **{k: v for k, v in given.items() if v is not None}})


def run(args) -> int:
    if args.render:
        # Recomputed from the raw rounds, so the table follows the current rules (fits, targets).
        old = load_report(args.render)
        report = build_report(old["runs"], old["env"], old["commands"])
        write_report(report, md=args.md)
        print(to_markdown(report), end="")
        return 0
    spec = _spec(args)
    out = args.out
    if out is None and not args.quick:
        # Never overwrite the results the docs quote by accident: --out or --append says so.
        out = default_out(environment(), spec.devices)
        if out.exists() and not args.append:
            out = out.with_name(f"{out.stem}-{time.strftime('%Y%m%d-%H%M%S')}{out.suffix}")
    if args.append and out is None:
        raise UserError("--append needs --out FILE.json, the results to add to")
    if args.append and not Path(out).exists():
        raise UserError(f"--append: no results at {out} to append to")
    report = run_bench(spec, previous=load_report(out) if args.append else None)
    write_report(report, out=out, md=args.md)
    print(to_markdown(report), end="")
    # Figures are written either way; a crashed implementation still fails the command.
    return 1 if any(r["status"] == "error" for r in report["runs"]) else 0
