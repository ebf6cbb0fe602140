"""What the subcommands share: argument types with the library's wording, the device flag,
and how a library error's argument names become this command line's flags."""

from __future__ import annotations

import argparse
import ast

from .. import checks

_CONVERT = {checks.positive_int: int, checks.non_negative_int: int, checks.positive_number: float,
            checks.fraction: float}


def typed(check):
    """An argparse type: the text converted as ``check`` expects, then checked by it (the
    library's own check, so that a flag and an argument are refused in the same words)."""
    convert = _CONVERT[check]

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = text
        try:
            return check("value", value)
        except checks.ArgumentError as e:
            raise argparse.ArgumentTypeError(e.render({"value": ""}).strip()) from None

    parse.__name__ = check.__name__  # argparse names the type in some messages
    return parse


positive_int = typed(checks.positive_int)
non_negative_int = typed(checks.non_negative_int)
positive_number = typed(checks.positive_number)
fraction = typed(checks.fraction)


def probability(text: str) -> float:
    """A number in [0, 1]."""
    try:
        return checks.fraction("value", float(text), high_included=True)
    except (ValueError, checks.ArgumentError):
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None


def model_arg(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. growth_rate=12), got {text!r}")
    try:
        value = ast.literal_eval(raw)  # numbers, tuples, lists, None, True
    except (ValueError, SyntaxError):
        value = raw  # a bare word is a string: stem=cifar
    return key, value


def add_device_argument(p, precision: bool = False) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N (default: auto)")
    if precision:
        p.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                       help="bf16: autocast (weights and optimizer stay float32); auto: bf16 where the device "
                            "runs it faster (CUDA; CPUs with AMX-BF16, AMD ones with AVX512-BF16), else fp32 (default: "
                            "auto; a resumed run keeps its own; eval and predict score a run trained in fp32 in fp32)")


def flag_spelling(parser: argparse.ArgumentParser, aliases: dict[str, str] | None = None) -> dict[str, str]:
    """Library argument name -> how this command spells it: its flag (``--batch-size``) or
    positional's metavar; ``aliases`` for library names that differ from the flags' (an
    export's ``path`` is ``--out``)."""
    spelling = {}
    for action in parser._actions:
        if action.option_strings:
            spelling[action.dest] = next((o for o in action.option_strings if o.startswith("--")),
                                         action.option_strings[0])
        elif action.metavar:
            spelling[action.dest] = action.metavar
    return {**spelling, **(aliases or {})}
