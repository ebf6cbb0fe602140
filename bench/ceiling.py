"""How fast a model could train and infer on this CPU if its convolutions ran at the CPU's best
matrix-product rate and nothing else took any time.

    python bench/ceiling.py [--model densenet121] [--input-size 224] [--in-chans 3]
                            [--train IMG_S] [--infer IMG_S] [--sizes 1024 2048 4096] [--rounds 7]

Counts the multiply-accumulates (MACs) the model's fast path runs per image, in inference and in
a training step (forward and backward), with torch's FLOP counter on the fused path with the
native kernels off (so the counter sees its convolutions and products as torch ops: a
DenseNet's transitions pool before their 1x1 convolution there, 2.60 G for DenseNet-121 at
224 px against the published 2.83 G). Then times square matrix products and two oneDNN
convolutions in bfloat16 and float32, with the threads torch uses, and divides by the best rate: the img/s a model
cannot exceed on this CPU in that dtype. With ``--train``/``--infer``, the rate a target img/s
needs, in GMAC/s and as a fraction of that best rate: a target near or above 1.0x of it is out
of reach on this CPU whatever else is fused, since the rest of a step (batch norms, ReLUs,
pooling, the optimizer) takes time too and a DenseNet's narrow convolutions (a growth rate of
32 outputs) run below the best rate. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def macs_per_image(model: torch.nn.Module, input_size: tuple[int, ...], train: bool) -> float:
    """MACs per image of the fast path (native kernels off), one forward or one training step."""
    from torch.utils.flop_counter import FlopCounterMode

    from densekit.models import native

    batch = 2  # batch norm in training needs more than one value per channel
    x = torch.zeros(batch, *input_size)
    model.train(train)
    with native.disabled(), FlopCounterMode(display=False) as counter:
        if train:
            model(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2 / batch


def _rate(run, macs: int, rounds: int) -> tuple[float, float]:
    """Median and best GMAC/s of ``run()``, which does ``macs`` multiply-accumulates."""
    with torch.no_grad():
        for _ in range(2):
            run()
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
    return macs / statistics.median(times) / 1e9, macs / min(times) / 1e9


def probes(dtype: torch.dtype, sizes: list[int]):
    """(name, run, MACs): square matrix products, and oneDNN convolutions in channels-last (in
    float32 on AMD CPUs torch's matrix product is not oneDNN's and ran at 0.4x the convolutions'
    rate, so the products alone would understate what the CPU does)."""
    import torch.nn.functional as F

    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        yield f"mm {n}", (lambda a=a, b=b: torch.mm(a, b)), n ** 3
    for batch, cin, side, cout, k in ((32, 256, 28, 256, 3), (32, 512, 28, 512, 1)):
        x = torch.randn(batch, cin, side, side).to(dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(cout, cin, k, k).to(dtype).contiguous(memory_format=torch.channels_last)
        yield (f"conv{k}x{k} {cin}->{cout} {side}px b{batch}", (lambda x=x, w=w, k=k: F.conv2d(x, w, padding=k // 2)),
               batch * side * side * cin * cout * k * k)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="densenet121")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--train", type=float, default=None, help="a training target, img/s")
    p.add_argument("--infer", type=float, default=None, help="an inference target, img/s")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)

    from densekit import create_model
    from densekit.bench.env import environment

    kwargs = dict(in_chans=args.in_chans)
    if args.num_classes:
        kwargs["num_classes"] = args.num_classes
    torch.manual_seed(0)
    model = create_model(args.model, **kwargs)
    size = (args.in_chans, args.input_size, args.input_size)
    macs = {"infer": macs_per_image(model, size, train=False), "train": macs_per_image(model, size, train=True)}
    rates = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        measured = {label: _rate(run, macs_, args.rounds) for label, run, macs_ in probes(dtype, args.sizes)}
        best = max(b for _, b in measured.values())
        rates[name] = dict(gmac_s={k: dict(median=round(m, 1), best=round(b, 1)) for k, (m, b) in measured.items()},
                           best=round(best, 1),
                           ceiling_img_s={mode: round(best * 1e9 / m, 1) for mode, m in macs.items()})
    env = environment()
    out = dict(model=args.model, input=list(size), threads=torch.get_num_threads(), cpu=env.get("cpu"),
               cpu_bf16=env.get("cpu_bf16"), torch=env.get("torch"), git_commit=env.get("git_commit"),
               git_dirty=env.get("git_dirty"), macs_per_image={k: round(v / 1e9, 4) for k, v in macs.items()},
               unit="GMAC", rates=rates)
    targets = {mode: t for mode, t in (("train", args.train), ("infer", args.infer)) if t}
    if targets:
        out["targets"] = {mode: dict(img_s=t, needs_gmac_s=round(t * macs[mode] / 1e9, 1),
                                     of_best_bf16=round(t * macs[mode] / 1e9 / rates["bf16"]["best"], 3),
                                     of_best_fp32=round(t * macs[mode] / 1e9 / rates["fp32"]["best"], 3))
                          for mode, t in targets.items()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
