"""``densekit analyze``: files written, JSON printed, user mistakes exit 2, nothing overwritten."""

from __future__ import annotations

import json

import pytest

import densekit.analyze.report as report
from densekit.analyze.cost import activation_memory, cost_table


def test_run_dir_analysis_writes_json_and_pngs(cli, run_dir, tmp_path):
    out = tmp_path / "a"
    rc, stdout, err = cli("analyze", run_dir, "--what", "reuse,gradients,overfit", "--out", out, "--json")
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["trained"] is True and summary["target"] == "densenet_bc_100_k12"
    assert sorted(p.name for p in out.iterdir()) == ["gradients.json", "gradients.png", "overfit.json",
                                                      "overfit.png", "reuse.json", "reuse.png"]
    reuse = json.loads((out / "reuse.json").read_text())
    assert [b["block"] for b in reuse["blocks"]] == ["denseblock1", "denseblock2"]
    assert reuse["blocks"][0]["targets"] == ["layer 1", "transition"]
    assert reuse["blocks"][1]["targets"] == ["layer 1", "classifier"]
    overfit = json.loads((out / "overfit.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["val_acc"] for e in overfit["epochs"]] == [m["val_acc"] for m in metrics]
    assert len(overfit["epochs"]) == 2
    gradients = json.loads((out / "gradients.json").read_text())
    assert gradients["dataset"] == "mnist" and gradients["batch"] == [10, 1, 16, 16]  # the 10 validation images
    assert summary["gradient_ratio_dense"] == gradients["dense"]["first_last_ratio"]
    assert (out / "reuse.png").read_bytes().startswith(b"\x89PNG")


def test_default_out_is_inside_the_run_and_is_never_overwritten(cli, run_dir):
    rc, stdout, err = cli("analyze", run_dir, "--what", "overfit")
    assert rc == 0, err
    written = run_dir / "analysis" / "overfit.json"
    assert "overfit: best validation accuracy" in stdout and written.is_file()
    before = written.read_bytes()
    rc, stdout, err = cli("analyze", run_dir, "--what", "reuse,overfit")
    assert rc == 2 and stdout == ""
    assert err.strip().splitlines() == [f"densekit analyze: error: {written}: already exists; refusing to "
                                        f"overwrite it (choose another --out)"]
    assert written.read_bytes() == before
    assert not (run_dir / "analysis" / "reuse.json").exists()  # nothing of the refused run was written


def test_untrained_model_name_says_so(cli, tmp_path, caplog):
    out = tmp_path / "untrained"
    rc, stdout, err = cli("analyze", "densenet_bc_40_k12_s2", "--what", "reuse", "--out", out)
    assert rc == 0, err
    reuse = json.loads((out / "reuse.json").read_text())
    assert reuse["trained"] is False and reuse["note"].startswith("untrained")
    assert [len(b["targets"]) for b in reuse["blocks"]] == [7, 7, 7]  # 6 layers + transition/classifier
    assert "untrained" in caplog.text


def test_cost_through_the_cli(cli, tmp_path, monkeypatch):
    # the full table builds a dozen ImageNet models; two small rows show the wiring
    monkeypatch.setattr(report, "cost_table", lambda: cost_table(["paper:resnet110", "densekit:densenet_40_k12"]))
    monkeypatch.setattr(report, "activation_memory",
                        lambda: activation_memory(image_size=32, batch=2, names=["torchvision:resnet50"]))
    rc, stdout, err = cli("analyze", "densenet_bc_40_k12_s2", "--what", "cost", "--out", tmp_path / "c")
    assert rc == 0, err
    cost = json.loads((tmp_path / "c" / "cost.json").read_text())
    assert cost["model_cost"]["params"] == 175_690 and cost["model_cost"]["input_size"] == [1, 28, 28]
    assert [r["model"] for r in cost["references"]] == ["paper:resnet110", "densekit:densenet_40_k12"]
    assert cost["references"][1]["params"] == 1_019_722 and cost["references"][1]["published"]["value"] == 5.24
    assert cost["activations"]["rows"][0]["saved_bytes_per_image"] > 0
    assert "cost: 175,690 params" in stdout


@pytest.mark.parametrize("argv, message", [
    (["densnet121", "--out", "{tmp}"], "densnet121: is neither a run directory nor a registered model; give"),
    (["densenet121"], "--out is needed when the target is a model name (densenet121)"),
    (["densenet121", "--what", "overfit", "--out", "{tmp}"], "--what overfit needs a run directory"),
    (["{run}", "--what", "reuse,speed"], "--what: unknown analysis 'speed'; choose from reuse, gradients, cost"),
    (["{run}", "--what", ","], "--what: unknown analysis ','"),
    (["{tmp}"], "not a densekit run directory (no model.json)"),
    (["{run}/model.json"], "model.json: is not a directory"),
    (["{run}", "--out", "{run}/model.json"], "model.json: exists and is not a directory"),
])
def test_user_mistakes_exit_2_with_one_line(cli, run_dir, tmp_path, argv, message):
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, stdout, err = cli("analyze", *[a.format(run=run_dir, tmp=tmp_path) for a in argv])
    assert rc == 2 and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("densekit analyze: error: "), err
    assert message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_file_that_appears_while_computing_is_not_replaced(cli, run_dir, tmp_path, monkeypatch):
    out = tmp_path / "race"
    real = report._RUNNERS["reuse"]

    def reuse_while_someone_writes(target):
        out.mkdir()
        (out / "reuse.json").write_text("someone else's\n")
        return real(target)

    monkeypatch.setitem(report._RUNNERS, "reuse", reuse_while_someone_writes)
    rc, _, err = cli("analyze", run_dir, "--what", "reuse", "--out", out)
    assert rc == 2 and "reuse.json: already exists; refusing to overwrite it" in err
    assert (out / "reuse.json").read_text() == "someone else's\n"


def test_default_analyses_of_a_run_without_metrics_leave_overfit_out(run_dir, tmp_path):
    # a pruned run's directory has model.json and weights but no metrics.jsonl
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.json", "model.safetensors"):
        shutil.copy(run_dir / name, bare / name)
    assert report.parse_what(None, report.resolve_target(str(bare))) == ["reuse", "gradients", "cost"]
    assert report.parse_what(None, report.resolve_target(str(run_dir))) == ["reuse", "gradients", "cost", "overfit"]
