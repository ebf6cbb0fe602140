"""``densekit analyze``: measure the DenseBlock blog post's claims on a run or a model (feature
reuse, gradient flow, cost, overfitting); writes JSON and PNG files, prints the headline numbers."""

from __future__ import annotations



def add_arguments(p) -> None:
    p.add_argument("target", metavar="TARGET", help="run directory written by `densekit train`, or a registered "
                                                    "model name (untrained weights)")
    p.add_argument("--what", metavar="LIST", help="comma-separated: reuse, gradients, cost, overfit "
                                                  "(default: all that apply; overfit needs a run)")
    p.add_argument("--out", metavar="DIR", help="folder for the JSON and PNG files (default: TARGET/analysis for a "
                                                "run; required for a model name); existing files are never replaced")
    p.add_argument("--data-dir", help="dataset folder for the gradient batch (default: the run's, or "
                                      "Fashion-MNIST's system location)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the summaries")


def _lines(h) -> list[str]:
    lines = []
    for b in h.reuse or []:
        older = "-" if b.older_share is None else f"{100 * b.older_share:.1f}%"
        fraction = "-" if b.older_channel_fraction is None else f"{100 * b.older_channel_fraction:.1f}%"
        lines.append(f"reuse {b.block}: weight on sources before the previous layer {older} "
                     f"(their share of input channels {fraction}); on the block input "
                     f"{100 * b.block_input_share:.1f}%")
    if h.gradient_ratio_dense is not None:
        lines.append(f"gradients at init: first/last layer norm ratio dense {h.gradient_ratio_dense:.3g}, "
                     f"chain {h.gradient_ratio_chain:.3g}")
    if h.params is not None:
        lines.append(f"cost: {h.params:,} params, {h.macs / 1e6:,.1f} MMACs at {'x'.join(map(str, h.input_size))}")
    if h.best_epoch is not None:
        lines.append(f"overfit: best validation accuracy {100 * h.best_val_acc:.2f}% (epoch {h.best_epoch}), "
                     f"final accuracy gap {100 * h.final_acc_gap:+.2f} points, loss gap {h.final_loss_gap:+.4f}")
    return lines


def run(args) -> int:
    from ..analyze import analyze

    report = analyze(args.target, what=args.what, out=args.out, data_dir=args.data_dir)
    headlines = report.headlines()
    if args.json:
        print(headlines.to_json())
        return 0
    for line in _lines(headlines):
        print(line)
    print(f"wrote {len(report.files)} files to {report.out}")
    return 0
