"""default_data_dir and load_dataset's own checks, and the DataError contract."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import densekit.data as data
from densekit.data import DATASETS, DataError, Dataset, Split, default_data_dir, load_dataset


def test_public_names():
    assert DATASETS == ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "csv")
    assert set(data.__all__) == {"DATASETS", "Augment", "DataError", "Dataset", "DeviceLoader", "FileSplit", "Split",
                                 "StreamingLoader", "default_data_dir", "load_dataset", "load_images", "loader_for"}
    assert issubclass(DataError, ValueError)


def test_defaults_without_env(monkeypatch):
    monkeypatch.delenv("DENSEKIT_DATA", raising=False)
    assert default_data_dir("fashion-mnist") == Path("/usr/share/datasets/fashion-mnist")
    assert default_data_dir("mnist") == Path("/usr/share/datasets/mnist")
    for name in ("cifar10", "cifar100", "imagefolder", "csv"):
        with pytest.raises(DataError, match=f"^{name}: no default data directory; give data_dir"):
            default_data_dir(name)


def test_env_root(monkeypatch, tmp_path):
    monkeypatch.setenv("DENSEKIT_DATA", str(tmp_path))
    (tmp_path / "cifar10").mkdir()
    assert default_data_dir("cifar10") == tmp_path / "cifar10"
    assert default_data_dir("cifar100") == tmp_path
    assert default_data_dir("fashion-mnist") == tmp_path
    monkeypatch.setenv("DENSEKIT_DATA", "")
    assert default_data_dir("fashion-mnist") == Path("/usr/share/datasets/fashion-mnist")


def test_env_root_is_used_by_load_dataset(monkeypatch, tmp_path):
    monkeypatch.setenv("DENSEKIT_DATA", str(tmp_path))
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path))}: no cifar10 data"):
        load_dataset("cifar10")


@pytest.mark.parametrize("call", [lambda: load_dataset("densenet"), lambda: default_data_dir("cifar-10")])
def test_unknown_name_lists_known(call):
    with pytest.raises(DataError) as info:
        call()
    assert "known: fashion-mnist, mnist, cifar10, cifar100, imagefolder" in str(info.value)


def test_data_error_is_one_line():
    e = DataError("/x/y: cannot decode:\n  line two\n\tline three")
    assert str(e) == "/x/y: cannot decode: line two line three"


def test_split_checks_its_tensors():
    good = torch.zeros(2, 1, 3, 3, dtype=torch.uint8)
    assert len(Split(good, torch.zeros(2, dtype=torch.int64))) == 2
    with pytest.raises(ValueError, match="images must be a uint8"):
        Split(good.float(), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels must be an int64"):
        Split(good, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"N = 2 images, got torch.int64 of shape \(3,\)"):
        Split(good, torch.zeros(3, dtype=torch.int64))
    multi = Split(good, torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))  # multi-label: NaN is unknown
    assert len(multi) == 2 and multi.subset(torch.tensor([1])).labels.tolist() == [[0.0, 1.0]]
    with pytest.raises(ValueError, match="float32 tensor"):
        Split(good, torch.zeros(2, 2, dtype=torch.float64))


def test_multi_label_split_holds_out_rare_labels_in_proportion():
    from densekit.data.core import rarest_label, stratified_split

    labels = torch.zeros(100, 3)
    labels[:, 0] = 1  # common to all
    labels[:10, 1] = 1  # rare: 10 images
    labels[95:, 0] = 0  # 5 with no label
    assert rarest_label(labels).tolist() == [1] * 10 + [0] * 85 + [3] * 5
    kept, held = stratified_split(labels, 0.2, seed=4)
    assert len(held) == 20 and int(labels[held, 1].sum()) == 2 and int((labels[held].sum(1) == 0).sum()) == 1
    assert torch.equal(torch.sort(torch.cat([kept, held])).values, torch.arange(100))


def test_dataset_num_classes():
    s = Split(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64))
    ds = Dataset("x", s, s, None, ["a", "b", "c"], 1, (2, 2), (0.0,), (1.0,))
    assert ds.num_classes == 3 and not ds.streaming


def test_stratified_split_is_per_class_and_fixed_by_the_seed():
    from densekit.data.core import stratified_split

    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 2 + [3])
    kept, held = stratified_split(labels, 0.1, seed=7)
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(len(labels)))  # a partition
    assert torch.bincount(labels[held], minlength=4).tolist() == [5, 3, 1, 0]  # 10% each; >= 1 where 2+; never all
    again, held_again = stratified_split(labels, 0.1, seed=7)
    assert torch.equal(held, held_again) and not torch.equal(held, stratified_split(labels, 0.1, seed=8)[1])
    assert len(stratified_split(labels, 0.0, seed=7)[1]) == 0
    # classes of one image each: the fraction is drawn from all alike
    kept, held = stratified_split(torch.arange(40), 0.1, seed=0)
    assert len(held) == 4 and len(kept) == 36


def test_stratified_split_keeps_an_image_of_every_class_to_train_on():
    from densekit.data.core import stratified_split

    labels = torch.tensor([0] * 9 + [1, 2, 3, 4])  # four classes of one image: the top-up comes from class 0
    for seed in range(10):
        kept, held = stratified_split(labels, 0.2, seed)
        assert len(held) == 3 and set(labels[kept].tolist()) == {0, 1, 2, 3, 4}
