"""From raw rounds to the figures: medians, spreads, ratios, depth fits, targets, markdown."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

from .spec import FAMILIES, REFERENCE, Config, cifar_depth


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (case, impl): the rounds pooled, then ratios against torchvision's row."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        config = Config.from_dict(run["config"])
        groups[config.case() + (config.impl,)].append(run)
    rows = []
    for runs_ in groups.values():
        config = Config.from_dict(runs_[0]["config"])
        row = {k: v for k, v in config.to_dict().items() if k not in ("steps", "warmup")}
        ok = [r for r in runs_ if r["status"] == "ok"]
        if not ok:
            row.update(status=runs_[0]["status"], reason=runs_[0].get("reason"))
            rows.append(row)
            continue
        rates = [config.batch_size / t for r in ok for t in r["step_s"]]
        mems = [r["peak_mem_mib"] for r in ok if r.get("peak_mem_mib") is not None]
        wall = sum(r["wall_s"] for r in ok)
        row.update(
            status="ok", rounds=len(ok), steps_timed=len(rates),
            img_s_median=statistics.median(rates), img_s_min=min(rates), img_s_max=max(rates),
            round_img_s_median=[statistics.median(config.batch_size / t for t in r["step_s"]) for r in ok],
            peak_mem_mib=max(mems) if mems else None, mem_metric=ok[0].get("mem_metric"),
            # The first round pays the one-time costs (allocator growth, cuDNN's search); later rounds reuse them.
            warmup_s=ok[0]["warmup_s"], first_step_s=ok[0].get("first_step_s"),
            cpu_util=sum(r["cpu_s"] for r in ok) / wall if wall else None,
            mixed_sources=len({r.get("models_digest") for r in ok}) > 1,
            graph_not_captured=any(r.get("cuda_graph_captured") is False for r in ok),
            malloc_env=ok[0].get("malloc_env") or {},
        )
        rows.append(row)
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    reference = {_case(r): r for r in rows if r["impl"] == REFERENCE and r["status"] == "ok"}
    for row in rows:
        ref = reference.get(_case(row))
        if row["status"] != "ok" or ref is None:
            row.update(speed_vs_torchvision=None, mem_vs_torchvision=None)
            continue
        row["speed_vs_torchvision"] = row["img_s_median"] / ref["img_s_median"]
        both = row["peak_mem_mib"] is not None and ref["peak_mem_mib"]
        row["mem_vs_torchvision"] = row["peak_mem_mib"] / ref["peak_mem_mib"] if both else None


_SETTING = ("model", "batch_size", "input_size", "in_chans", "device", "mode")


def best_configurations(rows: list[dict]) -> list[dict]:
    """For each model, batch, input, device and mode: each side's fastest configuration
    (implementation, dtype and layout; see ``spec.FAMILIES``) and densekit's best against
    torchvision's best, in speed and in the peak memory of those two rows. A user who cares
    about speed runs the fastest configuration each library offers, not fp32 eager: this
    is the comparison that claim is held to. Settings where a side has no measured row are left out."""
    best: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if r["status"] != "ok":
            continue
        for side, impls in FAMILIES.items():
            if r["impl"] in impls:
                held = best[tuple(r[k] for k in _SETTING)].get(side)
                if held is None or r["img_s_median"] > held["img_s_median"]:
                    best[tuple(r[k] for k in _SETTING)][side] = r
    out = []
    for key, sides in best.items():
        if len(sides) < 2:
            continue
        dk, tv = sides["densekit"], sides["torchvision"]
        both = dk["peak_mem_mib"] is not None and tv["peak_mem_mib"]
        out.append(dict(zip(_SETTING, key),
                        **{f"{side}_{k}": r.get(k) for side, r in (("densekit", dk), ("torchvision", tv))
                           for k in ("impl", "dtype", "layout", "img_s_median", "peak_mem_mib", "first_step_s")},
                        speed_ratio=dk["img_s_median"] / tv["img_s_median"],
                        mem_ratio=dk["peak_mem_mib"] / tv["peak_mem_mib"] if both else None))
    return out


def _case(row: dict) -> tuple:
    return tuple(row[k] for k in ("model", "batch_size", "input_size", "in_chans", "dtype", "layout", "device", "mode"))


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares ``y = slope * x + intercept``; returns (slope, intercept, r^2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys))
    return slope, intercept, 1.0 - ss_res / ss_tot if ss_tot else 1.0


def depth_fits(rows: list[dict]) -> list[dict]:
    """Peak memory against depth L for every CIFAR family measured at >= 2 depths."""
    groups: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in rows:
        parsed = cifar_depth(r["model"])
        if r["status"] != "ok" or parsed is None or r.get("peak_mem_mib") is None:
            continue
        bc, depth, k = parsed
        key = (bc, k, r["impl"], r["device"], r["mode"], r["dtype"], r["layout"], r["batch_size"],
               r["input_size"], r["in_chans"])
        groups[key][depth] = r["peak_mem_mib"]
    fits = []
    for (bc, k, impl, device, mode, dtype, layout, batch, size, chans), points in groups.items():
        if len(points) < 2:
            continue
        depths = sorted(points)
        mems = [points[d] for d in depths]
        slope, intercept, r2 = linear_fit(depths, mems)
        # The slope between neighbouring depths: constant for a line, rising for a curve.
        segments = [(m1 - m0) / (d1 - d0) for d0, d1, m0, m1 in zip(depths, depths[1:], mems, mems[1:])]
        fits.append(dict(family=f"DenseNet{'-BC' if bc else ''} k={k}", impl=impl, device=device, mode=mode,
                         dtype=dtype, layout=layout, batch_size=batch, input_size=size, in_chans=chans,
                         depths=depths, peak_mem_mib=mems, slope_mib_per_depth=slope, intercept_mib=intercept,
                         r2=r2, segment_slopes=segments))
    return fits


@dataclass(frozen=True)
class Target:
    """A performance goal (docs/performance.md, "Targets"), as a filter on densekit's rows and
    the ratios it needs."""

    name: str
    match: dict
    speed: float | None = None       # densekit img/s >= speed x torchvision's
    memory: float | None = None      # densekit peak memory <= memory x torchvision's
    warmup_s: float | None = None    # densekit warm-up (capture or compile) <= this


TARGETS = (
    Target("DenseNet-121, 224 px, batch 128, bf16, training (CUDA)",
           dict(model="densenet121", input_size=224, batch_size=128, dtype="bf16", device="cuda", mode="train"),
           speed=1.5, memory=0.5),
    Target("DenseNet-BC-100 k=12, 32 px, batch 64, bf16, training (CUDA)",
           dict(model="densenet_bc_100_k12", input_size=32, batch_size=64, dtype="bf16", device="cuda",
                mode="train"), speed=8.0, warmup_s=30.0),
    Target("DenseNet-121 inference, batch 256, bf16 (CUDA)",
           dict(model="densenet121", batch_size=256, dtype="bf16", device="cuda", mode="infer"), speed=1.3),
    Target("DenseNet-BC-100 k=12, 28 px, batch 64, training (CPU, fp32 NCHW)",
           dict(model="densenet_bc_100_k12", input_size=28, batch_size=64, dtype="fp32", layout="nchw",
                device="cpu", mode="train"), speed=1.3, memory=0.4),
    Target("DenseNet-BC-100 k=12, 28 px, batch 64, inference (CPU, fp32 NCHW)",
           dict(model="densenet_bc_100_k12", input_size=28, batch_size=64, dtype="fp32", layout="nchw",
                device="cpu", mode="infer"), speed=1.3),
)

# "Linear in depth" read as: a straight line explains >= 99.9% of the variance of peak memory.
# Over L = 100..250 even torchvision's quadratic growth scores r² ~ 0.99, so 0.99 would not
# tell a line from a curve; 0.999 does (and the segment slopes beside it show the curvature).
LINEAR_R2 = 0.999


def check_targets(rows: list[dict], fits: list[dict]) -> list[dict]:
    """Each target against every densekit row it matches (one line per layout measured)."""
    out = []
    for t in TARGETS:
        matched = [r for r in rows if r["impl"] == "densekit" and all(r.get(k) == v for k, v in t.match.items())]
        if not matched:
            out.append(dict(target=t.name, layout=None, measured=False, met=None))
        for r in matched:
            checks = []
            if t.speed is not None:
                checks.append(r.get("speed_vs_torchvision") is not None and r["speed_vs_torchvision"] >= t.speed)
            if t.memory is not None:
                checks.append(r.get("mem_vs_torchvision") is not None and r["mem_vs_torchvision"] <= t.memory)
            if t.warmup_s is not None:
                checks.append(r.get("warmup_s") is not None and r["warmup_s"] <= t.warmup_s)
            out.append(dict(target=t.name, layout=r["layout"], measured=r["status"] == "ok",
                             speed_vs_torchvision=r.get("speed_vs_torchvision"), speed_goal=t.speed,
                             mem_vs_torchvision=r.get("mem_vs_torchvision"), memory_goal=t.memory,
                             warmup_s=r.get("warmup_s"), warmup_goal_s=t.warmup_s,
                             met=all(checks) if r["status"] == "ok" else None))
    for f in fits:
        if f["impl"] == "densekit" and f["mode"] == "train":
            out.append(dict(target=f"{f['family']} peak training memory linear in depth ({f['device']}, "
                                   f"batch {f['batch_size']}, {f['input_size']} px, {f['dtype']})",
                            layout=f["layout"], measured=True, r2=f["r2"], r2_goal=LINEAR_R2,
                            met=f["r2"] >= LINEAR_R2))
    return out


# -- markdown ---------------------------------------------------------------------------


def _num(v, digits: int | None = None) -> str:
    if v is None:
        return "–"
    if digits is None:
        digits = 0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2
    return f"{v:,.{digits}f}"


def _ratio(v) -> str:
    return "–" if v is None else f"{v:.2f}x"


def environment_line(env: dict) -> str:
    parts = []
    if env.get("card"):
        parts.append(f"card {env['card']} (driver {env.get('driver') or '?'}, CUDA {env.get('cuda')}, "
                     f"cuDNN {env.get('cudnn')})")
    cpu = f"CPU {env.get('cpu')}, {env.get('cores')} cores, {env.get('torch_threads')} torch threads"
    if "cpu_bf16" in env:
        cpu += f", bf16 instructions: {env['cpu_bf16']}"
    if "native_cpu_kernels" in env:
        cpu += f", native CPU kernels {'on' if env['native_cpu_kernels'] else 'off'}"
    if env.get("malloc"):
        cpu += f", allocator: {env['malloc']}"
    parts.append(cpu)
    versions = [f"torch {env.get('torch')}", f"torchvision {env.get('torchvision')}"]
    if env.get("timm"):
        versions.append(f"timm {env['timm']}")
    parts.append(", ".join(versions))
    src = f"densekit {env.get('densekit')}"
    if env.get("git_commit"):
        src += f" at {env['git_commit']}{' (uncommitted changes)' if env.get('git_dirty') else ''}"
    parts.append(src)
    parts.append(env.get("date", ""))
    return "; ".join(parts)


def to_markdown(report: dict) -> str:
    """The report as markdown: environment, commands, results, depth fits, targets."""
    lines = [f"Measured on: {environment_line(report['env'])}.", ""]
    for command in report.get("commands", []):
        lines.append(f"    {command}")
    lines.append("")
    rows = report["results"]
    ok = [r for r in rows if r["status"] == "ok"]
    lines += ["| model | mode | device | input | batch | dtype | layout | impl | img/s (median) | min – max "
              "| × torchvision | peak MiB | × torchvision | warm-up s |",
              "|---|---|---|---|---|---|---|---|--:|--:|--:|--:|--:|--:|"]
    for r in ok:
        impl = r["impl"] + (" †" if r.get("mixed_sources") else "") + (" §" if r.get("graph_not_captured") else "")
        lines.append(f"| {r['model']} | {r['mode']} | {r['device']} | {r['in_chans']}x{r['input_size']}² "
                     f"| {r['batch_size']} | {r['dtype']} | {r['layout']} | {impl} | {_num(r['img_s_median'])} "
                     f"| {_num(r['img_s_min'])} – {_num(r['img_s_max'])} | {_ratio(r['speed_vs_torchvision'])} "
                     f"| {_num(r['peak_mem_mib'], 0)}{' ‡' if r.get('malloc_env') else ''} "
                     f"| {_ratio(r['mem_vs_torchvision'])} | {_num(r['warmup_s'])} |")
    if ok:
        n = sorted({r["steps_timed"] for r in ok})
        metric = sorted({r["mem_metric"] for r in ok if r.get("mem_metric")})
        lines += ["", f"img/s: median and range over {'/'.join(map(str, n))} timed steps pooled from "
                      f"{'/'.join(map(str, sorted({r['rounds'] for r in ok})))} alternating rounds; peak memory: "
                      f"{', '.join(metric) or 'not measured (in-process CPU run)'}; warm-up: the untimed steps of "
                      f"the first round."]
        mallocs = sorted({" ".join(f"{k}={v}" for k, v in sorted(r["malloc_env"].items()))
                          for r in ok if r.get("malloc_env")})
        if mallocs:
            lines.append(f"‡ measured with {'; '.join(mallocs)}: glibc then returns every large block on free, "
                         f"so peak RSS follows the live tensors instead of what the allocator kept.")
        if any(r.get("graph_not_captured") for r in ok):
            lines.append("§ the CUDA graph was not captured (see the run's log): these steps ran eagerly.")
        if any(r.get("mixed_sources") for r in ok):
            lines.append("† densekit's model sources changed between the rounds of this row (models_digest in "
                         "the JSON): its rounds measured different code.")
    skipped = [r for r in rows if r["status"] != "ok"]
    if skipped:
        lines += ["", "Not run:"]
        seen = set()
        for r in skipped:
            key = (r["model"], r["impl"], r["status"], r.get("reason"))
            if key not in seen:
                seen.add(key)
                lines.append(f"- {r['impl']} on {r['model']}: {r['status']}"
                             f"{' (' + r['reason'] + ')' if r.get('reason') else ''}")
    best = best_configurations(rows)
    if best:
        lines += ["", "Best configuration of each side (fastest implementation, dtype and layout measured; "
                      "first step: compilation or capture included):", "",
                  "| model | mode | device | input | batch | densekit best | img/s | first step s | torchvision best "
                  "| img/s | first step s | × speed | × memory |",
                  "|---|---|---|---|---|---|--:|--:|---|--:|--:|--:|--:|"]
        for b in best:
            sides = [f"{b[f'{s}_impl']} {b[f'{s}_dtype']} {b[f'{s}_layout']} | {_num(b[f'{s}_img_s_median'])} "
                     f"| {_num(b[f'{s}_first_step_s'])}" for s in ("densekit", "torchvision")]
            lines.append(f"| {b['model']} | {b['mode']} | {b['device']} | {b['in_chans']}x{b['input_size']}² "
                         f"| {b['batch_size']} | {sides[0]} | {sides[1]} | {_ratio(b['speed_ratio'])} "
                         f"| {_ratio(b['mem_ratio'])} |")
    fits = report.get("depth_fits") or []
    if fits:
        lines += ["", "Peak memory against depth L (least-squares line):", "",
                  "| family | impl | device | mode | batch | input | dtype | layout | L: peak MiB | MiB per unit L "
                  "| intercept MiB | r² | MiB per unit L between neighbours |",
                  "|---|---|---|---|---|---|---|---|---|--:|--:|--:|---|"]
        for f in fits:
            points = ", ".join(f"{d}: {m:,.0f}" for d, m in zip(f["depths"], f["peak_mem_mib"]))
            lines.append(f"| {f['family']} | {f['impl']} | {f['device']} | {f['mode']} | {f['batch_size']} "
                         f"| {f['in_chans']}x{f['input_size']}² | {f['dtype']} | {f['layout']} | {points} "
                         f"| {f['slope_mib_per_depth']:.2f} | {f['intercept_mib']:,.0f} | {f['r2']:.4f} "
                         f"| {', '.join(f'{v:.2f}' for v in f.get('segment_slopes', []))} |")
    targets = [t for t in report.get("targets") or [] if t["measured"]]
    if targets:
        lines += ["", "Targets (densekit against torchvision in the same run):", "",
                  "| target | layout | img/s ratio (goal) | memory ratio (goal) | warm-up s (goal) | met |",
                  "|---|---|--:|--:|--:|---|"]
        for t in targets:
            if "r2" in t:
                lines.append(f"| {t['target']} | {t['layout']} | r² {t['r2']:.4f} (>= {t['r2_goal']}) | | "
                             f"| {'yes' if t['met'] else 'no'} |")
                continue
            speed = f"{_ratio(t['speed_vs_torchvision'])} (>= {t['speed_goal']}x)" if t["speed_goal"] else ""
            mem = f"{_ratio(t['mem_vs_torchvision'])} (<= {t['memory_goal']}x)" if t["memory_goal"] else ""
            warm = f"{_num(t['warmup_s'])} (<= {t['warmup_goal_s']:.0f})" if t["warmup_goal_s"] else ""
            lines.append(f"| {t['target']} | {t['layout']} | {speed} | {mem} | {warm} "
                         f"| {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"
