"""``densekit train``: train a registered model on a dataset into a run directory."""

from __future__ import annotations

import argparse
import sys

from ..data import DATASETS
from ..train.recipes import RECIPES
from .common import add_device_argument, fraction, model_arg, non_negative_int, positive_int, positive_number


ALIASES = {"csv": "--train-csv"}


def _defaults(field: str) -> str:
    return ", ".join(f"{name}: {getattr(recipe, field)}" for name, recipe in RECIPES.items())


def add_arguments(p) -> None:
    p.add_argument("--model", help="registered model name (default: densenet_bc_40_k12_s2 for 3 epochs on a CPU, "
                                    "densenet_bc_100_k12 on a GPU; see `densekit models`)")
    p.add_argument("--model-arg", dest="model_args", action="append", type=model_arg, metavar="KEY=VALUE",
                   help="override one DenseNet argument of the model, e.g. growth_rate=12 or block_config=(6,6,6); "
                        "repeatable")
    p.add_argument("--init", metavar="DIR", help="start from the model of run directory DIR, its (pruned) structure "
                                                 "and weights, e.g. to fine-tune after `densekit prune`; takes "
                                                 "the model and, unless given, the dataset from DIR")
    p.add_argument("--pretrained", metavar="SOURCE",
                   help="start from pretrained weights and fine-tune: a torchvision DenseNet file (.pth, e.g. "
                        "densenet121-a639ec97.pth), a safetensors file with torchvision or timm names, a densekit "
                        "run directory, or a model name found in torch hub's cache; the classifier is new where "
                        "the classes differ; the model, image size, normalization and the finetune recipe follow "
                        "the weights unless given. Nothing is downloaded")
    p.add_argument("--freeze-backbone", action="store_true", default=None,
                   help="with --pretrained: train the classifier alone (the backbone and its batch norms fixed), "
                        "by default with the probe recipe: a linear probe of the pretrained features")
    p.add_argument("--head-epochs", type=non_negative_int, metavar="N",
                   help="train the classifier alone for the first N epochs, then everything (default: 0)")
    p.add_argument("--backbone-lr-scale", type=positive_number, metavar="X",
                   help="the backbone's learning rate as X times the classifier's (default: 1)")
    p.add_argument("--pos-weight", choices=("auto",),
                   help="multi-label: weigh each label's positives by its negatives / positives in the training "
                        "split (default: unweighted)")
    p.add_argument("--dataset", choices=DATASETS, help="default: fashion-mnist (with --init: DIR's dataset)")
    p.add_argument("--data-dir", help="folder with the dataset's files (default: $DENSEKIT_DATA, or the system "
                                      "location for fashion-mnist and mnist)")
    csv = p.add_argument_group("the csv dataset (--dataset csv): image paths and labels in CSV files, paths "
                               "relative to --data-dir")
    csv.add_argument("--train-csv", metavar="FILE", help="the training images' CSV (a header row naming the columns)")
    csv.add_argument("--val-csv", metavar="FILE",
                     help="the validation images' CSV (default: --val-fraction of the training rows)")
    csv.add_argument("--test-csv", metavar="FILE", help="the test images' CSV, scored once at the end")
    csv.add_argument("--path-column", metavar="NAME", help="the column of image paths (e.g. \"Image Index\")")
    csv.add_argument("--label-column", metavar="NAME",
                     help="the column of class names; several per row joined by --label-sep with --multi-label "
                          "(e.g. ChestX-ray14's \"Finding Labels\")")
    csv.add_argument("--label-sep", metavar="SEP", help="what joins several names in --label-column (e.g. \"|\")")
    csv.add_argument("--no-label", metavar="NAME",
                     help="the --label-column name meaning no label (default: \"No Finding\")")
    csv.add_argument("--label-columns", metavar="A,B,...", type=lambda t: tuple(c.strip() for c in t.split(",")),
                     help="one column per label holding 1, 0, -1 (uncertain) or nothing (0), as CheXpert's")
    csv.add_argument("--uncertain", choices=("zeros", "ones", "ignore"),
                     help="--label-columns: what -1 means: absent (default), present, or unknown (left out of the "
                          "loss and the metrics; needs --multi-label)")
    csv.add_argument("--multi-label", action="store_true", default=None,
                     help="several labels per image: sigmoid outputs, binary cross-entropy, and per-label AUROC "
                          "(the kept weights chosen by mean validation AUROC)")
    p.add_argument("--image-size", type=positive_int, metavar="PX",
                   help="side of the images the model sees (default: the model's own: 224 for the ImageNet "
                        "variants; the dataset's 28 or 32 for the CIFAR-style ones, 32 on a folder)")
    p.add_argument("--val-fraction", type=fraction, metavar="X",
                   help="of the training images, held out (stratified by class) to validate every epoch on, "
                        "where the dataset has no val/ of its own (default: 0.1)")
    p.add_argument("--keep", choices=("best", "last"),
                   help="the weights the run keeps and scores on the test split: the epoch of the best "
                        "validation score (accuracy, ties to the lower loss; multi-label: mean AUROC), or the "
                        "last (default: the recipe's: best; last for probe)")
    p.add_argument("--patience", type=positive_int, metavar="N",
                   help="stop after N epochs without a better validation score (higher, or the same at a lower "
                        "loss) (default: never)")
    p.add_argument("--workers", type=non_negative_int, metavar="N",
                   help="processes decoding an image folder, for each training process (default: the cores "
                        "shared between the --nproc processes, at most 8; 0: in the training process)")
    p.add_argument("--skip-bad-images", action="store_true", default=None,
                   help="skip image files that do not decode, with a warning, instead of stopping")
    p.add_argument("--recipe", choices=list(RECIPES),
                   help="fast (default), paper (Huang et al. 2017), finetune (default with --pretrained: AdamW, "
                        "a low lr, light augmentation), or the GPU presets sprint and long (Fashion-MNIST, "
                        "densenet_bc_100_k12); every number with its reason: densekit.train.recipes")
    p.add_argument("--sparsity", type=fraction, metavar="L",
                   help="train to be pruned: an L1 penalty of L times the absolute batch-norm scales that "
                        "`densekit prune` ranks channels by (network slimming, Liu et al. 2017: 1e-5 over 160 epochs; "
                        "5e-4 over the 3 epochs of `make run`'s model; "
                        "default: 0)")
    p.add_argument("--epochs", type=positive_int, help=f"default: the recipe's ({_defaults('epochs')})")
    p.add_argument("--batch-size", type=positive_int, help=f"default: the recipe's ({_defaults('batch_size')})")
    p.add_argument("--lr", type=positive_number, help=f"peak learning rate (default: the recipe's; {_defaults('lr')})")
    p.add_argument("--seed", type=non_negative_int, help="seeds the weights and every epoch's order and "
                                                          "augmentation (default: 0)")
    p.add_argument("--train-limit", type=positive_int, metavar="N", help="train on the first N training images only")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic algorithms only: bit-identical reruns and resumes on the same machine")
    add_device_argument(p, precision=True)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: on CUDA only)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay training steps from a CUDA graph (default: on CUDA)")
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/<dataset>-<model>-<time>); "
                                                "must be empty or hold a run of the same config")
    p.add_argument("--resume", action="store_true", help="continue the run in --out DIR where it stopped")
    p.add_argument("--max-steps", type=positive_int, metavar="N",
                   help="stop after N optimizer steps of the run (resumable with --resume)")
    p.add_argument("--save-every", type=positive_int, metavar="N",
                   help="steps between mid-epoch checkpoints (default: 200)")
    p.add_argument("--nproc", type=positive_int, default=1, metavar="N",
                   help="data-parallel training in N processes on this machine (torch.distributed: gloo on the "
                        "CPU, NCCL with one GPU each); the batch size is the total over them (default: 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


class _ProgressBar:
    """The tqdm bar on stderr: loss, accuracy, images/s; tqdm itself shows the time left."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.epochs = 0
        self.out = None

    def __call__(self, event) -> None:
        from ..train.trainer import EpochEnd, Evaluating, RunStart, StepReport

        if isinstance(event, RunStart):
            self.out = event.out
            self.epochs = event.epochs
            if self.enabled:
                from tqdm import tqdm

                # a log file gets a line per redraw: redraw rarely there
                self.bar = tqdm(total=event.stop_at, initial=event.global_step, unit="step", file=sys.stderr,
                                dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 1,
                                desc=f"epoch {event.global_step // event.steps_per_epoch + 1}/{self.epochs}")
        elif self.bar is not None and isinstance(event, StepReport):
            self.bar.set_description(f"epoch {event.epoch + 1}/{self.epochs}", refresh=False)
            self.bar.set_postfix(loss=f"{event.loss:.4f}", acc=f"{event.acc:.4f}",
                                 img_s=f"{event.images_per_s:.0f}", refresh=False)
            self.bar.update(event.global_step - self.bar.n)
        elif self.bar is not None and isinstance(event, Evaluating):
            self.bar.set_postfix_str(f"scoring {event.split}: batch {event.done}/{event.batches}")
        elif self.bar is not None and isinstance(event, EpochEnd):
            self.bar.write(f"epoch {event.epoch}/{event.epochs}: train loss {event.train_loss:.4f} "
                           f"acc {event.train_acc:.4f} | val loss {event.val_loss:.4f} acc {event.val_acc:.4f}"
                           + ("" if event.val_auroc is None else f" AUROC {event.val_auroc:.4f} AP {event.val_ap:.4f}")
                           + f"{' (best)' if event.best else ''} | lr {event.lr:.4g} | {event.seconds:.1f} s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def summary_lines(s) -> list[str]:
    """What a finished (or stopped) run prints: a TrainSummary in a few lines."""
    where = s.device if s.device == "cpu" else f"{s.device} {s.device_name}"
    layout = (", channels-last" if s.channels_last else "") + (", CUDA graph" if s.cuda_graph else "")
    lines = [f"{s.model} on {s.dataset}: {s.epochs_completed}/{s.epochs} epochs"
             f"{' (stopped early)' if s.stopped_early else ''}, {s.steps} steps in {s.train_seconds:.1f} s "
             f"({s.images_per_second:.0f} images/s; {where}, {s.precision}{layout})"]
    if s.pretrained and s.pretrained["kind"] != "resumed":
        p = s.pretrained
        lines.append(f"from {p['source']} ({p['kind']}): {len(p['loaded'])} tensors loaded, {len(p['new'])} new"
                     + (f", {len(p['adapted'])} adapted" if p["adapted"] else ""))
    if s.kept_epoch:
        score = (f"mean AUROC {s.val_auroc:.4f}" if s.multi_label
                 else f"accuracy {100 * s.val_accuracy:.2f}%")
        lines.append(f"kept the {s.kept} weights, of epoch {s.kept_epoch}: validation {score} "
                     f"({s.val_images} images: {s.val_split})")
    if s.test_auroc is not None:
        lines.append(f"test mean AUROC {s.test_auroc:.4f}, mean average precision {s.test_ap:.4f}, exact-match "
                     f"accuracy {100 * s.test_accuracy:.2f}% ({s.test_images} images), test loss {s.test_loss:.4f}")
    elif s.test_accuracy is not None:
        lines.append(f"test accuracy {100 * s.test_accuracy:.2f}% ({s.test_correct}/{s.test_images}), "
                     f"test loss {s.test_loss:.4f}")
    lines.append(f"{s.params:,} parameters, {s.macs / 1e6:.1f} M MACs per {'x'.join(map(str, s.input_size))} image")
    if not s.finished:
        lines.append(f"stopped at step {s.steps} of {s.total_steps}; continue with: "
                     f"{resume_command(s.out, s.world_size)}")
    lines.append(f"run saved in {s.out} (densekit eval {s.out}; densekit predict {s.out} IMAGE...)")
    return lines


def resume_command(out: str, nproc: int = 1) -> str:
    """The command that continues the run in ``out`` as it ran (the same number of processes:
    with another, batch norm sees other shares of the batches)."""
    return f"densekit train --out {out} --resume" + (f" --nproc {nproc}" if nproc > 1 else "")


def _config(args):
    from ..train import TrainConfig

    return TrainConfig(
        model=args.model, model_args=dict(args.model_args) if args.model_args else None, init=args.init,
        dataset=args.dataset, data_dir=args.data_dir, image_size=args.image_size, recipe=args.recipe,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, train_limit=args.train_limit,
        deterministic=args.deterministic, device=args.device, channels_last=args.channels_last,
        precision=args.precision,
        cuda_graph=args.cuda_graph, out=args.out, resume=args.resume, max_steps=args.max_steps,
        save_every=args.save_every, val_fraction=args.val_fraction, keep=args.keep, patience=args.patience,
        workers=args.workers, skip_bad_images=args.skip_bad_images, pretrained=args.pretrained,
        freeze_backbone=args.freeze_backbone, head_epochs=args.head_epochs,
        backbone_lr_scale=args.backbone_lr_scale, pos_weight=args.pos_weight, csv=_csv_layout(args),
        sparsity=args.sparsity)


_CSV_FLAGS = ("train_csv", "val_csv", "test_csv", "path_column", "label_column", "label_sep", "no_label",
              "label_columns", "uncertain", "multi_label")


def _csv_layout(args) -> dict | None:
    """The csv dataset's layout from its flags; refused with another dataset."""
    from ..checks import ArgumentError

    given = {k: getattr(args, k) for k in _CSV_FLAGS if getattr(args, k) is not None}
    if args.dataset != "csv":
        if given:
            raise ArgumentError(f"{{{next(iter(given))}}} describes the csv dataset's files; give {{dataset}} csv")
        return None
    if "train_csv" not in given or "path_column" not in given:
        raise ArgumentError("{dataset} csv needs {train_csv} and {path_column}, and {label_column} or "
                            "{label_columns}")
    return given


def _launch(args, config) -> int:
    """Start the ranks, each this same command, with one run directory for all of them."""
    from .. import distributed
    from ..train.config import check_config, default_out

    from ..train.runtime import select_runtime

    argv = list(args.argv)
    if not args.out:  # named once, here
        argv += ["--out", str(default_out(check_config(config), select_runtime(args.device).device.type))]
    try:
        return distributed.launch(argv, args.nproc)
    except KeyboardInterrupt:  # rank 0 has said so, and how to continue
        return 130


def run(args) -> int:
    from .. import distributed
    from ..checks import ArgumentError
    from ..train import train
    from ..train.config import check_config

    config = check_config(_config(args))
    job = distributed.from_env()
    if args.batch_size:  # said before starting anything; the recipe's default is checked by each rank
        distributed.check_batch_split(args.batch_size, args.nproc)
    if args.nproc > 1 and not job.active:
        return _launch(args, config)
    if job.active and args.nproc not in (1, job.world_size):
        raise ArgumentError(f"{{nproc}} {args.nproc}: this process is one of WORLD_SIZE={job.world_size} started "
                            "by an outside launcher; drop {nproc} or make them agree")
    progress = _ProgressBar(enabled=not args.no_progress and job.is_main)
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():
            summary = train(config, on_event=progress)
    except KeyboardInterrupt:
        progress.close()
        if progress.out is not None:
            print(f"densekit train: the last checkpoint is kept; continue with: "
                  f"{resume_command(progress.out, job.world_size)}", file=sys.stderr)
        raise
    finally:
        progress.close()
    if job.is_main:
        print("\n".join(summary_lines(summary)))
    return 0
