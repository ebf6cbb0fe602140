"""Training memory of pruned DenseNet-BC models against depth, each depth in a fresh process.

    python bench/prune_memory.py [--depths 100,190,250] [--seeds 3] [--amount 0.4] [--batch 16] [--size 28]
                                 [--unit map|channel]

For each depth L, a child process builds ``densenet_bc_L_k12`` (k=12, 1 input channel, 10
classes) with batch-norm scales drawn at random from each of ``--seeds`` seeds (so that the
global threshold prunes every block), prunes ``--amount`` of its prunable channels (``--unit`` as ``densekit prune --unit``;
per channel without rounding) and measures the peak resident memory
of two training steps (SGD) above the memory before them (Linux's VmHWM, reset through
/proc/self/clear_refs), with ``MALLOC_MMAP_THRESHOLD_=65536`` as in ``bench/cpu.sh`` so that
glibc returns large blocks on free and the peak follows the live tensors; then the peak of two
more steps above the memory before them (``steady_peak_mib``: a step's own memory, without what
the first steps leave behind, such as the gradients, oneDNN's cache of convolution primitives
and the allocator's free memory). The same is
measured for the pruned model on the reference path (``set_fused(False)``), and for both the peak of live tensors
over two more steps (``tensor_peak_mib``: torch.profiler's record of every allocation and free through PyTorch's
CPU allocator, which leaves out the allocator's own slack and memory outside it). Prints one JSON line per depth and
seed, then for each measure a least-squares line through each path's mean over the seeds at each depth (slope per
layer, r^2) and the slope between neighbouring depths. Each seed prunes a different model: at one depth two seeds' peaks differ by
a few MiB (docs/performance.md, "Pruning whole maps"), which the mean evens out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, torch
import densekit
from densekit.bench.measure import _peak_rss_bytes, _reset_peak_rss, _rss_bytes
from densekit.bench.spec import model_spec
from densekit.prune import prune_model
depth, amount, batch, size, fused = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
unit, seed = sys.argv[6], int(sys.argv[7])
torch.manual_seed(seed)
base, overrides = model_spec(f"densenet_bc_{depth}_k12")
model = densekit.create_model(base, **overrides, in_chans=1, num_classes=10)
with torch.no_grad():
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.uniform_(0.0, 1.0)
prune_model(model, amount, unit=unit)
model.set_fused(fused).train()
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(batch, 1, size, size), torch.randint(0, 10, (batch,))
def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
before = _rss_bytes()
assert _reset_peak_rss()
step()
step()
rss = (_peak_rss_bytes() - before) / 2 ** 20
warm = _rss_bytes()
assert _reset_peak_rss()
step()
step()
steady = (_peak_rss_bytes() - warm) / 2 ** 20
# the peak of live tensors over two more steps: torch.profiler's record of every allocation
# and free through PyTorch's CPU allocator, summed in time order
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    step()
    step()
live = peak = 0
for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()):
    live += e.nbytes()
    peak = max(peak, live)
print(json.dumps(dict(depth=depth, seed=seed, fused=fused, peak_mib=rss, steady_peak_mib=steady,
                      tensor_peak_mib=peak / 2 ** 20,
                      blocks_fused=sum(1 for m in model.modules() if hasattr(m, "fused_status") and m.fused_status() is None))))
"""


def fit(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    ss_res = sum((y - (my + slope * (x - mx))) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return slope, 1 - ss_res / ss_tot if ss_tot else 1.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", default="100,190,250")
    p.add_argument("--seeds", type=int, default=3, help="models pruned per depth, each from its own random scales")
    p.add_argument("--amount", type=float, default=0.4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--unit", choices=("map", "channel"), default="map")
    args = p.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    rows = []
    for depth in depths:
        for seed in range(args.seeds):
            for fused in ("1", "0"):
                out = subprocess.run([sys.executable, "-c", CHILD, str(depth), str(args.amount), str(args.batch),
                                      str(args.size), fused, args.unit, str(seed)], check=True, capture_output=True,
                                     text=True, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    for key in ("peak_mib", "steady_peak_mib", "tensor_peak_mib"):
        for fused in (True, False):
            means = [statistics.mean(r[key] for r in rows if r["fused"] == fused and r["depth"] == d) for d in depths]
            slope, r2 = fit(depths, means)
            between = [(b - a) / (e - d) for a, b, d, e in zip(means, means[1:], depths, depths[1:])]
            print(json.dumps(dict(measure=key, fused=fused, mean_mib=means, slope_mib_per_layer=slope, r2=r2,
                                  slope_between_neighbours=between)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
