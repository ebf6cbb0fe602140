"""``densekit analyze``: measure the DenseBlock blog post's claims on a run or a model (feature
reuse, gradient flow, cost, overfitting); writes JSON and PNG files, prints the headline numbers."""

from __future__ import annotations

from ..results import json_text


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


def _headlines(results: dict) -> list[str]:
    lines = []
    for block in results.get("reuse", {}).get("blocks", []):
        s = block["summary"]
        older = "-" if s["older_share"] is None else f"{100 * s['older_share']:.1f}%"
        fraction = "-" if s["older_channel_fraction"] is None else f"{100 * s['older_channel_fraction']:.1f}%"
        lines.append(f"reuse {block['block']}: weight on sources before the previous layer {older} "
                     f"(their share of input channels {fraction}); on the block input "
                     f"{100 * s['block_input_share']:.1f}%")
    if "gradients" in results:
        g = results["gradients"]
        lines.append(f"gradients at init: first/last layer norm ratio dense {g['dense']['first_last_ratio']:.3g}, "
                     f"chain {g['chain']['first_last_ratio']:.3g}")
    if "cost" in results:
        row = results["cost"]["model_cost"]
        lines.append(f"cost: {row['params']:,} params, {row['macs'] / 1e6:,.1f} MMACs at "
                     f"{'x'.join(map(str, row['input_size']))}")
    if "overfit" in results:
        s = results["overfit"]["summary"]
        lines.append(f"overfit: best test accuracy {100 * s['best_test_acc']:.2f}% (epoch {s['best_epoch']}), "
                     f"final accuracy gap {100 * s['final_acc_gap']:+.2f} points, loss gap {s['final_loss_gap']:+.4f}")
    return lines


def _summaries(report) -> dict:
    results = report.results
    out = dict(target=report.target, trained=report.trained, out=report.out, files=report.files)
    if "reuse" in results:
        out["reuse"] = [dict(block=b["block"], **b["summary"]) for b in results["reuse"]["blocks"]]
    if "gradients" in results:
        g = results["gradients"]
        out["gradients"] = {k: g[k]["first_last_ratio"] for k in ("dense", "chain")}
    if "cost" in results:
        out["cost"] = results["cost"]["model_cost"]
    if "overfit" in results:
        out["overfit"] = results["overfit"]["summary"]
    return out


def run(args) -> int:
    from ..analyze import analyze

    report = analyze(args.target, what=args.what, out=args.out, data_dir=args.data_dir)
    if args.json:
        print(json_text(_summaries(report)))
        return 0
    for line in _headlines(report.results):
        print(line)
    print(f"wrote {len(report.files)} files to {report.out}")
    return 0
