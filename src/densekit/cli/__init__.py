"""``densekit``: the command line. Argument parsing only; each subcommand calls the library.

Contract: a user mistake (:class:`densekit.errors.UserError`, a bad flag) prints one line
on stderr and exits 2; anything else is a bug and keeps its traceback (exit 1). Library
errors name arguments as Python spells them; here they are said as this command's flags.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .. import __version__
from ..checks import ArgumentError
from ..errors import UserError
from ..malloc import setting as malloc_setting, tune_malloc
from .common import flag_spelling

# Subcommand -> (module under densekit.cli with add_arguments(parser) and run(args), help).
COMMANDS = {
    "models": ("models", "list the registered models with their size and cost"),
    "train": ("train", "train a model on a dataset into a run directory"),
    "eval": ("evaluate", "accuracy, per-class accuracy and confusion matrix of a trained run"),
    "predict": ("predict", "classify image files with a trained run (one JSON line per image)"),
    "prune": ("prune", "remove the channels with the smallest BN gamma (network slimming) into a new run"),
    "bench": ("bench", "time densekit against torchvision side by side (img/s, peak memory, warm-up)"),
    "export": ("export", "write a trained run as an ONNX file or torch.export program, checked against PyTorch"),
    "analyze": ("analyze", "measure the DenseBlock blog post's claims on a run or model: feature reuse, "
                           "gradient flow, cost, overfitting"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="densekit", description="Densely connected convolutional networks.")
    parser.add_argument("--version", action="version", version=f"densekit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f".{module_name}", __name__)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _spelling=flag_spelling(p, getattr(module, "ALIASES", None)))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a launcher re-runs in each process
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    # every subcommand trains or infers on the CPU, or may: keep freed memory for the next step
    logging.getLogger(__name__).debug("allocator: %s", tune_malloc() or malloc_setting())
    try:
        return int(args._run(args) or 0)
    except ArgumentError as e:
        print(f"densekit {args.command}: error: {e.render(args._spelling)}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"densekit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"densekit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
