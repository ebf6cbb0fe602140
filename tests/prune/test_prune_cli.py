"""`densekit prune` on a trained run, the pruned run directory in use (load, eval, predict),
fine-tuning it with `train --init` (and resuming that), and the user errors."""

from __future__ import annotations

import contextlib
import os
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import densekit
from densekit.cli import main
from densekit.errors import UserError
from densekit.prune import prune_model
from densekit.rundir import RunDir, pruned_structure

FINE_TUNE = ["--epochs", "2", "--batch-size", "8", "--deterministic", "--no-progress"]


@pytest.fixture(scope="module")
def pruned(trained, tmp_path_factory):
    """(data, source run, pruned run, the summary `prune --json` printed)."""
    data, run = trained
    out = tmp_path_factory.mktemp("pruned") / "p30"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["prune", str(run), "--amount", "0.3", "--unit", "channel", "--round-to", "1", "--out", str(out),
                     "--json"]) == 0
    return data, run, out, json.loads(buf.getvalue())


def test_prune_writes_a_run_with_its_figures(pruned):
    data, run, out, summary = pruned
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors", "summary.json"]
    assert json.loads((out / "summary.json").read_text()) == summary
    # the accuracy before is the run's own, on the same (full, 30-image) test split
    trained = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy_before"] == trained["test_accuracy"] and summary["test_images"] == 30
    assert summary["params_before"] == trained["params"] and summary["macs_before"] == trained["macs"]
    # tiny model: norm1 reads 4, 8 (block 1) and 6, 10 (block 2, after a transition to 6);
    # four bottlenecks of 16; the transition reads block 1's 12 maps and the final norm block
    # 2's 14: 118 prunable channels, round(0.3 * 118) = 35 removed
    c = summary["channels"]
    assert c["prunable"] == 4 + 8 + 6 + 10 + 4 * 16 + 12 + 14 == 118 and c["removed"] == 35 and c["kept"] == 83
    assert summary["params_after"] < summary["params_before"] and summary["macs_after"] < summary["macs_before"]
    assert 0 <= summary["test_accuracy_after"] <= 1 and summary["amount"] == 0.3 and summary["unit"] == "channel" \
        and summary["round_to"] == 1 \
        and summary["round_width"] == 1  # --round-to below 8 rounds the widths so too
    assert summary["speed_batch"] == 64 and summary["reference_path_blocks"] == 0
    assert summary["fine_tune_lr"] == trained["lr"] / 4  # what the last line suggests for `train --init`
    assert summary["images_per_second_before"] > 0 and summary["images_per_second_after"] > 0
    info = json.loads((out / "model.json").read_text())
    # both blocks' outputs (the transition's and final norm's inputs), and the layers the rest
    assert info["pruned"] and summary["pruned_blocks"] == 2
    assert summary["pruned_layers"] + summary["pruned_blocks"] == len(info["pruned"])
    source = json.loads((run / "model.json").read_text())
    assert {k: v for k, v in info.items() if k not in ("pruned", "format_version")} == \
        {k: v for k, v in source.items() if k != "format_version"}
    assert source["format_version"] == info["format_version"] == 1  # one format, pruned or not


def test_pruned_run_loads_with_the_same_outputs(pruned):
    data, run, out, summary = pruned
    model = RunDir(run).load_model()
    prune_model(model, 0.3)
    loaded = densekit.load(out)
    assert sum(p.numel() for p in loaded.parameters()) == summary["params_after"]
    x = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.pretrained_cfg["classes"] == RunDir(run).load_model().pretrained_cfg["classes"]


def test_eval_and_predict_on_the_pruned_run(pruned, cli, tmp_path):
    data, run, out, summary = pruned
    rc, stdout, err = cli("eval", out, "--json", "--out", tmp_path / "confusion.png")
    assert rc == 0, err
    assert json.loads(stdout)["accuracy"] == summary["test_accuracy_after"]
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)).save(image)
    rc, stdout, err = cli("predict", out, image, "--top-k", "2", "--precision", "fp32")  # as the check below
    assert rc == 0, err
    row = json.loads(stdout)
    model = densekit.load(out)
    x = (torch.from_numpy(np.array(Image.open(image))).float().view(1, 1, 16, 16) / 255
         - model.pretrained_cfg["mean"][0]) / model.pretrained_cfg["std"][0]
    with torch.no_grad():
        p = model(x).softmax(1)[0]
    assert row["index"] == int(p.argmax()) and row["prob"] == pytest.approx(float(p.max()), abs=1e-5)


def test_init_fine_tunes_and_resumes(pruned, cli, tmp_path):
    data, run, out, summary = pruned
    ref = tmp_path / "ref"
    rc, stdout, err = cli("train", "--init", out, *FINE_TUNE, "--out", ref)
    assert rc == 0, err
    done = json.loads((ref / "summary.json").read_text())
    # the dataset and data folder come from the pruned run; the structure too
    assert done["dataset"] == "mnist" and done["init"] == str(out.resolve()) and done["finished"]
    assert done["params"] == summary["params_after"] and done["test_images"] == 30
    info = json.loads((ref / "model.json").read_text())
    assert info["pruned"] == json.loads((out / "model.json").read_text())["pruned"]
    model = densekit.load(ref)
    assert sum(p.numel() for p in model.parameters()) == summary["params_after"]
    start = safetensors.torch.load_file(out / "model.safetensors")
    end = safetensors.torch.load_file(ref / "model.safetensors")
    assert start.keys() == end.keys() and not torch.equal(start["classifier.weight"], end["classifier.weight"])
    for key in (k for k in start if k.endswith("input_index")):
        assert torch.equal(start[key], end[key])  # fine-tuning keeps the structure

    # stopped after 3 steps, then resumed without repeating --init, and with the init run gone
    # (the run's own model.json and resume state hold all it needs): the same bits as in one go
    part, init = tmp_path / "part", tmp_path / "init-copy"
    shutil.copytree(out, init)
    assert cli("train", "--init", init, *FINE_TUNE, "--out", part, "--max-steps", "3")[0] == 0
    shutil.rmtree(init)
    rc, stdout, err = cli("train", "--out", part, "--resume", "--no-progress")
    assert rc == 0, err
    resumed = safetensors.torch.load_file(part / "model.safetensors")
    assert all(torch.equal(resumed[k], end[k]) for k in end)
    assert json.loads((part / "summary.json").read_text())["test_accuracy"] == done["test_accuracy"]

    # --init is part of the run's identity
    rc, stdout, err = cli("train", "--init", out, *FINE_TUNE, "--out", part, "--resume")
    assert rc == 2 and "init is" in err and len(err.strip().splitlines()) == 1
    rc, stdout, err = cli("train", *FINE_TUNE, "--dataset", "mnist", "--data-dir", data, "--out", part)
    assert rc == 2 and "init is" in err


def test_init_errors(pruned, cli, tmp_path):
    data, run, out, summary = pruned
    rc, _, err = cli("train", "--init", out, "--model", "densenet121", "--out", tmp_path / "a")
    assert rc == 2 and "drop --model" in err
    rc, _, err = cli("train", "--init", tmp_path / "nowhere", "--out", tmp_path / "b")
    assert rc == 2 and "run directory not found" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("amount", ["-0.1", "1", "1.5", "nan"])
def test_bad_amount_exits_2(trained, cli, tmp_path, amount):
    data, run = trained
    rc, stdout, err = cli("prune", run, "--amount", amount, "--out", tmp_path / "p")
    assert rc == 2 and stdout == "" and "amount must be a number in [0, 1)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "p").exists()


@pytest.mark.parametrize("flag,message", [("--round-to", "--round-to must be"),
                                          ("--round-width", "--round-width must be"),
                                          ("--unit", "--unit: invalid choice: '0'")])
def test_bad_prune_option_exits_2(trained, cli, tmp_path, flag, message):
    data, run = trained
    rc, stdout, err = cli("prune", run, "--amount", "0.3", flag, "0", "--out", tmp_path / "p")
    assert rc == 2 and stdout == "" and message in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "p").exists()


def test_missing_dir_and_existing_out_exit_2_and_touch_nothing(pruned, cli, tmp_path):
    data, run, out, summary = pruned
    rc, _, err = cli("prune", tmp_path / "missing", "--amount", "0.3", "--out", tmp_path / "p")
    assert rc == 2 and "run directory not found" in err and len(err.strip().splitlines()) == 1
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    for target in (mine, out):
        before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in target.iterdir()}
        rc, _, err = cli("prune", run, "--amount", "0.3", "--out", target)
        assert rc == 2 and "not empty" in err and len(err.strip().splitlines()) == 1
        assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in target.iterdir()} == before
    rc, _, err = cli("prune", run, "--amount", "x", "--out", tmp_path / "q")
    assert rc == 2 and "--amount" in err


def _damaged(out: Path, bad: Path, suffix: str, damage) -> Path:
    """A copy of the pruned run ``out`` in ``bad`` with ``damage`` done to its first index
    tensor of more than one entry whose key ends with ``suffix``."""
    bad.mkdir()
    (bad / "model.json").write_bytes((out / "model.json").read_bytes())
    state = safetensors.torch.load_file(out / "model.safetensors")
    key = next(k for k in state if k.endswith(suffix) and state[k].numel() > 1)
    state[key] = damage(state[key])
    safetensors.torch.save_file(state, bad / "model.safetensors")
    return bad


def test_a_damaged_input_index_is_refused(pruned, tmp_path):
    data, run, out, summary = pruned
    bad = _damaged(out, tmp_path / "bad", "input_index", lambda index: index.flip(0))
    with pytest.raises(UserError, match="input_index must be increasing"):
        RunDir(bad).load_model()
    info = json.loads((out / "model.json").read_text())
    name = next(iter(info["pruned"]))
    info["pruned"][name]["width"] = 0
    (bad / "model.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match=f"pruned.{name}' must give inputs and width"):
        RunDir(bad).load_model()


def test_a_damaged_output_index_is_refused(pruned, tmp_path):
    data, run, out, summary = pruned
    bad = _damaged(out, tmp_path / "bad", "output_index", lambda index: index + 1000)  # past the block's channels
    with pytest.raises(UserError, match=r"output_index must be increasing channel indices in \[0, "):
        RunDir(bad).load_model()


def test_structure_round_trips_through_model_json(pruned):
    data, run, out, summary = pruned
    info = RunDir(out).read_info()
    model = RunDir(out).build_model(info)
    assert pruned_structure(model) == info.pruned
    assert math.isclose(summary["params_ratio"], summary["params_after"] / summary["params_before"])
    assert Path(summary["source"]) == run


def test_init_takes_the_data_folder_only_with_its_dataset(pruned, tmp_path, monkeypatch):
    from densekit.train.config import TrainConfig, default_out, init_defaults

    data, run, out, summary = pruned
    mine = init_defaults(str(out))
    assert mine["dataset"] == "mnist" and mine["data_dir"] == str(Path(data).resolve())
    # another dataset is looked for where that dataset's files are, not in the init run's folder
    other = init_defaults(str(out), "fashion-mnist")
    assert "data_dir" not in other and "dataset" not in other and other["model"] == "densenet_bc_100_k12"
    # and a default run directory is named by what it trains
    monkeypatch.chdir(tmp_path)
    assert default_out(TrainConfig(init=str(out))).name.startswith("mnist-densenet_bc_100_k12-")
    assert default_out(TrainConfig(init=str(out), dataset="fashion-mnist")).name.startswith("fashion-mnist-")


def test_the_pruned_run_is_published_whole(pruned):
    data, run, out, summary = pruned
    # written in a hidden sibling and renamed: nothing left beside it, and a folder's usual mode
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_damaged_input_index_in_a_resume_state_is_refused(pruned, cli, tmp_path):
    data, run, out, summary = pruned
    part = tmp_path / "part"
    assert cli("train", "--init", out, *FINE_TUNE, "--out", part, "--max-steps", "2")[0] == 0
    resume = part / "resume.safetensors"
    with safetensors.safe_open(resume, framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in state if k.endswith("input_index") and state[k].numel() > 1)
    state[key] = state[key].flip(0)
    safetensors.torch.save_file(state, resume, metadata=meta)
    rc, _, err = cli("train", "--out", part, "--resume", "--no-progress")
    assert rc == 2 and "input_index must be increasing" in err and len(err.strip().splitlines()) == 1


def test_inference_speed_times_each_model_alternately():
    """Two stand-ins that take 30 and 10 ms a call: a 3x speedup, within the sleep's jitter."""
    import time

    from densekit.prune import inference_speed

    class Sleeper(torch.nn.Module):
        def __init__(self, seconds):
            super().__init__()
            self.seconds, self.calls = seconds, 0

        def forward(self, x):
            self.calls += 1
            time.sleep(self.seconds)
            return x

    slow, fast = Sleeper(0.03), Sleeper(0.01)
    before, after, speedup = inference_speed(slow, fast, (1, 4, 4), torch.device("cpu"), batch=8, rounds=3)
    assert slow.calls == fast.calls == 4  # a warm-up and one call a round each
    # sleeps overshoot (a loaded machine), never undershoot: loose below, tight above
    assert 1.5 < speedup < 4.5 and 100 < before <= 267 and 250 < after <= 800


def test_no_speed_skips_the_measurement(trained, tmp_path):
    from densekit.prune import prune_run

    data, run = trained
    report = prune_run(run, tmp_path / "p", 0.3, device="cpu", speed=False)
    assert report.speedup is None and report.speed_batch is None and report.images_per_second_after is None
    # by default each layer reads whole maps (the block input, or one earlier layer's 4 new
    # maps) and keeps a multiple of 8 bottleneck channels, or all of them
    assert (report.unit, report.round_to, report.round_width) == ("map", 16, 8)
    whole_maps_dropped = 0

    def check(index, channels, bounds):
        read = set(range(channels) if index is None else index.tolist())
        dropped = 0
        for a, b in zip(bounds, bounds[1:]):
            span = set(range(a, b))
            assert span and (span <= read or not span & read)
            dropped += not span & read
        return dropped

    for block in densekit.load(tmp_path / "p").modules():
        if isinstance(block, densekit.DenseBlock):
            bounds = [0, *range(block.in_channels, block.out_channels + 1, 4)]  # k = 4
            for i, layer in enumerate(block.values()):
                assert layer.norm2.num_features % 8 == 0 or layer.norm2.num_features == 16
                whole_maps_dropped += check(layer.input_index, layer.in_channels, bounds[:i + 2])
            whole_maps_dropped += check(block.output_index, block.out_channels, bounds)
    assert whole_maps_dropped > 0
    # per channel, a multiple of 16 input channels
    report = prune_run(run, tmp_path / "c", 0.3, device="cpu", speed=False, unit="channel")
    assert (report.unit, report.round_to, report.round_width) == ("channel", 16, 8)
    for layer in densekit.load(tmp_path / "c").modules():
        if isinstance(layer, densekit.DenseLayer):
            for n, full, step in ((layer.norm1.num_features, layer.in_channels, 16), (layer.norm2.num_features, 16, 8)):
                assert n % step == 0 or n == full


def test_the_cli_says_when_it_pruned_whole_maps(trained, cli, tmp_path):
    data, run = trained
    for unit, said in (("map", True), ("channel", False)):
        rc, stdout, err = cli("prune", run, "--amount", "0.3", "--unit", unit, "--no-speed", "--out", tmp_path / unit)
        assert rc == 0 and ("(inputs and outputs in whole maps)" in stdout) == said
        assert json.loads((tmp_path / unit / "summary.json").read_text())["unit"] == unit
    lr = json.loads((run / "summary.json").read_text())["lr"]
    assert stdout.splitlines()[-1] == f"saved in {tmp_path / 'channel'}; fine-tune with: densekit train --init " \
        f"{tmp_path / 'channel'} --epochs 2 --lr {lr / 4:.3g} --out DIR"
    # a run that prune wrote has no learning rate of its own to go by
    rc, stdout, err = cli("prune", tmp_path / "channel", "--amount", "0.1", "--no-speed", "--out", tmp_path / "again")
    assert rc == 0 and stdout.splitlines()[-1].endswith("--epochs 2 --out DIR")
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["fine_tune_lr"] is None


def test_the_export_of_a_pruned_run_says_what_was_pruned(pruned, tmp_path):
    from densekit.export import export_onnx, read_metadata

    data, run, out, summary = pruned
    export_onnx(out, tmp_path / "p.onnx")  # checked against PyTorch in onnxruntime
    meta = read_metadata(tmp_path / "p.onnx")
    assert (meta["pruned_layers"], meta["pruned_blocks"]) == (summary["pruned_layers"], summary["pruned_blocks"])


def test_pruning_keeps_the_block_indices_on_the_models_device():
    """The plan's indices are on the CPU; a block on another device keeps its output_index
    there, as its layers keep their input_index ("meta" stands in for a GPU: no data, any op)."""
    from densekit.prune import apply_plan, slimming_plan

    model = densekit.DenseNet(4, (2, 2), num_init_features=4, num_classes=3, in_chans=1, stem="cifar")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.0, 1.0)
    plan = slimming_plan(model, 0.4)
    model = model.to("meta")
    apply_plan(model, plan)
    indices = [b for n, b in model.named_buffers() if n.endswith(("input_index", "output_index"))]
    assert any(n.endswith("output_index") for n, _ in model.named_buffers())
    assert indices and all(i.device.type == "meta" for i in indices)
