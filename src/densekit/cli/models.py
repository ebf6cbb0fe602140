"""``densekit models``: the registry as a table (parameters, MACs at the default input)."""

from __future__ import annotations

import json

from ..errors import UserError
from ..models import create_model, get_variant, list_models
from ..models.profile import count_macs, count_params


def add_arguments(p) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="shell-style name filter (default: all)")
    p.add_argument("--json", action="store_true", help="one JSON object per model instead of a table")


def model_table(pattern: str = "*") -> list[dict]:
    rows = []
    for name in list_models(pattern):
        variant = get_variant(name)
        model = create_model(name, in_chans=variant.input_size[0])
        rows.append(dict(model=name, params=count_params(model), macs=count_macs(model, variant.input_size),
                         input_size=list(variant.input_size), num_classes=variant.num_classes))
    return rows


def run(args) -> int:
    if not list_models(args.pattern):  # a typo should not look like an empty registry
        raise UserError(f"no model matches {args.pattern!r}; known: {', '.join(list_models())}")
    rows = model_table(args.pattern)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'model':<22}{'params':>14}{'GMACs':>10}  input")
    for r in rows:
        print(f"{r['model']:<22}{r['params']:>14,}{r['macs'] / 1e9:>10.2f}  {'x'.join(map(str, r['input_size']))}")
    return 0
