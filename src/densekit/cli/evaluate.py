"""``densekit eval``: accuracy, per-class accuracy and confusion matrix of a trained run; for a
multi-label run, each label's AUROC and average precision and the ROC curves."""

from __future__ import annotations

from ..data import DATASETS
from .common import add_device_argument


def add_arguments(p) -> None:
    p.add_argument("run_dir", metavar="DIR", help="run directory written by `densekit train`")
    p.add_argument("--dataset", choices=DATASETS, help="test split to evaluate on (default: the run's dataset)")
    p.add_argument("--data-dir", help="folder with the dataset's files (default: where the run read them)")
    p.add_argument("--out", metavar="PNG", help="where to draw the confusion matrix (default: DIR/confusion.png) "
                                                "or, for a multi-label run, the ROC curves (DIR/roc.png)")
    p.add_argument("--split", choices=("test", "val"), help="the split to score: test (default where the dataset "
                                                            "has one) or val, the run's validation split")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out image files that do not decode, with a warning, as training did with it")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_device_argument(p, precision=True)


def run(args) -> int:
    from ..train import evaluate_run

    report = evaluate_run(args.run_dir, dataset=args.dataset, data_dir=args.data_dir, device=args.device,
                          confusion_path=args.out, split=args.split, skip_bad_images=args.skip_bad_images,
                          precision=args.precision or "auto")
    if args.json:
        print(report.to_json())
        return 0
    if report.multi_label:
        return _print_labels(report)
    print(f"{report.model} on {report.dataset} {report.split} ({report.total} images): accuracy "
          f"{100 * report.accuracy:.2f}% ({report.correct}/{report.total}), loss {report.loss:.4f}")
    width = max(len(c.label) for c in report.per_class)
    for c in report.per_class:
        acc = "-" if c.accuracy is None else f"{100 * c.accuracy:6.2f}%"
        print(f"  {c.index:>3}  {c.label:<{width}}  {acc:>7}  of {c.count}")
    if report.confusion_png is not None:
        print(f"confusion matrix: {report.confusion_png}")
    return 0


def _print_labels(report) -> int:
    num = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"{report.model} on {report.dataset} {report.split} ({report.total} images): mean AUROC "
          f"{num(report.mean_auroc)}, mean average precision {num(report.mean_average_precision)}, exact-match "
          f"accuracy {100 * report.accuracy:.2f}%, loss {report.loss:.4f}")
    width = max(len(c.label) for c in report.per_label)
    print(f"  {'':>3}  {'label':<{width}}  {'AUROC':>7}  {'AP':>7}  positives")
    for c in report.per_label:
        print(f"  {c.index:>3}  {c.label:<{width}}  {num(c.auroc):>7}  {num(c.average_precision):>7}  "
              f"{c.positives} of {c.known}")
    print(f"ROC curves: {report.roc_png}")
    return 0
