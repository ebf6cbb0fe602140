"""Safe loading: a run directory holds only safetensors, JSON and PNG; nothing densekit reads
can run code; and a file that is not a densekit checkpoint, is cut short, or does not fit
the model is refused with one line naming the file and the problem."""

from __future__ import annotations

import ast
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

import densekit
from densekit.cli import main
from densekit.errors import UserError
from densekit.rundir import RunDir, pruned_structure

from .conftest import TINY, Exploit, run_cli, write_mnist

PACKAGE = Path(densekit.__file__).parent


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("safe")
    data = write_mnist(root / "mnist")
    run = root / "run"
    argv = ["train", *TINY, "--dataset", "mnist", "--data-dir", data, "--epochs", "1", "--batch-size", "16",
            "--max-steps", "2", "--device", "cpu", "--out", run, "--no-progress"]
    assert main([str(a) for a in argv]) == 0
    return run


@pytest.fixture
def run(finished, tmp_path):
    """A private copy of the finished run, to damage."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


# -- what a run directory is made of ---------------------------------------------------


def test_a_run_directory_holds_no_pickle(finished):
    for path in finished.iterdir():
        data = path.read_bytes()
        if path.suffix == ".safetensors":
            # 8-byte little-endian header length, then a JSON header, then raw tensor bytes
            (n,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8:8 + n])
            assert all(isinstance(v, str) for v in header.get("__metadata__", {}).values())
            if path.name == "resume.safetensors":
                json.loads(header["__metadata__"]["densekit.resume"])  # the non-tensor state is JSON
        elif path.suffix == ".png":
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in data.decode().splitlines()]
        else:
            assert path.suffix == ".json", path
            json.loads(data)


# -- nothing densekit reads can run code: a scan of its source -------------------------

_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "jsonpickle"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<not a constant>"
    return None


def unsafe_loads(source: str) -> list[str]:
    """Every way ``source`` could run code hidden in a file it reads, as ``line: what``."""
    found = []
    tree = ast.parse(source)
    restricted = set()  # Unpickler subclasses that decide what may be resolved
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(_dotted(b).endswith("Unpickler") for b in node.bases):
            if any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                restricted.add(node.name)
            else:
                found.append(f"{node.lineno}: Unpickler subclass {node.name} without find_class")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in _PICKLE_MODULES:
            found += [f"{node.lineno}: from {node.module} import {a.name}" for a in node.names
                      if a.name in ("load", "loads", "Unpickler", "open")]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        base, _, attr = name.rpartition(".")
        if name == "torch.load" and _keyword(node, "weights_only") is not True:
            found.append(f"{node.lineno}: torch.load without weights_only=True")
        elif base in _PICKLE_MODULES and attr in ("load", "loads", "open", "Unpickler"):
            found.append(f"{node.lineno}: {name}")
        elif attr == "Unpickler" or (name.endswith("Unpickler") and name not in restricted):
            found.append(f"{node.lineno}: unrestricted {name}")
        elif name in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") not in (None, False):
            found.append(f"{node.lineno}: {name} with allow_pickle")
        elif name in ("eval", "exec", "torch.jit.load", "yaml.load", "yaml.unsafe_load"):
            found.append(f"{node.lineno}: {name}")
    return found


def test_the_scanner_sees_what_it_must():
    bad = ("import pickle, torch, numpy as np\nfrom pickle import loads\n"
           "torch.load(f)\ntorch.load(f, weights_only=False)\npickle.load(f)\npickle.Unpickler(f).load()\n"
           "np.load(f, allow_pickle=True)\neval(s)\nclass U(pickle.Unpickler):\n    pass\n")
    assert len(unsafe_loads(bad)) == 8, unsafe_loads(bad)
    good = ("import pickle, torch, numpy as np\ntorch.load(f, weights_only=True)\nnp.load(f)\n"
            "class U(pickle.Unpickler):\n    def find_class(self, m, n):\n        raise ValueError\n"
            "U(f).load()\nimport ast\nast.literal_eval(s)\n")
    assert unsafe_loads(good) == []


def test_no_code_in_densekit_can_unpickle_freely():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the whole package, bench included
    problems = [f"{f.relative_to(PACKAGE)}:{p}" for f in files for p in unsafe_loads(f.read_text())]
    assert problems == []


# -- model.json + model.safetensors: densekit.load, eval, predict ----------------------


def _edit_json(change):
    def edit(run: Path) -> None:
        info = json.loads((run / "model.json").read_text())
        change(info)
        (run / "model.json").write_text(json.dumps(info))
    return edit


def _edit_weights(change):
    def edit(run: Path) -> None:
        state = load_file(run / "model.safetensors")
        change(state)
        save_file(state, run / "model.safetensors")
    return edit


def _cut(name: str, keep: float):
    def edit(run: Path) -> None:
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[:int(len(data) * keep)])
    return edit


MODEL_CASES = [
    # (id, damage, the file the message names, what it says)
    ("random-bytes", lambda r: (r / "model.safetensors").write_bytes(os.urandom(4096)), "model.safetensors",
     "cannot read safetensors file"),
    ("empty", lambda r: (r / "model.safetensors").write_bytes(b""), "model.safetensors", "cannot read safetensors file"),
    ("cut-in-header", _cut("model.safetensors", 0.01), "model.safetensors", "cannot read safetensors file"),
    ("cut-in-data", _cut("model.safetensors", 0.9), "model.safetensors", "cannot read safetensors file"),
    ("torch-save-pickle", lambda r: torch.save({"w": Exploit(str(r.parent / "PWNED"))}, r / "model.safetensors"),
     "model.safetensors", "cannot read safetensors file"),
    ("other-shapes", _edit_weights(lambda s: s.update({"classifier.weight": torch.zeros(10, 99)})), "model.safetensors",
     "does not match model.json: 1 tensor(s) of another shape (first: classifier.weight is [10, 99] in the file"),
    ("missing-tensor", _edit_weights(lambda s: s.pop("classifier.bias")), "model.safetensors",
     "does not match model.json: 1 missing (first: classifier.bias)"),
    ("extra-tensor", _edit_weights(lambda s: s.update(extra=torch.zeros(1))), "model.safetensors",
     "does not match model.json: 1 unexpected (first: extra)"),
    ("infinite-weights", _edit_weights(lambda s: s["classifier.weight"].fill_(float("inf"))), "model.safetensors",
     "1 tensor(s) hold NaN or infinite values (first: classifier.weight)"),
    ("json-not-json", lambda r: (r / "model.json").write_text("{'model': densenet}"), "model.json",
     "cannot read JSON"),
    ("json-cut", _cut("model.json", 0.5), "model.json", "cannot read JSON"),
    ("json-array", lambda r: (r / "model.json").write_text("[]"), "model.json", "expected a JSON object"),
    ("json-other-format", _edit_json(lambda i: i.pop("format")), "model.json",
     "missing field 'format'"),
    ("json-newer", _edit_json(lambda i: i.update(format_version=99)), "model.json",
     "written by a newer densekit (format version 99)"),
    ("json-no-kwargs", _edit_json(lambda i: i.pop("model_kwargs")), "model.json", "missing field 'model_kwargs'"),
    ("json-no-classes", _edit_json(lambda i: i.pop("classes")), "model.json", "missing field 'classes'"),
    ("json-no-preprocessing", _edit_json(lambda i: i.pop("preprocessing")), "model.json",
     "missing field 'preprocessing'"),
    ("json-image-size", _edit_json(lambda i: i["preprocessing"].update(image_size=[16])), "model.json",
     "'preprocessing.image_size' must be [height, width]"),
    ("json-std-zero", _edit_json(lambda i: i["preprocessing"].update(std=[0])), "model.json",
     "'preprocessing.std' must be a list of 1 finite number(s) > 0"),
    ("json-classes-vs-outputs", _edit_json(lambda i: i.update(classes=["a", "b"])), "model.json",
     "field 'num_classes' must be the number of classes (2)"),
    ("json-channels", _edit_json(lambda i: i["preprocessing"].update(in_chans=3, mean=[0, 0, 0], std=[1, 1, 1])),
     "model.json", "it takes 1 channels, the preprocessing gives 3"),
    ("json-bad-kwargs", _edit_json(lambda i: i["model_kwargs"].update(growth_rate=0)), "model.json",
     "field 'model_kwargs': growth_rate must be a positive integer"),
    ("json-other-shapes", _edit_json(lambda i: i["model_kwargs"].update(growth_rate=8)), "model.safetensors",
     "does not match model.json: "),
]


@pytest.mark.parametrize("damage, name, message", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_a_damaged_run_is_refused_naming_the_file(run, capsys, damage, name, message):
    damage(run)
    with pytest.raises(UserError) as info:
        densekit.load(run)
    text = str(info.value)
    assert text.startswith(f"{run / name}: ") and message in text, text
    assert "\n" not in text and len(text) < 400, text  # one line, short enough to read
    assert not (run.parent / "PWNED").exists()
    rc, out, err = run_cli(capsys, "predict", run, run / "nowhere.png", "--device", "cpu")  # the model is loaded first
    assert rc == 2 and err.strip() == f"densekit predict: error: {text}"


# -- resume.safetensors: train --resume -----------------------------------------------


def _resume_meta(change):
    def edit(run: Path) -> None:
        path = run / "resume.safetensors"
        with safetensors.safe_open(path, framework="pt") as f:
            raw = f.metadata()["densekit.resume"]
        tensors = load_file(path)
        meta = change(json.loads(raw))
        save_file(tensors, path, metadata={"densekit.resume": meta if isinstance(meta, str) else json.dumps(meta)})
    return edit


def _without(*keys):
    def change(meta):
        target = meta
        for k in keys[:-1]:
            target = target[k]
        target.pop(keys[-1])
        return meta
    return change


def _resume_tensors(change):
    def edit(run: Path) -> None:
        path = run / "resume.safetensors"
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path, metadata=metadata)
    return edit


RESUME_CASES = [
    ("random-bytes", lambda r: (r / "resume.safetensors").write_bytes(os.urandom(1000)), "cannot read the resume state"),
    ("cut", _cut("resume.safetensors", 0.5), "cannot read the resume state"),
    ("plain-safetensors", lambda r: save_file({"x": torch.zeros(1)}, r / "resume.safetensors"), "not a densekit resume file"),
    ("meta-not-json", _resume_meta(lambda m: "{epoch: 1"), "corrupt resume state"),
    ("meta-array", _resume_meta(lambda m: [m]), "corrupt resume state: expected a JSON object, found list"),
    ("meta-newer", _resume_meta(lambda m: dict(m, format_version=7)), "written by a newer densekit"),
    ("no-config", _resume_meta(_without("config")), "missing field 'config'"),
    ("no-global-step", _resume_meta(_without("global_step")), "missing field 'global_step'"),
    ("step-not-int", _resume_meta(lambda m: dict(m, global_step="2")), "field 'global_step' must be epoch x steps_per_epoch + step_in_epoch"),
    ("config-lacks-model", _resume_meta(_without("config", "model")), "missing field 'config.model'"),
    ("model-tensor-shape", _resume_tensors(lambda t: t.update({"model/classifier.bias": torch.zeros(3)})),
     "resume state does not fit this model: 1 tensor(s) of another shape (first: classifier.bias"),
    ("model-tensor-missing", _resume_tensors(lambda t: t.pop("model/classifier.bias")),
     "resume state does not fit this model: 1 missing (first: classifier.bias)"),
]


@pytest.mark.parametrize("damage, message", [c[1:] for c in RESUME_CASES], ids=[c[0] for c in RESUME_CASES])
def test_a_damaged_resume_state_is_refused_naming_the_file(run, capsys, damage, message):
    damage(run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    rc, out, err = run_cli(capsys, "train", "--out", run, "--resume", "--device", "cpu", "--no-progress")
    assert rc == 2 and out == "", err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"densekit train: error: {run / 'resume.safetensors'}: ") and message in lines[0], err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # refused before anything is written
