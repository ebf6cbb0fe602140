"""Overfitting: how far the training figures run ahead of the validation figures, epoch by epoch.

The DenseBlock blog post warns that dense connectivity makes a network "complex" and
prone to overfitting (claim 5). A run directory's ``metrics.jsonl`` has what is needed to see it:
the gap between training and validation accuracy and loss per epoch, and whether the validation loss
turns up while the training loss still falls. Two caveats are in the numbers themselves:
``train_acc`` is measured on augmented batches while the weights move, and ``train_loss``
includes the recipe's label smoothing, so both gaps are understated against a clean
re-evaluation of the training set.
"""

from __future__ import annotations

import math

from ..errors import UserError

_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")


def check_records(records: list[dict], source: object) -> list[dict]:
    """The epoch records of a run (``RunDir.read_metrics``), checked for the fields used here."""
    for number, record in enumerate(records, start=1):
        missing = [f for f in _FIELDS if not _number(record.get(f))]
        if missing:
            raise UserError(f"{source}: epoch record {number} lacks a number for {missing[0]!r}")
    if not records:
        raise UserError(f"{source}: no epoch recorded yet")
    return records


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def overfitting(history: list[dict]) -> dict:
    """Per epoch: accuracy gap (train - val) and loss gap (val - train); and a summary:
    the best validation epoch, the gaps at the end, and the epochs in which the validation loss rose
    while the training loss fell (the textbook sign of overfitting)."""
    epochs = [dict(epoch=r["epoch"], train_acc=r["train_acc"], val_acc=r["val_acc"],
                   acc_gap=r["train_acc"] - r["val_acc"], train_loss=r["train_loss"],
                   val_loss=r["val_loss"], loss_gap=r["val_loss"] - r["train_loss"]) for r in history]
    diverging = [b["epoch"] for a, b in zip(epochs, epochs[1:])
                 if b["val_loss"] > a["val_loss"] and b["train_loss"] < a["train_loss"]]
    best = max(epochs, key=lambda e: e["val_acc"])
    last = epochs[-1]
    return dict(
        epochs=epochs,
        summary=dict(
            num_epochs=len(epochs),
            best_val_acc=best["val_acc"],
            best_epoch=best["epoch"],
            final_acc_gap=last["acc_gap"],
            final_loss_gap=last["loss_gap"],
            max_acc_gap=max(e["acc_gap"] for e in epochs),
            val_loss_up_train_loss_down=diverging,
        ),
        caveat="train_acc is on augmented batches during the epoch; train_loss includes label smoothing",
    )


def overfit_png(result: dict, title: str = "") -> bytes:
    """Accuracy gap and loss gap against epoch."""
    from matplotlib.figure import Figure

    from ..plots import png_bytes

    epochs = [e["epoch"] for e in result["epochs"]]
    fig = Figure(figsize=(10, 4), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    acc_ax.plot(epochs, [100 * e["acc_gap"] for e in result["epochs"]], marker="o")
    loss_ax.plot(epochs, [e["loss_gap"] for e in result["epochs"]], marker="o")
    acc_ax.set(xlabel="epoch", ylabel="train - validation accuracy (points)", title="accuracy gap")
    loss_ax.set(xlabel="epoch", ylabel="validation - train loss", title="loss gap")
    for ax in (acc_ax, loss_ax):
        ax.axhline(0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title or "generalization gap per epoch")
    return png_bytes(fig)
