"""``densekit export``: a trained run as an ONNX file or a torch.export program, checked against PyTorch."""

from __future__ import annotations

from ..export import FORMATS
from ..export_aligned import ALIGN
from .common import non_negative_int, positive_int

# the library's name for what --out gives
ALIASES = {"path": "--out"}


def add_arguments(p) -> None:
    p.add_argument("run_dir", metavar="DIR", help="run directory written by `densekit train`")
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="onnx (default; checked in onnxruntime) or pt2 (a torch.export program)")
    p.add_argument("--out", metavar="FILE", help="file to create, never overwritten (default: DIR/model.onnx "
                                                 "or DIR/model.pt2)")
    p.add_argument("--opset", type=positive_int, metavar="N", help="ONNX opset (default: the exporter's)")
    p.add_argument("--batch-size", type=positive_int, default=1, metavar="N",
                   help="batch of the traced example (at least 2 for pt2); the batch axis stays free (default: 1)")
    p.add_argument("--dynamo", action="store_true",
                   help="use torch's torch.export-based ONNX exporter (needs onnxscript; much slower)")
    p.add_argument("--align", type=non_negative_int, metavar="N",
                   help="onnx: pad channel counts to multiples of N in the graph (zero weights, the same outputs), "
                        "so that onnxruntime's blocked convolutions keep every layer in their layout; "
                        f"0: as the model has them (default: {ALIGN})")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip running the file and comparing it with PyTorch")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args) -> int:
    from ..export import export_model

    report = export_model(args.run_dir, args.out, format=args.format, opset=args.opset, dynamo=args.dynamo,
                          batch_size=args.batch_size, check=args.check, align=args.align)
    if args.json:
        print(report.to_json())
        return 0
    shape = "x".join(map(str, report.input_shape))
    kind = f"ONNX opset {report.opset}" if report.format == "onnx" else "torch.export program"
    print(f"wrote {report.path} ({report.bytes / 1e6:.1f} MB, {kind}): {report.model}, input {shape} -> "
          f"{', '.join(report.outputs)}, in {report.export_seconds:.1f} s"
          + (f"; channel counts padded to multiples of {report.aligned}" if report.aligned else ""))
    if report.check is not None:
        c = report.check
        print(f"checked with {c.runner} at batch {c.check_batch_size}: max abs diff {c.max_abs_diff:.2g} "
              f"({c.max_rel_diff:.2g} of the output scale {c.output_scale:.3g}) against PyTorch")
    return 0
