"""Inference speed of a pruned run against its parent: PyTorch and onnxruntime, same process.

    python bench/prune_speed.py PARENT PRUNED [--batch 64] [--rounds 51] [--precision fp32|bf16] [--ort-spinning] [--eager] [--align N]

Both run directories are loaded with ``densekit.load`` and, as ``densekit eval`` and ``predict``
run them on the CPU, copied by ``densekit.models.frozen.optimize_for_inference`` (``--eager``:
the loaded models as they are, whose fused blocks recompute their constants at each call); and
both are exported to ONNX (``densekit.export.export_onnx``, checked against PyTorch on export;
``--align`` as ``densekit export --align``, its default padding the channel counts to 16).
Each engine then runs the two models in alternating rounds on one random batch, after one
warm-up call each; a round times one call of each model, and the speedup is the median of
the rounds' ratios (parent time over pruned time). glibc's allocator is set as densekit's
command line sets it (``densekit.malloc``). onnxruntime runs with its pool threads'
spinning off unless ``--ort-spinning``: on 2 cores, beside PyTorch's OpenMP threads in this
process, spinning made it 1.6-1.8x slower. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("parent")
    p.add_argument("pruned")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=51)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="PyTorch under bf16 autocast, as densekit predict runs on CPUs with bf16 instructions "
                        "(onnxruntime runs the fp32 export either way)")
    p.add_argument("--eager", action="store_true",
                   help="time the loaded models as they are, not their optimize_for_inference copies")
    p.add_argument("--align", type=int, default=None, metavar="N",
                   help="the ONNX export's channel alignment (default: the export's; 0: the widths as they are)")
    p.add_argument("--ort-spinning", action="store_true",
                   help="let onnxruntime's threads spin between ops (its default; off here, see below)")
    args = p.parse_args(argv)

    import densekit
    import onnxruntime as ort
    from densekit.malloc import setting as malloc_setting, tune_malloc
    from densekit.export import export_onnx
    from densekit.models.frozen import for_inference
    from densekit.models.profile import count_macs, count_params
    from densekit.prune import alternate

    tune_malloc()  # as densekit eval and predict run
    loaded = [densekit.load(d).eval() for d in (args.parent, args.pruned)]
    size = tuple(loaded[0].pretrained_cfg["input_size"])
    counts = dict(params=[count_params(m) for m in loaded], macs=[count_macs(m, size) for m in loaded])
    models = loaded if args.eager else [for_inference(m, torch.device("cpu")) for m in loaded]
    x = torch.randn(args.batch, *size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        (t_parent, t_pruned), torch_speedup = alternate([lambda m=m: m(x) for m in models], args.rounds)
    out = dict(batch=args.batch, rounds=args.rounds, threads=torch.get_num_threads(), precision=args.precision,
               optimized=not args.eager, malloc=malloc_setting(),
               **counts,
               torch_images_per_second=[args.batch / t_parent, args.batch / t_pruned], torch_speedup=torch_speedup)
    with tempfile.TemporaryDirectory() as tmp:
        sessions, aligned = [], []
        for name, d in zip(("parent", "pruned"), (args.parent, args.pruned)):
            path = Path(tmp) / f"{name}.onnx"
            report = export_onnx(d, path, batch_size=args.batch, align=args.align)  # None: the default
            aligned.append(report.aligned)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            # onnxruntime's pool threads spin between ops by default (see the docstring)
            if not args.ort_spinning:
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sessions.append(ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]))
        feed = x.numpy()
        calls = [lambda s=s: s.run(None, {s.get_inputs()[0].name: feed}) for s in sessions]
        (o_parent, o_pruned), onnx_speedup = alternate(calls, args.rounds)
    out.update(onnx_images_per_second=[args.batch / o_parent, args.batch / o_pruned], onnx_speedup=onnx_speedup,
               onnx_spinning=args.ort_spinning, onnx_aligned=aligned)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
