"""Figures of a run: training curves, the confusion matrix and ROC curves, as PNG bytes.

Figures are built on matplotlib's object API with the Agg canvas, never pyplot, so
nothing touches a global figure list or needs a display.
"""

from __future__ import annotations

import io

import numpy as np


def png_bytes(fig) -> bytes:
    """A matplotlib figure as PNG bytes (Agg canvas: no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def curves_png(history: list[dict], title: str = "") -> bytes:
    """Loss and accuracy against epoch, train and validation, from metrics.jsonl records."""
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    marker = "o" if len(history) <= 30 else None  # a lone epoch would draw no line at all
    def series(key: str, scale: float = 1.0) -> list[float]:  # a null (no images scored) is a gap
        return [np.nan if r[key] is None else scale * r[key] for r in history]

    for split in ("train", "val"):
        loss_ax.plot(epochs, series(f"{split}_loss"), marker=marker, label=split)
        acc_ax.plot(epochs, series(f"{split}_acc", 100), marker=marker, label=split)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss (train: with label smoothing)")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    scored = [r for r in history if r["val_acc"] is not None]
    if scored:
        best = max(scored, key=lambda r: r["val_acc"])
        acc_ax.annotate(f"{100 * best['val_acc']:.2f}%", (best["epoch"], 100 * best["val_acc"]),
                        textcoords="offset points", xytext=(0, -14), ha="center")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    return png_bytes(fig)


def confusion_png(confusion: np.ndarray, classes: list[str], title: str = "") -> bytes:
    """Row-normalized confusion matrix (rows: true class, columns: predicted)."""
    from matplotlib.figure import Figure

    confusion = np.asarray(confusion, dtype=np.int64)
    n = len(classes)
    rows = confusion.sum(axis=1, keepdims=True)
    # row-normalized, so that a rare class's errors show as plainly as a common one's
    frac = np.divide(confusion, rows, out=np.zeros(confusion.shape, dtype=float), where=rows > 0)
    side = min(16.0, max(5.0, 0.45 * n + 2))
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    if n <= 30:  # beyond that, tick labels overlap into a smear
        ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    return png_bytes(fig)


def roc_png(curves: list[tuple[str, np.ndarray, np.ndarray, float]], title: str = "") -> bytes:
    """ROC curves of a multi-label model, one per label: (label, false positive rates, true
    positive rates, AUROC), the AUROC in the legend."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 6.4), layout="constrained")
    ax = fig.subplots()
    for name, fpr, tpr, auc in curves:
        ax.plot(fpr, tpr, lw=1.2, label=f"{name} ({auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
           title=title or "ROC curves")
    if curves:
        ax.legend(fontsize="small" if len(curves) <= 20 else "xx-small", loc="lower right")
    ax.grid(alpha=0.3)
    return png_bytes(fig)
