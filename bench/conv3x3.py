"""A dense layer's last convolution on the CPU: the native 3x3 kernel against oneDNN, same process.

    python bench/conv3x3.py [--batch 64 1] [--sides 14 7 3] [--inputs 16 24 32 48] [--growth 12]
                            [--precision fp32|bf16] [--rounds 201]

For each batch size, side and input width, a frozen dense block's two ways of running a
layer's last convolution (2D, 3x3, padding 1) from a channels-last (rows, inputs) matrix into
``growth`` columns of the block's feature buffer, on one random input: ``native`` is
``densekit.models.native.Conv3x3``, which writes into the buffer; ``onednn`` is what the frozen
block ran before it and still runs where that kernel does not apply: from batch 16 oneDNN's
convolution on a prepacked weight (at 3x3 positions the convolution unrolled into one matrix
product), below it ``torch.convolution``, then a copy into the buffer. Timed by
``densekit.prune.alternate`` (one warm-up call each, then alternating; medians). Prints one JSON
object per shape: microseconds per call and the median ratio (onednn over native).
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[64, 1])
    p.add_argument("--sides", type=int, nargs="+", default=[14, 7, 3])
    p.add_argument("--inputs", type=int, nargs="+", default=[16, 24, 32, 48])
    p.add_argument("--growth", type=int, default=12)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--rounds", type=int, default=201)
    args = p.parse_args(argv)

    from densekit.models import frozen, native
    from densekit.prune import alternate

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if not native.conv3x3_supported(dtype):
        raise SystemExit(f"this CPU's native kernels have no {args.precision} 3x3 convolution")
    torch.manual_seed(0)
    with torch.inference_mode():
        for batch in args.batch:
            for side in args.sides:
                for c_in in args.inputs:
                    weight = torch.randn(args.growth, c_in, 3, 3).to(dtype)
                    rows = torch.randn(batch * side * side, c_in).to(dtype)
                    buffer = torch.zeros(rows.shape[0], c_in + args.growth, dtype=dtype)
                    out = buffer[:, c_in:]
                    conv = native.Conv3x3(weight, dtype)
                    packed = frozen._prepacks(torch.empty(batch, c_in, side, side, dtype=dtype))
                    w = frozen._Packed(weight, [1, 1], [batch, c_in, side, side]) if packed else weight
                    calls = [lambda: out.copy_(frozen._apply(w, rows, None, [1, 1], (side, side), packed)),
                             lambda: conv(rows, (side, side), out)]
                    (t_onednn, t_native), ratio = alternate(calls, args.rounds)
                    print(json.dumps(dict(batch=batch, side=side, inputs=c_in, outputs=args.growth,
                                          precision=args.precision, threads=torch.get_num_threads(),
                                          onednn_us=round(t_onednn * 1e6, 1), native_us=round(t_native * 1e6, 1),
                                          speedup=round(ratio, 3))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
