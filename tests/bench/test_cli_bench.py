"""``densekit bench`` end to end on a tiny network: JSON, markdown, ratios, user errors."""

import json
import statistics

import pytest
import torch

from densekit import malloc
from densekit.cli import main

ENV_FIELDS = ("date", "torch", "torchvision", "timm", "cpu", "cores", "torch_threads", "card", "driver", "cuda")


def bench(tmp_path, *flags, name="r"):
    out, md = tmp_path / f"{name}.json", tmp_path / f"{name}.md"
    code = main(["bench", *flags, "--out", str(out), "--md", str(md)])
    return code, json.loads(out.read_text()), md.read_text()


def test_quick_run_writes_results_and_table(tmp_path, capsys):
    code, report, md = bench(tmp_path, "--quick", "--in-process", "--device", "cpu")
    assert code == 0
    assert all(k in report["env"] for k in ENV_FIELDS)
    assert report["commands"] == [
        "densekit bench --models densenet_bc_16_k4 --batch-size 4 --input-size 16 --dtype fp32 --layout nchw "
        "--device cpu --mode train infer --impl densekit torchvision --steps 3 --warmup 1 --rounds 2 --in-process"]
    rows = {(r["mode"], r["impl"]): r for r in report["results"]}
    assert set(rows) == {(m, i) for m in ("train", "infer") for i in ("densekit", "torchvision")}
    # two alternating rounds per case: A B then B A
    order = [(r["config"]["impl"], r["round"]) for r in report["runs"] if r["config"]["mode"] == "train"]
    assert order == [("densekit", 0), ("torchvision", 0), ("torchvision", 1), ("densekit", 1)]
    for mode in ("train", "infer"):
        dk, tv = rows[mode, "densekit"], rows[mode, "torchvision"]
        for r in (dk, tv):
            assert r["status"] == "ok" and r["steps_timed"] == 6 and r["rounds"] == 2
            assert 0 < r["img_s_min"] <= r["img_s_median"] <= r["img_s_max"]
            assert r["warmup_s"] > 0 and r["peak_mem_mib"] is None  # in-process CPU: RSS not its own
        assert dk["speed_vs_torchvision"] == pytest.approx(dk["img_s_median"] / tv["img_s_median"])
        assert tv["speed_vs_torchvision"] == 1.0
    rates = [4 / t for r in report["runs"] if r["config"]["impl"] == "densekit" and r["config"]["mode"] == "train"
             for t in r["step_s"]]
    assert len(rates) == 6 and rows["train", "densekit"]["img_s_median"] == pytest.approx(statistics.median(rates))
    assert "| densenet_bc_16_k4 | train | cpu | 3x16² | 4 | fp32 | nchw | densekit |" in md
    assert md == capsys.readouterr().out


def test_cpu_memory_is_measured_in_a_fresh_process(tmp_path):
    code, report, _ = bench(tmp_path, "--quick", "--device", "cpu", "--mode", "train", "--impl", "densekit",
                            "--rounds", "1", "--steps", "2")
    assert code == 0
    (row,) = report["results"]
    assert row["mem_metric"] in ("peak_rss_growth", "ru_maxrss_growth")
    # weights, gradients, momentum and activations of a real (if tiny) training step
    assert 0.1 < row["peak_mem_mib"] < 2000
    (run,) = report["runs"]
    assert run["base_mem_mib"] > 50  # torch itself is resident before the first step
    assert run["models_digest"] == report["env"]["models_digest"] and run["started"] >= report["env"]["date"][:10]
    # the worker sets the allocator as the densekit command does, and the run records it
    expected = malloc.tune_malloc() or malloc.setting()
    assert run["malloc"] == report["env"]["malloc"] == expected
    if malloc._glibc() is not None and malloc.user_choice() is None:
        assert expected.startswith("glibc malloc: mmap threshold ")


def test_append_and_render(tmp_path, capsys):
    flags = ["--quick", "--in-process", "--device", "cpu", "--mode", "infer", "--impl", "densekit", "torchvision",
             "--rounds", "1", "--steps", "2"]
    bench(tmp_path, *flags)
    code, report, md = bench(tmp_path, *flags, "--batch-size", "2", "--append")
    assert code == 0 and len(report["commands"]) == 2
    assert sorted(r["batch_size"] for r in report["results"]) == [2, 2, 4, 4]
    capsys.readouterr()
    assert main(["bench", "--render", str(tmp_path / "r.json")]) == 0
    assert capsys.readouterr().out == md
    # results measured under another allocator setting (or before it was recorded) are not mixed in
    del report["env"]["malloc"]
    (tmp_path / "r.json").write_text(json.dumps(report))
    assert main(["bench", *flags, "--out", str(tmp_path / "r.json"), "--append"]) == 2
    assert "cannot append: the results were measured with malloc 'unrecorded'" in capsys.readouterr().err


def test_quick_writes_no_file_unless_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    flags = ["bench", "--quick", "--in-process", "--device", "cpu", "--mode", "infer", "--impl", "densekit",
             "--rounds", "1", "--steps", "1"]
    assert main(flags) == 0
    assert list(tmp_path.iterdir()) == [] and "| densenet_bc_16_k4 | infer |" in capsys.readouterr().out


def test_unavailable_reference_is_reported_not_approximated(tmp_path):
    code, report, md = bench(tmp_path, "--models", "densenet_10_k4", "--input-size", "8", "--batch-size", "2",
                             "--steps", "1", "--warmup", "0", "--rounds", "1", "--mode", "infer", "--in-process",
                             "--device", "cpu")
    assert code == 0
    rows = {r["impl"]: r for r in report["results"]}
    assert rows["torchvision"]["status"] == "unavailable" and "bottleneck" in rows["torchvision"]["reason"]
    assert rows["densekit"]["status"] == "ok" and rows["densekit"]["speed_vs_torchvision"] is None
    assert "- torchvision on densenet_10_k4: unavailable" in md


BAD = [
    (["--models", "densnet121"], "unknown model 'densnet121'"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--dtype", "fp16"], "invalid choice"),
    (["--input-size", "2"], "input size 2 is too small"),
    (["--depths", "101"], "depth L must be 4 + a positive multiple of 6"),
    (["--models", "densenet121", "--depths", "100"], "--depths applies to CIFAR"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--warmup", "-1"], "warmup must be a non-negative integer"),
    (["--rounds", "x"], "invalid int value"),
    (["--append", "--out", "/nonexistent/r.json"], "no results at"),
    (["--append"], "--append needs --out"),
    (["--impl", "torchvision-compile", "--warmup", "0"], "warmup must be >= 1 for a compiled implementation"),
    (["--render", "/nonexistent/r.json"], "cannot read benchmark results"),
]
if not torch.cuda.is_available():
    BAD.append((["--device", "cuda"], "no CUDA device"))


@pytest.mark.parametrize("flags, message", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_flags_exit_2_with_one_line(flags, message, capsys):
    try:
        code = main(["bench", "--quick", *flags])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
