"""Checks of the arguments that enter densekit, with one wording wherever they enter.

Library code names an argument as Python spells it (``batch_size must be a positive
integer, got 0``); the command line shows the same error with its flag (``--batch-size``).
:class:`ArgumentError` keeps the names apart from the text, in braces, so that each side
can spell them its own way: ``ArgumentError("{init} takes the model from the run; drop
{model}")`` reads "init takes ..." in Python and "--init takes ..." on the command line.
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterable, Mapping

from .errors import UserError


class _Spelling(dict):
    def __missing__(self, key: str) -> str:
        return key


class ArgumentError(UserError):
    """A bad argument value. ``template`` names arguments in braces ({batch_size}) and holds
    any value already quoted with :func:`quote`; ``str(e)`` spells the names as Python does,
    :meth:`render` as a caller's mapping says (the command line's flags)."""

    def __init__(self, template: str) -> None:
        self.template = template
        self.arguments = [name for _, name, _, _ in string.Formatter().parse(template) if name]
        super().__init__(self.render({}))

    def render(self, spelling: Mapping[str, str]) -> str:
        return " ".join(self.template.format_map(_Spelling(spelling)).split())


def text(value: object) -> str:
    """``str(value)`` made safe to embed in an :class:`ArgumentError` template."""
    return str(value).replace("{", "{{").replace("}", "}}")


def quote(value: object) -> str:
    """``repr(value)`` made safe to embed in an :class:`ArgumentError` template."""
    return text(repr(value))


# What each check requires, in the words of every message that reports it.
POSITIVE_INT = "a positive integer"
NON_NEGATIVE_INT = "an integer >= 0"
POSITIVE_NUMBER = "a positive finite number"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(name: str, requirement: str, value: object) -> ArgumentError:
    return ArgumentError(f"{{{name}}} must be {requirement}, got {quote(value)}")


def positive_int(name: str, value: object) -> int:
    if not (_is_int(value) and value > 0):
        raise _fail(name, POSITIVE_INT, value)
    return value


def non_negative_int(name: str, value: object) -> int:
    if not (_is_int(value) and value >= 0):
        raise _fail(name, NON_NEGATIVE_INT, value)
    return value


def positive_number(name: str, value: object) -> float:
    if not (_is_number(value) and 0 < value < math.inf):
        raise _fail(name, POSITIVE_NUMBER, value)
    return float(value)


def fraction(name: str, value: object, *, high_included: bool = False, low_included: bool = True) -> float:
    """A number in [0, 1) (by default), (0, 1] or [0, 1] as the flags say."""
    low, high = ("[" if low_included else "("), ("]" if high_included else ")")
    ok = _is_number(value) and (value >= 0 if low_included else value > 0) and \
        (value <= 1 if high_included else value < 1)
    if not ok:
        raise _fail(name, f"a number in {low}0, 1{high}", value)
    return float(value)


def one_of(name: str, value: object, choices: Iterable[object]) -> object:
    choices = list(choices)
    if not any(type(value) is type(c) and value == c for c in choices):  # True is not 1
        raise ArgumentError(f"{{{name}}} must be one of {quote(', '.join(map(str, choices)))[1:-1]}, "
                            f"got {quote(value)}")
    return value


def optional(check, name: str, value: object):
    """``check(name, value)``, or None where ``value`` is None (an argument left to its default)."""
    return None if value is None else check(name, value)
