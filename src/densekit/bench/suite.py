"""A whole benchmark: every case, every implementation, alternating rounds, one report."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import traceback
from pathlib import Path

import torch

from ..errors import UserError
from .env import environment
from .impls import unavailable_reason
from .measure import measure
from .report import best_configurations, check_targets, depth_fits, summarize, to_markdown
from .spec import BenchSpec, Config

logger = logging.getLogger(__name__)

SCHEMA = 1


def _isolated(config: Config) -> dict:
    # The worker must import this same densekit, installed or not (src/ on PYTHONPATH).
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "densekit.bench.worker", json.dumps(config.to_dict())],
                          capture_output=True, text=True, env=env)
    if proc.returncode == 0:
        return dict(status="ok", **json.loads(proc.stdout.strip().splitlines()[-1]))
    if proc.returncode < 0:
        return dict(status="error", reason=f"worker killed by signal {-proc.returncode} (out of memory?)")
    tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["no message"]
    status = "oom" if "OutOfMemoryError" in proc.stderr else "error"
    return dict(status=status, reason=tail[0].strip())


def _in_process(config: Config) -> dict:
    try:
        return dict(status="ok", **measure(config))
    except torch.cuda.OutOfMemoryError as e:
        return dict(status="oom", reason=" ".join(str(e).split())[:200])
    except Exception as e:  # one broken implementation must not lose a long run's other figures
        logger.error("%s failed:\n%s", config.label(), traceback.format_exc())
        return dict(status="error", reason=f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_configs(spec: BenchSpec) -> list[dict]:
    """Every configuration of ``spec``, ``spec.rounds`` times, implementations alternating."""
    cases: dict[tuple, list[Config]] = {}
    for config in spec.configs():
        cases.setdefault(config.case(), []).append(config)
    total = sum(len(c) for c in cases.values()) * spec.rounds
    runs, done = [], 0
    for configs in cases.values():
        skip = {c: unavailable_reason(c) for c in configs}
        for r in range(spec.rounds):
            # A B, then B A: a machine that drifts (clocks, other users' load) weighs on both sides
            # alike, and no implementation always runs first on a cold cache.
            order = configs if r % 2 == 0 else configs[::-1]
            for config in order:
                done += 1
                if skip[config]:
                    result = dict(status="unavailable", reason=skip[config])
                else:
                    result = _isolated(config) if spec.isolate(config.device) else _in_process(config)
                runs.append(dict(config=config.to_dict(), round=r, **result))
                if result["status"] == "ok":
                    rate = config.batch_size * len(result["step_s"]) / result["wall_s"]
                    mem = result["peak_mem_mib"]
                    logger.info("[%d/%d] %s round %d: %.1f img/s%s", done, total, config.label(), r, rate,
                                "" if mem is None else f", peak {mem:,.0f} MiB")
                elif r == 0 or result["status"] != "unavailable":
                    logger.info("[%d/%d] %s: %s (%s)", done, total, config.label(), result["status"],
                                result.get("reason"))
    return runs


def build_report(runs: list[dict], env: dict, commands: list[str]) -> dict:
    results = summarize(runs)
    fits = depth_fits(results)
    return dict(schema=SCHEMA, env=env, commands=commands, results=results, depth_fits=fits,
                best=best_configurations(results), targets=check_targets(results, fits), runs=runs)


def load_report(path: str | Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read benchmark results {path}: {e}") from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA or "runs" not in report:
        raise UserError(f"{path} is not a densekit bench report (schema {SCHEMA})")
    return report


def run_bench(spec: BenchSpec, previous: dict | None = None) -> dict:
    """Run ``spec``; with ``previous`` (a loaded report) its runs are kept and the figures recomputed.

    Appending is for building one table from several invocations on the same machine; a
    report from another card or torch would mix figures that cannot be compared.
    """
    env = environment()
    if previous is not None:
        old = previous["env"]
        for key in ("card", "torch", "torchvision", "malloc"):
            if old.get(key) != env.get(key):
                # results from before the allocator was recorded ran under glibc's defaults, unrecorded
                was = old.get(key, "unrecorded") if key == "malloc" else old.get(key)
                raise UserError(f"cannot append: the results were measured with {key} {was!r}, "
                                f"this process has {env.get(key)!r}")
    runs = run_configs(spec)
    # glibc's tuning variables change what peak RSS counts, so they are part of the command.
    malloc = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")]
    command = " ".join([*malloc, spec.command()])
    if previous is not None:
        return build_report(previous["runs"] + runs, previous["env"], previous["commands"] + [command])
    return build_report(runs, env, [command])


def write_report(report: dict, out: str | Path | None = None, md: str | Path | None = None) -> None:
    for path, text in ((out, json.dumps(report, indent=1) + "\n"), (md, to_markdown(report))):
        if path is None:
            continue
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        logger.info("wrote %s", path)
