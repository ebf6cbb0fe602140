"""densekit.fit: training on a user's own torch datasets from Python, with the run directory,
resume and validation protocol of the command line."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import torchvision
from torchvision.transforms import v2

import densekit


def fake(n: int, offset: int, flip: bool = True):
    tf = v2.Compose([v2.ToImage(), v2.RandomHorizontalFlip()]) if flip else v2.ToImage()
    return torchvision.datasets.FakeData(size=n, image_size=(3, 16, 16), num_classes=3, transform=tf,
                                         random_offset=offset)


def tiny(num_classes: int = 3, in_chans: int = 3) -> densekit.DenseNet:
    torch.manual_seed(0)
    return densekit.create_model("densenet_bc_100_k12", growth_rate=4, block_config=(1, 1), num_classes=num_classes,
                                 in_chans=in_chans)


OPTIONS = dict(classes=["a", "b", "c"], epochs=2, batch_size=8, workers=1, deterministic=True)


def test_fit_trains_in_place_and_resumes_bit_identically(tmp_path, cli):
    model = tiny()
    before = model.classifier.weight.detach().clone()
    s = densekit.fit(model, fake(64, 0), test_data=fake(16, 100, flip=False), out=tmp_path / "ref", **OPTIONS)
    assert s.dataset == "python" and s.val_images == 6 and s.test_images == 16 and s.finished
    assert s.train_images == 58 and s.steps == 2 * (58 // 8)
    assert not torch.equal(before, model.classifier.weight)  # trained in place...
    saved = safetensors.torch.load_file(tmp_path / "ref" / "model.safetensors")
    if s.kept_epoch == 2:  # ...and, when the last epoch is the kept one, saved as it ends
        assert torch.equal(saved["classifier.weight"], model.classifier.weight.detach())
    info = json.loads((tmp_path / "ref" / "model.json").read_text())
    assert info["model"] == "densenet_bc_100_k12" and info["model_kwargs"]["growth_rate"] == 4
    assert densekit.load(tmp_path / "ref").pretrained_cfg["classes"] == ["a", "b", "c"]

    stopped = densekit.fit(tiny(), fake(64, 0), test_data=fake(16, 100, flip=False), out=tmp_path / "run",
                           max_steps=5, **OPTIONS)
    assert not stopped.finished and stopped.test_accuracy is None
    done = densekit.fit(tiny(), fake(64, 0), test_data=fake(16, 100, flip=False), out=tmp_path / "run",
                        resume=True, **OPTIONS)
    assert done.finished and done.test_accuracy == s.test_accuracy
    again = safetensors.torch.load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(saved[k], again[k]) for k in saved)  # the flips are seeded per item: bit for bit
    rc, _, err = cli("eval", tmp_path / "run")
    assert rc == 2 and "trained on datasets given in Python" in err and "--dataset" in err


class Halves(torch.utils.data.Dataset):
    """16 px gray images whose labels are their bright halves (left, right): float targets."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = (torch.rand(n, 2, generator=g) < 0.5).float()
        self.images = torch.randint(0, 60, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
        self.images[:, :, :, :8][self.labels[:, 0] == 1] = 220
        self.images[:, :, :, 8:][self.labels[:, 1] == 1] = 220

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def test_fit_multi_label_from_float_targets(tmp_path):
    s = densekit.fit(tiny(2, in_chans=1), Halves(96, 0), Halves(32, 1), Halves(32, 2), out=tmp_path / "ml",
                     classes=["left", "right"], epochs=3, batch_size=16, workers=0, recipe="finetune", lr=0.01)
    assert s.multi_label and s.val_images == 32
    assert s.input_size == [1, 16, 16] and s.test_auroc > 0.8  # bright halves: easy to tell apart


def test_fit_refusals(tmp_path):
    with pytest.raises(densekit.checks.ArgumentError, match="reset_classifier"):
        densekit.fit(tiny(5), fake(16, 0), out=tmp_path / "a", classes=list("abc"), epochs=1, workers=0)
    with pytest.raises(densekit.checks.ArgumentError, match="drop dataset"):
        densekit.fit(tiny(), fake(16, 0), out=tmp_path / "b", classes=list("abc"), dataset="mnist")
    with pytest.raises(densekit.checks.ArgumentError, match="classes"):
        densekit.fit(tiny(), fake(16, 0), out=tmp_path / "c", workers=0)


def test_a_block_on_the_reference_path_is_checkpointed_and_fused_ones_are_left_alone(tmp_path, caplog):
    # one block the fused op cannot run (a swapped activation): fit checkpoints that block only;
    # the fused block keeps its bottlenecks (memory_efficient would recompute them there)
    model = tiny()
    model.features.denseblock2.denselayer1.relu1 = torch.nn.SiLU()
    assert model.features.denseblock1.fused_status() is None and model.features.denseblock2.fused_status()
    with caplog.at_level("INFO"):
        densekit.fit(model, fake(16, 0), out=tmp_path / "run", classes=["a", "b", "c"], epochs=1, batch_size=8,
                     workers=0)
    assert "1 dense block(s) take the reference path with gradient checkpointing" in caplog.text
    assert [layer.memory_efficient for layer in model.features.denseblock1.values()] == [False]
    assert [layer.memory_efficient for layer in model.features.denseblock2.values()] == [True]
