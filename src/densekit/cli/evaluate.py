"""``densekit eval``: accuracy, per-class accuracy and confusion matrix of a trained run."""

from __future__ import annotations

from ..data import DATASETS
from .common import add_device_argument


def add_arguments(p) -> None:
    p.add_argument("run_dir", metavar="DIR", help="run directory written by `densekit train`")
    p.add_argument("--dataset", choices=DATASETS, help="test split to evaluate on (default: the run's dataset)")
    p.add_argument("--data-dir", help="folder with the dataset's files (default: where the run read them)")
    p.add_argument("--out", metavar="PNG", help="where to draw the confusion matrix (default: DIR/confusion.png)")
    p.add_argument("--split", choices=("test", "val"), help="the split to score: test (default where the dataset "
                                                            "has one) or val, the run's validation split")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_device_argument(p)


def run(args) -> int:
    from ..train import evaluate_run

    report = evaluate_run(args.run_dir, dataset=args.dataset, data_dir=args.data_dir, device=args.device,
                          confusion_path=args.out, split=args.split)
    if args.json:
        print(report.to_json())
        return 0
    print(f"{report.model} on {report.dataset} {report.split} ({report.total} images): accuracy "
          f"{100 * report.accuracy:.2f}% ({report.correct}/{report.total}), loss {report.loss:.4f}")
    width = max(len(c.label) for c in report.per_class)
    for c in report.per_class:
        acc = "-" if c.accuracy is None else f"{100 * c.accuracy:6.2f}%"
        print(f"  {c.index:>3}  {c.label:<{width}}  {acc:>7}  of {c.count}")
    if report.confusion_png is not None:
        print(f"confusion matrix: {report.confusion_png}")
    return 0
