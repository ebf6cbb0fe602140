"""densekit export: the exported file computes what PyTorch computes, at any batch size, carries
its metadata, and never replaces a file; the command follows the CLI's error contract."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision

import densekit
import densekit.export as export
from densekit.errors import UserError
from densekit.export import export_onnx, export_pt2, read_metadata


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Batch norms away from identity (fresh ones are), so that a wrong statistic shows."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return model.eval()


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def assert_matches(got: np.ndarray, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal to ``rtol`` of the output's scale (largest |value|)."""
    want = want.detach().numpy()
    assert got.shape == want.shape
    scale = np.abs(want).max()
    assert scale > 0
    assert np.abs(got - want).max() <= rtol * scale


def batch(shape, n: int, seed: int = 7) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


# -- ONNX: the numbers --------------------------------------------------------------


def test_run_dir_to_onnx_matches_pytorch_at_any_batch(run_dir, tmp_path):
    out = tmp_path / "tiny.onnx"
    report = export_onnx(run_dir, out)
    assert report.path == str(out) and report.bytes == out.stat().st_size > 10_000
    assert report.checked and report.check.check_batch_size == 2 and report.traced_batch_size == 1
    assert 0 <= report.check.max_abs_diff <= 1e-5 * report.check.output_scale and report.check.max_rel_diff <= 1e-5
    assert report.check.runner == f"onnxruntime {ort.__version__}" and report.input_shape == ["batch", 1, 16, 16]
    assert report.opset == onnx.load(out).opset_import[0].version

    model = densekit.load(run_dir)  # the fused default path: what users run in PyTorch
    sess = session(out)
    assert [i.name for i in sess.get_inputs()] == ["input"] and [o.name for o in sess.get_outputs()] == ["logits"]
    assert sess.get_inputs()[0].shape == ["batch", 1, 16, 16]
    for n in (1, 5, 16):
        x = batch((1, 16, 16), n)
        with torch.no_grad():
            assert_matches(sess.run(["logits"], {"input": x.numpy()})[0], model(x))


# Models made with create_model (fused by default), each with its input (C, *spatial).
API_MODELS = {
    "bc100-cifar": (dict(name="densenet_bc_100_k12"), (3, 32, 32)),
    "1d-signal": (dict(name="densenet_bc_100_k12", spatial_dims=1, in_chans=2, block_config=(3, 3, 3),
                       num_classes=4), (2, 64)),
    "3d-volume": (dict(name="densenet_bc_100_k12", spatial_dims=3, in_chans=1, block_config=(2, 2),
                       num_classes=3), (1, 12, 12, 12)),
}


@pytest.mark.parametrize("key", API_MODELS)
def test_registered_and_nd_models_match_pytorch(key, tmp_path):
    kwargs, shape = API_MODELS[key]
    torch.manual_seed(0)
    model = randomize_norms(densekit.create_model(**dict(kwargs)))
    out = tmp_path / f"{key}.onnx"
    report = export_onnx(model, out, input_size=shape, metadata={"model": kwargs["name"]})
    assert report.check.max_rel_diff <= 1e-5 and report.input_shape == ["batch", *shape]
    sess = session(out)
    assert sess.get_inputs()[0].shape == ["batch", *shape]
    x = batch(shape, 3)
    with torch.no_grad():
        want = model(x)
    assert want.shape == (3, model.num_classes)
    assert_matches(sess.run(None, {"input": x.numpy()})[0], want)
    assert read_metadata(out)["input_layout"] == {2: "NCL", 3: "NCHW", 4: "NCDHW"}[len(shape)]


def test_torchvision_weights_through_densekit_to_onnx_match_torchvision(tmp_path):
    """torchvision's densenet121, loaded strictly into densekit and exported, computes torchvision's function."""
    torch.manual_seed(0)
    reference = randomize_norms(torchvision.models.densenet121())
    model = densekit.create_model("densenet121")
    model.load_state_dict(reference.state_dict(), strict=True)
    out = tmp_path / "densenet121.onnx"
    export_onnx(model, out, input_size=(3, 64, 64))
    x = batch((3, 64, 64), 2)
    with torch.no_grad():
        want = reference(x)
    assert_matches(session(out).run(["logits"], {"input": x.numpy()})[0], want)


def test_features_only_model_exports_every_map(tmp_path):
    torch.manual_seed(0)
    model = randomize_norms(densekit.create_model("densenet_bc_100_k12", block_config=(2, 2, 2), features_only=True))
    out = tmp_path / "features.onnx"
    export_onnx(model, out, input_size=(3, 32, 32))
    sess = session(out)
    names = [o.name for o in sess.get_outputs()]
    assert names == ["feature0", "feature1", "feature2", "feature3"]
    x = batch((3, 32, 32), 2)
    with torch.no_grad():
        want = model(x)
    for got, w in zip(sess.run(names, {"input": x.numpy()}), want):
        assert_matches(got, w)
    meta = read_metadata(out)
    assert meta["feature_info"] == [{"num_chs": d["num_chs"], "reduction": d["reduction"]} for d in model.feature_info]
    assert "num_classes" not in meta


def test_static_batch_is_fixed_in_the_graph(run_dir, tmp_path):
    out = tmp_path / "static.onnx"
    report = export_onnx(run_dir, out, batch_size=4, dynamic_batch=False)
    assert report.input_shape == [4, 1, 16, 16] and report.check.check_batch_size == 4
    sess = session(out)
    assert sess.get_inputs()[0].shape == [4, 1, 16, 16]
    assert sess.run(None, {"input": batch((1, 16, 16), 4).numpy()})[0].shape == (4, 10)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        sess.run(None, {"input": batch((1, 16, 16), 3).numpy()})


def test_opset_is_the_one_asked_for_or_refused(run_dir, tmp_path):
    out = tmp_path / "op13.onnx"
    assert export_onnx(run_dir, out, opset=13).opset == 13
    assert onnx.load(out).opset_import[0].version == 13
    for bad in (5, 99, 13.0, True):
        with pytest.raises(UserError, match=r"opset must be an integer from 9 to 20 .* got"):
            export_onnx(run_dir, tmp_path / "bad.onnx", opset=bad)
    with pytest.raises(UserError, match="from 18 to 23 for the dynamo ONNX exporter, got 17"):
        export_onnx(run_dir, tmp_path / "bad.onnx", opset=17, dynamo=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["op13.onnx"]


def test_dynamo_exporter_gives_the_same_numbers(run_dir, tmp_path):
    """The torch.export-based ONNX exporter (torch's default, slower): the alternative if the
    TorchScript-based one is removed from torch."""
    out = tmp_path / "dynamo.onnx"
    report = export_onnx(run_dir, out, dynamo=True)
    assert report.exporter == "dynamo" and report.opset >= 18 and report.check.max_rel_diff <= 1e-5
    # traced at 2 (torch.export fixes a size-1 dimension), so checked at 3; batch 1 must work too
    assert report.traced_batch_size == 2 and report.check.check_batch_size == 3
    x = batch((1, 16, 16), 1)
    with torch.no_grad():
        assert_matches(session(out).run(["logits"], {"input": x.numpy()})[0], densekit.load(run_dir)(x))


# -- what the file says about itself ------------------------------------------------


def test_metadata_round_trips(run_dir, tmp_path):
    out = tmp_path / "meta.onnx"
    export_onnx(run_dir, out, check=False, metadata={"licence": "CC-BY-4.0"})
    cfg = densekit.load(run_dir).pretrained_cfg
    meta = read_metadata(out)
    assert meta["classes"] == cfg["classes"] and len(meta["classes"]) == meta["num_classes"] == 10
    assert meta["mean"] == list(cfg["mean"]) and meta["std"] == list(cfg["std"]) and len(meta["mean"]) == 1
    assert meta["input_size"] == [1, 16, 16] and meta["input_layout"] == "NCHW" and meta["spatial_dims"] == 2
    assert meta["model"] == "densenet_bc_100_k12" and meta["densekit_version"] == densekit.__version__
    assert meta["dataset"] == "mnist" and meta["outputs"] == ["logits"] and meta["licence"] == "CC-BY-4.0"
    # the tiny run changed the registered variant: the file says how
    assert meta["model_args"] == {"growth_rate": 4, "block_config": [1, 1], "num_init_features": 4}
    assert "pruned_layers" not in meta
    # what any ONNX consumer sees: string properties, lists as JSON
    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(props["classes"]) == cfg["classes"] and props["model"] == "densenet_bc_100_k12"
    assert all(isinstance(v, str) for v in props.values())


def test_the_callers_model_is_not_touched(tmp_path):
    torch.manual_seed(0)
    model = densekit.create_model("densenet_bc_100_k12", block_config=(2, 2), num_classes=5).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "m.onnx", input_size=(3, 16, 16))
    assert model.training and all(m.training for m in model.modules())
    flags = [m.fused for m in model.modules() if isinstance(m, (densekit.DenseBlock, densekit.Transition))]
    assert flags and all(flags)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no BN statistic moved


# -- files: refused, never half, never replaced -------------------------------------


def test_refuses_to_overwrite_and_leaves_the_file_byte_identical(run_dir, tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"precious\x00bytes")
    with pytest.raises(UserError, match="already exists; refusing to overwrite it"):
        export_onnx(run_dir, out)
    assert out.read_bytes() == b"precious\x00bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_a_file_that_appears_during_the_export_is_not_replaced(run_dir, tmp_path, monkeypatch):
    """The early check is not the guard: publishing links the finished temp file, which
    fails if the name was taken meanwhile."""
    out = tmp_path / "model.onnx"
    real = export._onnx_bytes

    def slow_export(*args, **kwargs):
        out.write_bytes(b"written by someone else")
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "_onnx_bytes", slow_export)
    with pytest.raises(UserError, match="already exists"):
        export_onnx(run_dir, out, check=False)
    assert out.read_bytes() == b"written by someone else"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temp file left


def test_a_failed_check_writes_nothing(run_dir, tmp_path, monkeypatch):
    real = export._plain_copy

    def wrong(model):
        plain = real(model)
        plain.classifier.bias.data += 0.5  # what a broken exporter path would produce
        return plain

    monkeypatch.setattr(export, "_plain_copy", wrong)
    with pytest.raises(RuntimeError, match=r"differs from PyTorch: max abs diff 0\.5"):
        export_onnx(run_dir, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_without_onnxruntime_the_error_says_what_to_install(run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"needs onnxruntime.*pip install 'densekit\[export\]'"):
        export_onnx(run_dir, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []
    assert not export_onnx(run_dir, tmp_path / "model.onnx", check=False).checked  # onnx alone suffices


def test_bad_arguments_are_refused_by_name(run_dir, tmp_path):
    model = densekit.create_model("densenet_bc_100_k12", block_config=(2, 2))
    cases = [
        (dict(model_or_run_dir=model, path=tmp_path / "m.onnx", input_size=(3, 1, 1)), "every spatial side >= 2"),
        (dict(model_or_run_dir=model, path=tmp_path / "m.onnx", input_size=(1, 32, 32)), "the model takes 3"),
        (dict(model_or_run_dir=model, path=tmp_path / "m.onnx", input_size="32"), "input_size must be 3 positive"),
        (dict(model_or_run_dir=model, input_size=(3, 8, 8)), "path: needed when exporting a model object"),
        (dict(model_or_run_dir=run_dir, path=tmp_path / "no" / "m.onnx"), "folder does not exist"),
        (dict(model_or_run_dir=run_dir, path=tmp_path), "is a directory"),
        (dict(model_or_run_dir=run_dir, path=tmp_path / "m.onnx", batch_size=0), "batch_size must be a positive"),
        (dict(model_or_run_dir=tmp_path, path=tmp_path / "m.onnx"), "not a densekit run directory"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message.replace(".", r"\.")):
            export_onnx(**kwargs)
    assert list(tmp_path.iterdir()) == []


# -- torch.export (.pt2) ------------------------------------------------------------


def test_pt2_reloads_and_matches_at_any_batch(run_dir, tmp_path):
    out = tmp_path / "tiny.pt2"
    report = export_pt2(run_dir, out)
    assert report.format == "pt2" and report.checked and report.check.check_batch_size == 1
    assert report.check.max_rel_diff <= 1e-5 and report.bytes == out.stat().st_size
    program = torch.export.load(out).module()
    model = densekit.load(run_dir)
    for n in (1, 6):
        x = batch((1, 16, 16), n)
        with torch.no_grad():
            assert_matches(program(x).numpy(), model(x))
    meta = read_metadata(out)
    assert meta["classes"] == model.pretrained_cfg["classes"] and meta["input_size"] == [1, 16, 16]


# -- the command --------------------------------------------------------------------


def test_cli_writes_the_default_file_and_prints_one_json_object(run_dir, tmp_path, cli):
    run = shutil.copytree(run_dir, tmp_path / "run")
    rc, out, err = cli("export", run, "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["path"] == str(run / "model.onnx") and (run / "model.onnx").stat().st_size == report["bytes"]
    assert report["checked"] and report["check"]["max_rel_diff"] <= 1e-5
    rc, out, err = cli("export", run, "--format", "pt2", "--batch-size", "3")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"wrote {run / 'model.pt2'} (") and "input batchx1x16x16 -> logits" in lines[0]
    assert lines[1].startswith("checked with torch.export.load at batch 1: max abs diff")
    rc, _, err = cli("export", run, "--no-check", "--opset", "17", "--out", tmp_path / "a.onnx")
    assert rc == 0, err
    assert onnx.load(tmp_path / "a.onnx").opset_import[0].version == 17


@pytest.mark.parametrize("argv, message", [
    (["{tmp}"], "not a densekit run directory (no model.json)"),
    (["{tmp}/nowhere"], "run directory not found"),
    (["{run}", "--out", "{tmp}/exists.onnx"], "exists.onnx: already exists; refusing to overwrite it"),
    (["{run}", "--out", "{tmp}/nowhere/m.onnx"], "nowhere: folder does not exist"),
    (["{run}", "--opset", "0"], "--opset: must be a positive integer, got 0"),
    (["{run}", "--opset", "99"], "opset must be an integer from 9 to 20"),
    (["{run}", "--batch-size", "0"], "--batch-size: must be a positive integer, got 0"),
    (["{run}", "--batch-size", "two"], "--batch-size: must be a positive integer, got 'two'"),
    (["{run}", "--format", "pt2", "--opset", "13"], "--opset, --dynamo and --align apply to the onnx format only"),
    (["{run}", "--format", "pt2", "--align", "16"], "--opset, --dynamo and --align apply to the onnx format only"),
    (["{run}", "--align", "-1"], "--align: must be an integer >= 0, got -1"),
    (["{run}", "--format", "tflite"], "invalid choice: 'tflite'"),
], ids=["not-a-run", "missing-dir", "out-exists", "out-folder-missing", "opset-zero", "opset-unknown",
        "batch-size-zero", "batch-size-word", "opset-for-pt2", "align-for-pt2", "align-negative", "unknown-format"])
def test_cli_user_errors_exit_2_with_one_line(run_dir, tmp_path, cli, argv, message):
    (tmp_path / "exists.onnx").write_bytes(b"keep me")
    names = sorted(p.name for p in run_dir.iterdir())
    rc, out, err = cli("export", *[a.format(run=run_dir, tmp=tmp_path) for a in argv])
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert " error: " in err and message in err, err
    assert (tmp_path / "exists.onnx").read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.onnx"]
    assert sorted(p.name for p in run_dir.iterdir()) == names


def test_a_long_file_name_that_fits_is_written(run_dir, tmp_path):
    # the temporary file beside it must fit too (it once added 36 characters to the name)
    out = tmp_path / ("m" * 245 + ".onnx")
    export_onnx(run_dir, out, check=False)
    assert out.is_file() and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
