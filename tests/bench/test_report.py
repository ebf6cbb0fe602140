"""Medians, spreads, ratios, depth fits and targets from known step times."""

import pytest

from densekit.bench import best_configurations, check_targets, depth_fits, linear_fit, summarize, to_markdown
from densekit.bench.env import card_slug


def run(impl, step_s, round_=0, mem=None, model="densenet_bc_100_k12", batch=64, size=28, device="cpu",
        mode="train", status="ok", warmup_s=1.0):
    config = dict(model=model, batch_size=batch, input_size=size, in_chans=1, dtype="fp32", layout="nchw",
                  device=device, mode=mode, impl=impl, steps=len(step_s), warmup=1)
    if status != "ok":
        return dict(config=config, round=round_, status=status, reason="why not")
    return dict(config=config, round=round_, status="ok", step_s=step_s, cpu_s=2 * sum(step_s),
                wall_s=sum(step_s), warmup_s=warmup_s, first_step_s=warmup_s, peak_mem_mib=mem,
                base_mem_mib=500.0, mem_metric="peak_rss_growth" if mem is not None else None, threads=2)


def test_rounds_pool_into_median_spread_and_ratios():
    runs = [run("densekit", [2.0, 4.0], 0, mem=900.0), run("torchvision", [4.0, 8.0], 0, mem=1800.0),
            run("torchvision", [4.0, 4.0, 16.0], 1, mem=1750.0), run("densekit", [1.0], 1, mem=950.0),
            run("densekit-ref", [1.0], 0, status="unavailable")]
    rows = {r["impl"]: r for r in summarize(runs)}
    dk, tv = rows["densekit"], rows["torchvision"]
    # densekit img/s per step: 32, 16, 64 -> median 32; torchvision: 16, 8, 16, 16, 4 -> median 16
    assert dk["steps_timed"] == 3 and dk["rounds"] == 2
    assert dk["img_s_median"] == 32 and dk["img_s_min"] == 16 and dk["img_s_max"] == 64
    assert dk["round_img_s_median"] == [24, 64]
    assert tv["img_s_median"] == 16 and tv["img_s_min"] == 4
    assert dk["speed_vs_torchvision"] == 2.0 and tv["speed_vs_torchvision"] == 1.0
    assert dk["peak_mem_mib"] == 950.0 and tv["peak_mem_mib"] == 1800.0  # the worst round
    assert dk["mem_vs_torchvision"] == pytest.approx(950 / 1800)
    assert dk["warmup_s"] == 1.0 and dk["cpu_util"] == pytest.approx(2.0)
    assert rows["densekit-ref"]["status"] == "unavailable" and rows["densekit-ref"]["reason"] == "why not"


def test_no_ratio_without_a_reference_or_its_memory():
    rows = summarize([run("densekit", [1.0]), run("torchvision", [1.0], status="oom"),
                      run("densekit", [1.0], model="densenet_bc_10_k12"),
                      run("torchvision", [2.0], model="densenet_bc_10_k12")])
    by = {(r["model"], r["impl"]): r for r in rows}
    assert by["densenet_bc_100_k12", "densekit"]["speed_vs_torchvision"] is None
    assert by["densenet_bc_10_k12", "densekit"]["speed_vs_torchvision"] == 2.0
    assert by["densenet_bc_10_k12", "densekit"]["mem_vs_torchvision"] is None


def test_rounds_that_measured_different_sources_are_flagged():
    a, b = run("densekit", [1.0], 0), run("densekit", [1.0], 1)
    a["models_digest"], b["models_digest"] = "aaa", "bbb"
    (row,) = summarize([a, b])
    assert row["mixed_sources"] is True
    report = dict(env={}, commands=[], results=[row], depth_fits=[], targets=[])
    assert "| densekit † |" in to_markdown(report) and "measured different code" in to_markdown(report)
    b["models_digest"] = "aaa"
    assert summarize([a, b])[0]["mixed_sources"] is False


def test_rounds_whose_cuda_graph_was_not_captured_are_flagged():
    a, b = run("densekit", [1.0], 0, device="cuda"), run("densekit", [1.0], 1, device="cuda")
    a["cuda_graph_captured"], b["cuda_graph_captured"] = True, False
    (row,) = summarize([a, b])
    assert row["graph_not_captured"] is True
    report = dict(env={}, commands=[], results=[row], depth_fits=[], targets=[])
    assert "| densekit § |" in to_markdown(report) and "not captured" in to_markdown(report)
    b["cuda_graph_captured"] = True
    assert summarize([a, b])[0]["graph_not_captured"] is False
    assert summarize([run("torchvision", [1.0])])[0]["graph_not_captured"] is False  # eager: nothing to flag


def test_malloc_settings_are_carried_to_the_table():
    a = run("densekit", [1.0], mem=100.0)
    a["malloc_env"] = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    (row,) = summarize([a])
    md = to_markdown(dict(env={}, commands=[], results=[row], depth_fits=[], targets=[]))
    assert "| 100 ‡ |" in md and "‡ measured with MALLOC_MMAP_THRESHOLD_=65536" in md
    md = to_markdown(dict(env=dict(cpu="AMD EPYC", cores=2, torch_threads=2, malloc="glibc malloc: mmap threshold "
                                   "32 MiB, trim threshold 1 GiB"), commands=[], results=[], depth_fits=[], targets=[]))
    assert md.startswith("Measured on: CPU AMD EPYC, 2 cores, 2 torch threads, allocator: glibc malloc: mmap threshold "
                         "32 MiB, trim threshold 1 GiB; ")


def test_linear_fit():
    slope, intercept, r2 = linear_fit([100, 190, 250], [3 * 100 + 50, 3 * 190 + 50, 3 * 250 + 50])
    assert slope == pytest.approx(3.0) and intercept == pytest.approx(50.0) and r2 == pytest.approx(1.0)
    slope, intercept, r2 = linear_fit([0, 1, 2], [0, 1, 4])  # a parabola is not a line
    assert slope == pytest.approx(2.0) and intercept == pytest.approx(-1 / 3) and r2 == pytest.approx(12 / 13)


def test_depth_fit_per_implementation_and_target():
    runs = []
    for depth in (100, 190, 250):
        runs.append(run("densekit", [1.0], model=f"densenet_bc_{depth}_k12", batch=16, mem=2.0 * depth + 10))
        runs.append(run("torchvision", [1.0], model=f"densenet_bc_{depth}_k12", batch=16, mem=0.1 * depth ** 2))
    runs.append(run("densekit", [1.0], model="densenet_bc_100_k12", batch=32, mem=1.0))  # lone depth: no fit
    fits = {f["impl"]: f for f in depth_fits(summarize(runs))}
    assert set(fits) == {"densekit", "torchvision"}
    assert fits["densekit"]["depths"] == [100, 190, 250]
    assert fits["densekit"]["slope_mib_per_depth"] == pytest.approx(2.0)
    assert fits["densekit"]["r2"] == pytest.approx(1.0) and fits["torchvision"]["r2"] < 0.999
    assert fits["densekit"]["segment_slopes"] == pytest.approx([2.0, 2.0])
    assert fits["torchvision"]["segment_slopes"] == pytest.approx([29.0, 44.0])  # 0.1 (d0 + d1)
    assert fits["densekit"]["family"] == "DenseNet-BC k=12"
    linear = [t for t in check_targets(summarize(runs), list(fits.values())) if "r2" in t]
    assert len(linear) == 1 and linear[0]["met"] is True


def test_cpu_targets_met_and_missed():
    rows = summarize([run("densekit", [1.0], mem=700.0), run("torchvision", [1.4], mem=1885.0),
                      run("densekit", [1.0], mode="infer"), run("torchvision", [1.2], mode="infer")])
    targets = {t["target"]: t for t in check_targets(rows, [])}
    train = targets["DenseNet-BC-100 k=12, 28 px, batch 64, training (CPU, fp32 NCHW)"]
    assert train["speed_vs_torchvision"] == pytest.approx(1.4) and train["met"] is True
    infer = targets["DenseNet-BC-100 k=12, 28 px, batch 64, inference (CPU, fp32 NCHW)"]
    assert infer["speed_vs_torchvision"] == pytest.approx(1.2) and infer["met"] is False
    gpu = targets["DenseNet-121, 224 px, batch 128, bf16, training (CUDA)"]
    assert gpu["measured"] is False and gpu["met"] is None


def test_markdown_table():
    runs = [run("densekit", [2.0], mem=900.0), run("torchvision", [4.0], mem=1800.0),
            run("timm", [1.0], status="unavailable")]
    rows = summarize(runs)
    report = dict(env=dict(cpu="AMD EPYC", cores=2, torch_threads=2, torch="2.14.1", torchvision="0.29.1",
                           densekit="0.1.0", date="2026-01-01"),
                  commands=["densekit bench --quick"], results=rows, depth_fits=[], targets=check_targets(rows, []))
    md = to_markdown(report)
    assert "    densekit bench --quick" in md
    assert "| densenet_bc_100_k12 | train | cpu | 1x28² | 64 | fp32 | nchw | densekit | 32.0 | 32.0 – 32.0 " \
           "| 2.00x | 900 | 0.50x | 1.00 |" in md
    assert "- timm on densenet_bc_100_k12: unavailable (why not)" in md
    assert "| DenseNet-BC-100 k=12, 28 px, batch 64, training (CPU, fp32 NCHW) | nchw | 2.00x (>= 1.3x) " \
           "| 0.50x (<= 0.4x) |  | no |" in md


@pytest.mark.parametrize("card, slug", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                        ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("NVIDIA A100-SXM4-80GB", "a100")])
def test_card_slug(card, slug):
    assert card_slug(dict(card=card), ["cuda"]) == slug
    assert card_slug(dict(card=card), ["cpu"]) == "cpu"


def test_best_configuration_of_each_side():
    # densekit's fastest (bf16 channels-last eager) against torchvision's fastest (compiled fp32),
    # whatever the dtype and layout; memory from those two rows
    def row(impl, step, dtype="fp32", layout="nchw", mem=None, first=1.0, mode="train"):
        r = run(impl, [step], mem=mem, warmup_s=first, mode=mode)
        r["config"].update(dtype=dtype, layout=layout)
        return r

    runs = [row("densekit", 2.0, mem=300.0), row("densekit", 1.0, "bf16", "channels_last", mem=200.0),
            row("densekit-compile", 4.0, mem=250.0, first=90.0), row("torchvision", 4.0, mem=1000.0),
            row("torchvision", 3.0, "bf16", "channels_last", mem=900.0),
            row("torchvision-compile", 2.0, mem=800.0, first=250.0), row("densekit-ref", 0.5, mem=5000.0),
            row("densekit", 1.0, mode="infer")]  # no torchvision row for inference: no comparison
    rows = summarize(runs)
    best = best_configurations(rows)
    assert len(best) == 1
    b = best[0]
    assert (b["densekit_impl"], b["densekit_dtype"], b["densekit_layout"]) == ("densekit", "bf16", "channels_last")
    assert (b["torchvision_impl"], b["torchvision_dtype"]) == ("torchvision-compile", "fp32")
    assert b["densekit_img_s_median"] == 64 and b["torchvision_img_s_median"] == 32
    assert b["speed_ratio"] == 2.0 and b["mem_ratio"] == 0.25 and b["torchvision_first_step_s"] == 250.0
    table = to_markdown(dict(env={}, commands=[], results=rows, depth_fits=[], targets=[]))
    assert "| densekit bf16 channels_last | 64.0 | 1.00 | torchvision-compile fp32 nchw | 32.0 | 250 | 2.00x | 0.25x |" in table
