"""Benchmarks: densekit against torchvision (and timm) on the same card, in the same run.

    spec = BenchSpec(models=["densenet_bc_100_k12"], batch_sizes=[64], input_sizes=[28])
    report = run_bench(spec)          # env, commands, runs, results (with ratios), depth fits, targets
    write_report(report, "bench/results/cpu-torch2.14.json", "bench/results/cpu-torch2.14.md")

Each case (model, batch, input, dtype, layout, device, mode) runs every implementation
in alternating rounds after warm-up; a result row pools the rounds' timed steps into a
median img/s with its range, peak memory and warm-up time, and its ratios to torchvision.
"""

from .impls import build, torchvision_reference, unavailable_reason
from .report import TARGETS, best_configurations, check_targets, depth_fits, linear_fit, summarize, to_markdown
from .spec import IMPLS, QUICK, BenchSpec, Config, model_spec
from .suite import build_report, load_report, run_bench, write_report

__all__ = ["BenchSpec", "Config", "IMPLS", "QUICK", "TARGETS", "best_configurations", "build", "build_report", "check_targets",
           "depth_fits", "linear_fit", "load_report", "model_spec", "run_bench", "summarize", "to_markdown",
           "torchvision_reference", "unavailable_reason", "write_report"]
