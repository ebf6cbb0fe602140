"""One configuration in a fresh process: ``python -m densekit.bench.worker '<config JSON>'``.

Prints one JSON line, :func:`densekit.bench.measure.measure`'s result. A fresh process
per CPU configuration is what makes its peak RSS its own.
"""

from __future__ import annotations

import json
import sys

from ..malloc import tune_malloc
from .measure import measure
from .spec import Config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m densekit.bench.worker '<config JSON>'", file=sys.stderr)
        return 2
    tune_malloc()  # as the densekit command that started this process; the same for every implementation
    result = measure(Config.from_dict(json.loads(argv[0])), record_cpu_memory=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
