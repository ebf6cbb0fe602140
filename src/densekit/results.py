"""What library functions return to their callers (the command line among them): dataclasses,
each with its JSON form, so that no caller reads a result by string keys.

JSON has no NaN or infinity (strict readers, jq and browsers among them, reject Python's
``NaN``): :func:`json_text` writes non-finite numbers as null, here and in every file a
run directory holds.
"""

from __future__ import annotations

import dataclasses
import json
import math


def plain(obj: object) -> object:
    """``obj`` as JSON types, non-finite numbers as None, dataclasses as dicts."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def json_text(obj: object, indent: int | None = None) -> str:
    """JSON text of ``obj`` (see :func:`plain`)."""
    return json.dumps(plain(obj), indent=indent, allow_nan=False)


class Result:
    """Base of the result dataclasses: ``to_dict()`` and ``to_json()``."""

    def to_dict(self) -> dict:
        return plain(self)

    def to_json(self, indent: int | None = None) -> str:
        return json_text(self.to_dict(), indent)
