"""csv: images listed in CSV files, labels as names in one column (ChestX-ray14) or one column per
label (CheXpert), single- and multi-label, the validation and test CSVs, the two ways of holding
the images (in memory, streamed), and every refusal, each in one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from densekit.data import DataError, load_dataset
from densekit.data import csvfile, files
from densekit.data.batches import loader_for
from densekit.data.core import DataArgumentError, FileSplit
from densekit.data.csvfile import CsvLayout, load_csv

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

NAN = float("nan")
# ChestX-ray14's Data_Entry_2017.csv: a trailing comma ends the header, not the rows
NIH_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,OriginalImage[Width,Height],"
NIH = dict(path_column="Image Index", label_column="Finding Labels", label_sep="|")
CHEXPERT_HEADER = "Path,Sex,Age,No Finding,Cardiomegaly,Edema"
CHEXPERT = dict(path_column="Path", label_columns=("No Finding", "Cardiomegaly", "Edema"))


@pytest.fixture
def images(tmp_path, write_image, solid_image):
    """img/00.png ... img/11.png, 5 x 7 gray, image i filled with 10 * i."""
    for i in range(12):
        write_image(tmp_path / "img" / f"{i:02d}.png", solid_image(5, 7, 10 * i))
    return tmp_path


def write_csv(path, header: str, rows: list[str], bom: bool = False, newline: str = "\n"):
    path.write_bytes(("\ufeff" if bom else "").encode() + newline.join([header, *rows, ""]).encode())
    return path


def nih_rows(labels: list[str], first: int = 0) -> list[str]:
    return [f"img/{first + i:02d}.png,{label},0,{i},1024,1024" for i, label in enumerate(labels)]


def values(split) -> list[int]:
    """Each decoded image's fill value / 10: which file it was."""
    return [int(x.unique()) // 10 for x in split.images]


def same(a: torch.Tensor, b) -> bool:
    """Equal, NaN where NaN."""
    b = torch.tensor(b)
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(-9), b.nan_to_num(-9))


def load(root, **layout) -> dict:
    return load_csv(root, CsvLayout(**layout), image_size=4, workers=0, val_fraction=0.25)


def message(root, **layout) -> str:
    with pytest.raises(DataError) as info:
        load(root, **layout)
    text = str(info.value)
    assert "\n" not in text
    return text


# -- ChestX-ray14: names in one column ---------------------------------------------------------


def test_chestxray14_multi_label_with_its_val_and_test_csv(images):
    write_csv(images / "train.csv", NIH_HEADER, nih_rows(
        ["Effusion|Infiltration", "No Finding", "Cardiomegaly", " Effusion | Effusion ", "Infiltration"]), bom=True)
    write_csv(images / "val.csv", NIH_HEADER, nih_rows(["No Finding", "Cardiomegaly|Effusion"], first=5))
    write_csv(images / "test.csv", NIH_HEADER, nih_rows(["Infiltration"], first=7))
    ds = load_dataset("csv", images, image_size=4, workers=0, csv=CsvLayout(
        "train.csv", val_csv="val.csv", test_csv=str(images / "test.csv"), multi_label=True, **NIH))
    assert ds.classes == ["Cardiomegaly", "Effusion", "Infiltration"] and ds.multi_label and not ds.streaming
    assert ds.image_size == (4, 4) and ds.in_chans == 1 and ds.train.images.shape == (5, 1, 4, 4)
    assert ds.train.labels.dtype == torch.float32
    assert ds.train.labels.tolist() == [[0, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert ds.val.labels.tolist() == [[0, 0, 0], [1, 1, 0]] and ds.test.labels.tolist() == [[0, 0, 1]]
    assert (values(ds.train), values(ds.val), values(ds.test)) == ([0, 1, 2, 3, 4], [5, 6], [7])
    assert ds.val_source == f"the images of {images / 'val.csv'}"


def test_chestxray14_single_label_no_finding_is_a_class(images):
    write_csv(images / "train.csv", NIH_HEADER, nih_rows(["No Finding", "Mass", "Mass"] * 4))
    ds = load_dataset("csv", images, image_size=4, workers=0, val_fraction=0.25, csv=CsvLayout("train.csv", **NIH))
    assert ds.classes == ["Mass", "No Finding"] and not ds.multi_label and ds.test is None
    assert ds.train.labels.dtype == torch.int64 and ds.train.labels.dim() == 1
    assert torch.bincount(ds.val.labels).tolist() == [2, 1]  # 25% of each class held out
    assert "stratified by class" in ds.val_source
    for split in (ds.train, ds.val):  # each image keeps its own row's label
        assert [ds.classes[k] for k in split.labels] == [["No Finding", "Mass", "Mass"][v % 3] for v in values(split)]


def test_chestxray14_default_image_size_is_224(images):
    write_csv(images / "train.csv", NIH_HEADER, nih_rows(["a", "b"]))
    ds = load_dataset("csv", images, workers=0, val_fraction=0, csv=CsvLayout("train.csv", **NIH))
    assert ds.image_size == (224, 224) and ds.train.images.shape == (2, 1, 224, 224) and len(ds.val) == 0


def test_multi_label_val_split_is_stratified_by_the_rarest_label(images):
    labels = ["Effusion"] * 8 + ["Effusion|Hernia"] * 4  # Hernia is rare: a quarter of it is held out
    write_csv(images / "train.csv", NIH_HEADER, nih_rows(labels))
    parts = load(images, train_csv="train.csv", multi_label=True, **NIH)
    assert parts["val_source"] == "25% of the training images, stratified by their rarest label, seed 0"
    assert parts["val"].labels.sum(0).tolist() == [3, 1] and len(parts["train"]) == 9
    assert sorted(values(parts["train"]) + values(parts["val"])) == list(range(12))


# -- CheXpert: one column per label ------------------------------------------------------------


CHEXPERT_ROWS = [  # No Finding, Cardiomegaly, Edema: 1, 0, -1 (uncertain), blank (not mentioned)
    "img/00.png,F,60,1.0,,",
    "img/01.png,M,70,,1.0,-1.0",
    "img/02.png,F,50,,-1,1",
    "img/03.png,M,40,0.0,0,-1",
]


@pytest.mark.parametrize("uncertain, u", [("zeros", 0.0), ("ones", 1.0), ("ignore", NAN)])
def test_chexpert_multi_label_uncertain_cells(images, uncertain, u):
    write_csv(images / "train.csv", CHEXPERT_HEADER, CHEXPERT_ROWS)
    write_csv(images / "valid.csv", CHEXPERT_HEADER, ["img/04.png,F,30,0.0,1.0,1.0"], newline="\r\n")
    parts = load(images, train_csv="train.csv", val_csv="valid.csv", multi_label=True, uncertain=uncertain,
                 **CHEXPERT)
    assert parts["classes"] == ["No Finding", "Cardiomegaly", "Edema"]
    assert parts["train"].labels.dtype == torch.float32
    # a blank is "not mentioned": absent whatever ``uncertain`` says
    assert same(parts["train"].labels, [[1, 0, 0], [0, 1, u], [0, u, 1], [0, 0, u]])
    assert parts["val"].labels.tolist() == [[0, 1, 1]]


def test_chexpert_single_label_takes_the_column_at_one(images):
    rows = ["img/00.png,F,1,1,0,0", "img/01.png,F,1,,1,", "img/02.png,F,1,0,-1,1.0", "img/03.png,F,1,-1,0,1"]
    write_csv(images / "train.csv", CHEXPERT_HEADER, rows)
    parts = load(images, train_csv="train.csv", test_csv="train.csv", **CHEXPERT)
    assert parts["classes"] == ["No Finding", "Cardiomegaly", "Edema"]  # the order given, not sorted
    assert parts["test"].labels.dtype == torch.int64 and parts["test"].labels.tolist() == [0, 1, 2, 2]
    with pytest.raises(DataError) as info:  # uncertain "ones": the third row has two
        load(images, train_csv="train.csv", uncertain="ones", **CHEXPERT)
    assert str(info.value) == (f"{images / 'train.csv'}:4: 2 label columns are 1 ('Cardiomegaly', 'Edema'); a "
                               "single-label row has exactly one (give multi_label for several or none)")


def test_single_label_row_with_no_column_at_one(images):
    write_csv(images / "train.csv", CHEXPERT_HEADER, ["img/00.png,F,1,0,,-1"])
    assert message(images, train_csv="train.csv", **CHEXPERT) == (
        f"{images / 'train.csv'}:2: no label column is 1; a single-label row has exactly one (give multi_label for "
        "several or none)")


# -- streamed ------------------------------------------------------------------------------------


def test_a_large_multi_label_csv_is_streamed_and_batches_carry_float_labels(images, monkeypatch):
    monkeypatch.setattr(files, "SMALL_IMAGES", 3)  # this collection counts as large
    rows = [f"img/{i:02d}.png,F,1,{i % 2},{'-1' if i % 3 == 0 else ''},{int(i > 5)}" for i in range(12)]
    write_csv(images / "train.csv", CHEXPERT_HEADER, rows[:8])
    write_csv(images / "test.csv", CHEXPERT_HEADER, rows[8:])
    ds = load_dataset("csv", images, image_size=8, workers=0, val_fraction=0.25, csv=CsvLayout(
        "train.csv", test_csv="test.csv", multi_label=True, uncertain="ignore", **CHEXPERT))
    assert ds.streaming and isinstance(ds.train, FileSplit) and isinstance(ds.test, FileSplit)
    assert ds.in_chans == 1 and len(ds.train) + len(ds.val) == 8 and len(ds.val) >= 2
    assert ds.test.paths == [str(images / "img" / f"{i:02d}.png") for i in range(8, 12)]
    expected = [[0, 0, 1], [1, NAN, 1], [0, 0, 1], [1, 0, 1]]  # rows 8 to 11; -1 in row 9 alone
    assert same(ds.test.labels, expected)
    test = list(loader_for(ds, ds.test, 3, train=False, device=torch.device("cpu"), workers=0))
    assert [tuple(y.shape) for _, y in test] == [(3, 3), (1, 3)] and all(y.dtype == torch.float32 for _, y in test)
    assert all(x.shape[1:] == (1, 8, 8) for x, _ in test)
    assert same(torch.cat([y for _, y in test]), expected)
    train = list(loader_for(ds, ds.train, 2, train=True, device=torch.device("cpu"), workers=0).epoch(0))
    assert len(train) == len(ds.train) // 2 and all(y.shape == (2, 3) and y.dtype == torch.float32 for _, y in train)
    rows = [str(row) for row in ds.train.labels.tolist()]  # NaN kept: str(nan) == "nan"
    assert all(str(row) in rows for _, y in train for row in y.tolist())


# -- missing images ------------------------------------------------------------------------------


def test_a_missing_image_is_named_with_its_line_or_skipped(images, caplog):
    write_csv(images / "train.csv", NIH_HEADER, nih_rows(["a", "b", "a"]) + ["img/gone.png,b,0,0,1,1"])
    with pytest.raises(DataArgumentError) as info:
        load(images, train_csv="train.csv", **NIH)
    assert str(info.value) == (f"{images / 'train.csv'}:5: image {images / 'img/gone.png'} not found (give "
                               "skip_bad_images to skip rows whose image is missing, with a warning)")
    assert "--skip-bad-images to skip" in info.value.render({"skip_bad_images": "--skip-bad-images"})
    parts = load_csv(images, CsvLayout("train.csv", **NIH), 4, val_fraction=0, workers=0, skip_bad_images=True)
    assert values(parts["train"]) == [0, 1, 2] and f"skipping {images / 'train.csv'}:5" in caplog.text


def test_all_images_missing(images):
    write_csv(images / "train.csv", NIH_HEADER, ["nope/1.png,a,0,0,1,1"])
    with pytest.raises(DataError, match=r"train.csv: none of its 1 images found$"):
        load_csv(images, CsvLayout("train.csv", **NIH), 4, skip_bad_images=True)


# -- the files' own refusals, one line each -----------------------------------------------------


def test_missing_column_names_the_columns_there_are(images):
    write_csv(images / "train.csv", NIH_HEADER, nih_rows(["a"]))
    assert message(images, train_csv="train.csv", path_column="Image Index", label_column="Labels") == (
        f"{images / 'train.csv'}: no column 'Labels' (label_column); its columns: 'Image Index', 'Finding Labels', "
        "'Follow-up #', 'Patient ID', 'OriginalImage[Width', 'Height]'")
    with pytest.raises(DataArgumentError) as info:
        load(images, train_csv="train.csv", path_column="path", label_columns=("a",))
    assert info.value.render({"path_column": "--path-column"}).startswith(
        f"{images / 'train.csv'}: no column 'path' (--path-column); its columns:")


@pytest.mark.parametrize("content, expected", [
    (b"", "{csv}: empty; expected a header row naming the columns"),
    (b"\n\n", "{csv}: empty; expected a header row naming the columns"),
    (b"Image Index,Finding Labels\n\n", "{csv}: no rows below the header"),
    (b"Image Index,Finding Labels,Image Index\nimg/00.png,a,x\n",
     "{csv}: the header names 'Image Index' more than once; each column needs its own name"),
    (b"Image Index,Finding Labels\nimg/00.png,a\nimg/01.png\n",
     "{csv}:3: 1 fields, so no 'Finding Labels', field 2"),
    (b"Image Index,Finding Labels\nimg/00.png,a\nimg/01.png,caf\xe9\n",
     "{csv}:3: byte 0xe9 is not UTF-8; save the file as UTF-8"),
    (b"Image Index,Finding Labels\nimg/00.png," + b"x" * 200_000 + b"\n",
     "{csv}:2: not a readable CSV row (field larger than field limit (131072))"),
    (b"Image Index,Finding Labels\n,a\n", "{csv}:2: no path in column 'Image Index'"),
    (b"Image Index,Finding Labels\nimg/00.png,\n",
     "{csv}:2: no label in column 'Finding Labels'; give multi_label for images with none"),
    (b"Image Index,Finding Labels\nimg/00.png,a|b|a\n",
     "{csv}:2: 2 labels in column 'Finding Labels', 'a|b|a'; give multi_label for several per image"),
])
def test_file_refusals(images, content, expected):
    (images / "t.csv").write_bytes(content)
    assert message(images, train_csv="t.csv", **NIH) == expected.format(csv=images / "t.csv")


@pytest.mark.parametrize("cells, expected", [
    ("img/00.png,No Finding|Mass", "{csv}:2: 'No Finding' beside other labels in column 'Finding Labels', "
                                   "'No Finding|Mass'"),
    ("img/00.png,", "{csv}:2: no label in column 'Finding Labels'; an image with none says 'No Finding'"),
    ("img/00.png,No Finding", "{csv}: no labels in column 'Finding Labels'; every row says 'No Finding'"),
])
def test_multi_label_name_refusals(images, cells, expected):
    write_csv(images / "t.csv", "Image Index,Finding Labels", [cells])
    assert message(images, train_csv="t.csv", multi_label=True, **NIH) == expected.format(csv=images / "t.csv")


def test_val_label_not_in_train(images):
    write_csv(images / "train.csv", NIH_HEADER, nih_rows(["Mass", "Effusion"]))
    write_csv(images / "val.csv", NIH_HEADER, nih_rows(["Mass", " Hernia"]))
    for multi_label in (True, False):
        assert message(images, train_csv="train.csv", val_csv="val.csv", multi_label=multi_label, **NIH) == (
            f"{images / 'val.csv'}:3: label 'Hernia' is in no row of the training CSV; its labels: 'Effusion', 'Mass'")


def test_label_cell_that_is_not_a_label(images):
    write_csv(images / "train.csv", CHEXPERT_HEADER, ["img/00.png,F,1,1,0,0", "img/01.png,F,1,yes,0,0"])
    assert message(images, train_csv="train.csv", multi_label=True, **CHEXPERT) == (
        f"{images / 'train.csv'}:3: column 'No Finding' holds 'yes'; expected 1, 0, -1 (uncertain) or nothing "
        "(not mentioned)")


def test_csv_file_not_found_names_its_argument(images):
    with pytest.raises(DataArgumentError) as info:
        load(images, train_csv="train.csv", test_csv="nope.csv", **NIH)
    assert str(info.value) == f"{images / 'train.csv'}: CSV file not found (given as train_csv)"
    write_csv(images / "train.csv", NIH_HEADER, nih_rows(["a"]))
    assert message(images, train_csv="train.csv", test_csv="nope.csv", **NIH) == (
        f"{images / 'nope.csv'}: CSV file not found (given as test_csv)")
    assert message(images / "img" / "00.png", train_csv="train.csv", **NIH) == (
        f"{images / 'img' / '00.png'}: data directory not found (given as data_dir)")


def test_bounds_on_size_and_rows(images, monkeypatch):
    write_csv(images / "train.csv", NIH_HEADER, nih_rows(["a", "b", "c"]))
    monkeypatch.setattr(csvfile, "MAX_ROWS", 2)
    assert message(images, train_csv="train.csv", **NIH) == (
        f"{images / 'train.csv'}: more than 2 rows; densekit reads at most that many")
    monkeypatch.setattr(csvfile, "MAX_BYTES", 100)
    size = (images / "train.csv").stat().st_size / (1 << 30)
    assert message(images, train_csv="train.csv", **NIH) == (
        f"{images / 'train.csv'}: a CSV file of {size:.1f} GiB; densekit reads at most {100 / (1 << 30):g} GiB")


# -- the layout's own checks --------------------------------------------------------------------


@pytest.mark.parametrize("kw, expected", [
    (dict(train_csv="", path_column="p", label_column="l"), "train_csv must be a CSV file's path, got ''"),
    (dict(train_csv="t", path_column="p", label_column="l", val_csv=" "), "val_csv must be a CSV file's path, got ' '"),
    (dict(train_csv="t", path_column=None, label_column="l"), "path_column must be a column name, got None"),
    (dict(train_csv="t", path_column="p"),
     "give one of label_column (label names in one column) or label_columns (one column per label)"),
    (dict(train_csv="t", path_column="p", label_column="l", label_columns=("a",)),
     "give one of label_column (label names in one column) or label_columns (one column per label), not both"),
    (dict(train_csv="t", path_column="p", label_columns="abc"),
     "label_columns must be one or more column names, got 'abc'"),
    (dict(train_csv="t", path_column="p", label_columns=()), "label_columns must be one or more column names, got ()"),
    (dict(train_csv="t", path_column="p", label_columns=("a", "b", "a")), "label_columns names a more than once"),
    (dict(train_csv="t", path_column="p", label_columns=("a", "p")), "label_columns holds path_column, 'p'"),
    (dict(train_csv="t", path_column="p", label_column="p"), "label_column and path_column name the same column, 'p'"),
    (dict(train_csv="t", path_column="p", label_columns=("a",), label_sep="|"),
     "label_sep splits the names of label_column: a non-empty string, given with it; got '|'"),
    (dict(train_csv="t", path_column="p", label_column="l", label_sep=""),
     "label_sep splits the names of label_column: a non-empty string, given with it; got ''"),
    (dict(train_csv="t", path_column="p", label_columns=("a",), uncertain="maybe"),
     "uncertain must be one of zeros, ones, ignore, got 'maybe'"),
    (dict(train_csv="t", path_column="p", label_column="l", uncertain="ones"),
     "uncertain says what the -1 cells of label_columns mean; label_column has none"),
    (dict(train_csv="t", path_column="p", label_columns=("a",), uncertain="ignore"),
     "uncertain='ignore' leaves labels unknown, which only a multi-label set can hold: give multi_label, "
     "or uncertain 'zeros' or 'ones'"),
    (dict(train_csv="t", path_column="p", label_column="l", multi_label=1), "multi_label must be True or False, got 1"),
])
def test_layout_refusals(kw, expected):
    with pytest.raises(DataArgumentError) as info:
        CsvLayout(**kw)
    assert str(info.value) == expected


def test_layout_round_trips_through_json_types():
    layout = CsvLayout("t.csv", "Path", label_columns=("a", "b"), multi_label=True, uncertain="ignore")
    again = CsvLayout(**{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(layout).items()})
    assert again == layout and hash(again) == hash(layout) and again.label_columns == ("a", "b")


def test_load_dataset_takes_a_layout_for_csv_alone(images):
    with pytest.raises(DataArgumentError) as info:
        load_dataset("csv", images)
    assert str(info.value) == "the csv dataset needs csv, a CsvLayout naming its CSV files and columns"
    with pytest.raises(DataArgumentError) as info:
        load_dataset("imagefolder", images, csv=CsvLayout("t", "p", label_column="l"))
    assert str(info.value) == "csv describes the csv dataset's files; imagefolder has none"
