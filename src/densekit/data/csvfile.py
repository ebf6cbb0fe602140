"""Image files listed in CSV files, with their labels in the same rows: the layout of the chest
X-ray sets and of most collections exported from a spreadsheet or a database.

A :class:`CsvLayout` names the files (a training CSV, and optionally a validation and a test CSV)
and their columns: one holding each image's path (relative to the data directory, or absolute),
and the labels in one of two layouts:

- names in one column (``label_column``), several joined by ``label_sep`` for multi-label sets.
  ChestX-ray14 (NIH): ``Data_Entry_2017.csv``, path column "Image Index", labels in "Finding
  Labels" joined by "|" ("Effusion|Infiltration"), "No Finding" for an image with none
  (``no_label``). Its images come spread over images_001/ ... images_012/: gather them into one
  folder (links will do) and give that as the data directory;
- one column per label (``label_columns``). CheXpert: path column "Path" (relative to the folder
  above CheXpert-v1.0-small/), one column per finding holding 1 (positive), 0 (negative), -1
  (uncertain, the report hedges) or nothing (the report does not mention it).

The classes (single-label) or labels (multi-label) are the training CSV's: the names in sorted
order, or the columns in the order given. Single-label labels are int64 class indices; multi-label
ones float32 (N, L), 1 present, 0 absent, NaN unknown (``core.check_label_tensor``).

Why the defaults: ``no_label`` is ChestX-ray14's spelling. ``uncertain="zeros"`` reads CheXpert's
-1 as absent (the CheXpert paper's U-Zeros), which keeps every label of every image in the loss;
``"ignore"`` leaves the uncertain ones out of the loss and the metrics (U-Ignore), ``"ones"``
counts them present (U-Ones), and no one of them was best for every finding in that paper. A
blank, "not mentioned", reads as absent whatever ``uncertain`` says: most of CheXpert's cells are
blank, and reading them as present or unknown would make most labels positives or holes.

The files are strangers' and are read with bounds: UTF-8 with or without a byte-order mark, a
header row naming the columns (each name once), at most ``MAX_BYTES`` and ``MAX_ROWS`` rows, every
image file found up front; each refusal is a one-line DataError naming the file and line. The
images then go to ``files.load_files``, which decodes a small collection into memory and streams a
large one.
"""

from __future__ import annotations

import array
import collections
import csv
import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .. import checks
from ..checks import ArgumentError, quote, text
from .core import DataArgumentError, DataError, FileSplit
from .files import load_files

log = logging.getLogger(__name__)

MAX_BYTES = 1 << 30  # about 100 bytes a row (CheXpert's): room for MAX_ROWS
MAX_ROWS = 10_000_000
UNCERTAIN = ("zeros", "ones", "ignore")
_UNCERTAIN_VALUE = {"zeros": 0.0, "ones": 1.0, "ignore": float("nan")}
# A label column's cells: pandas writes 1.0 and 0.0 for columns that hold a blank anywhere.
_CELL = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "": 0.0, "-1": None, "-1.0": None}  # None: uncertain
_WARN_MISSING = 10  # missing images named one by one when skipped; the rest are counted


@dataclasses.dataclass(frozen=True)
class CsvLayout:
    """Which CSV files list a dataset's images, and which of their columns hold what."""

    train_csv: str                  # relative to the data directory, or absolute
    path_column: str                # each image's file, relative to the data directory, or absolute
    val_csv: str | None = None      # the validation split; else val_fraction of train's images is held out
    test_csv: str | None = None     # scored once, at the end
    label_column: str | None = None  # one class name per row, or several joined by label_sep
    label_sep: str | None = None    # "|" for ChestX-ray14's "Finding Labels"
    no_label: str = "No Finding"    # multi-label, label_column: the name of "none" (ChestX-ray14's)
    label_columns: tuple[str, ...] | None = None  # one 1/0/-1/blank column per label (CheXpert)
    uncertain: str = "zeros"        # label_columns: -1 reads as 0 ("zeros"), 1 ("ones"), NaN, unknown ("ignore")
    multi_label: bool = False       # several labels per image (sigmoid outputs) rather than one class

    def __post_init__(self) -> None:
        for name in ("train_csv", "val_csv", "test_csv"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
            if (value is not None or name == "train_csv") and not _name(getattr(self, name)):
                raise DataArgumentError(f"{{{name}}} must be a CSV file's path, got {quote(value)}")
        if not _name(self.path_column):
            raise DataArgumentError(f"{{path_column}} must be a column name, got {quote(self.path_column)}")
        if (self.label_column is None) == (self.label_columns is None):
            raise DataArgumentError("give one of {label_column} (label names in one column) or {label_columns} "
                                    "(one column per label)" + (", not both" if self.label_column else ""))
        if self.label_columns is not None:
            self._check_label_columns()
        elif not _name(self.label_column):
            raise DataArgumentError(f"{{label_column}} must be a column name, got {quote(self.label_column)}")
        elif self.label_column == self.path_column:
            raise DataArgumentError("{label_column} and {path_column} name the same column, "
                                    f"{quote(self.path_column)}")
        if self.label_sep is not None and (self.label_columns is not None or not _name(self.label_sep)):
            raise DataArgumentError(f"{{label_sep}} splits the names of {{label_column}}: a non-empty string, "
                                    f"given with it; got {quote(self.label_sep)}")
        if not isinstance(self.no_label, str):
            raise DataArgumentError(f"{{no_label}} must be a string, got {quote(self.no_label)}")
        try:
            checks.one_of("uncertain", self.uncertain, UNCERTAIN)
        except ArgumentError as e:
            raise DataArgumentError(e.template) from None
        if self.uncertain != "zeros" and self.label_columns is None:
            raise DataArgumentError("{uncertain} says what the -1 cells of {label_columns} mean; "
                                    "{label_column} has none")
        if not isinstance(self.multi_label, bool):
            raise DataArgumentError(f"{{multi_label}} must be True or False, got {quote(self.multi_label)}")
        if self.uncertain == "ignore" and not self.multi_label:
            raise DataArgumentError("{uncertain}='ignore' leaves labels unknown, which only a multi-label set "
                                    "can hold: give {multi_label}, or uncertain 'zeros' or 'ones'")

    def _check_label_columns(self) -> None:
        columns = self.label_columns
        if not isinstance(columns, (list, tuple)) or not columns or not all(_name(c) for c in columns):
            raise DataArgumentError(f"{{label_columns}} must be one or more column names, got {quote(columns)}")
        object.__setattr__(self, "label_columns", tuple(columns))  # a list from JSON, kept hashable
        twice = sorted({c for c in columns if columns.count(c) > 1})
        if twice:
            raise DataArgumentError(f"{{label_columns}} names {quote(', '.join(twice))[1:-1]} more than once")
        if self.path_column in columns:
            raise DataArgumentError(f"{{label_columns}} holds {{path_column}}, {quote(self.path_column)}")


def layout_from_dict(fields: dict) -> CsvLayout:
    """A layout from its fields as JSON holds them (a run's config, model.json), checked."""
    names = {f.name for f in dataclasses.fields(CsvLayout)}
    if not isinstance(fields, dict) or set(fields) - names or not {"train_csv", "path_column"} <= set(fields):
        raise DataArgumentError(f"{{csv}} must give train_csv, path_column and some of {', '.join(sorted(names))}; "
                                f"got {quote(fields)[:200]}")
    return CsvLayout(**fields)


def _name(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _show(value: str, limit: int = 60) -> str:
    """A cell's text, quoted, cut short: a field can be 100,000 characters long."""
    return repr(value if len(value) <= limit else value[:limit - 3] + "...")


def _shown_list(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(_show(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _bad_utf8(path: Path) -> str:
    """Where the first byte that is not UTF-8 lies, as "line N: byte 0x..": per line, since a
    newline byte never continues a UTF-8 sequence."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{n}: byte 0x{line[e.start]:02x}"
    return " a byte"  # the decoder saw one the lines did not: cannot happen, but say something


def _rows(path: Path, option: str, wanted: list[str], fields: list[str]) -> Iterator[tuple[int, list[str]]]:
    """(line number, the ``wanted`` columns' cells) for each row of the CSV file ``path`` below its
    header, blank lines skipped; ``option`` names the argument that gave the file, ``fields`` the
    ones that named each column."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataArgumentError(f"{text(path)}: CSV file not found (given as {{{option}}})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if not path.is_file():
        raise DataArgumentError(f"{text(path)}: not a file (given as {{{option}}})")
    if size > MAX_BYTES:
        raise DataError(f"{path}: a CSV file of {size / (1 << 30):.1f} GiB; densekit reads at most "
                        f"{MAX_BYTES / (1 << 30):g} GiB")
    reader, count = None, 0
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next((row for row in reader if row), None)
            if header is None:
                raise DataError(f"{path}: empty; expected a header row naming the columns")
            index = _columns(path, [c.strip() for c in header], wanted, fields)
            need = max(index) + 1
            for row in reader:
                line = reader.line_num
                if not row:
                    continue
                count += 1
                if count > MAX_ROWS:
                    raise DataError(f"{path}: more than {MAX_ROWS:,} rows; densekit reads at most that many")
                if len(row) < need:  # longer rows are fine: ChestX-ray14's header has a trailing comma
                    short = next(name for name, i in zip(wanted, index) if i >= len(row))
                    raise DataError(f"{path}:{line}: {len(row)} fields, so no {short!r}, field "
                                    f"{index[wanted.index(short)] + 1}")
                yield line, [row[i] for i in index]
    except UnicodeDecodeError:
        raise DataError(f"{path}:{_bad_utf8(path)} is not UTF-8; save the file as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not a readable CSV row ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if count == 0:
        raise DataError(f"{path}: no rows below the header")


def _columns(path: Path, header: list[str], wanted: list[str], fields: list[str]) -> list[int]:
    """Where each of ``wanted`` (named by the arguments ``fields``) is in ``header``; a missing
    or repeated name is refused."""
    twice = sorted(c for c, n in collections.Counter(header).items() if c and n > 1)
    if twice:
        raise DataError(f"{path}: the header names {_shown_list(twice)} more than once; each column needs its "
                        "own name")
    at = {c: i for i, c in reversed(list(enumerate(header)))}
    for column, field in zip(wanted, fields):
        if column not in at:
            names = text(_shown_list([c for c in header if c]) or "none")
            raise DataArgumentError(f"{text(path)}: no column {text(_show(column))} ({{{field}}}); its columns: "
                                    f"{names}")
    return [at[c] for c in wanted]


class _Labels:
    """The labels of one CSV's rows, gathered in flat arrays (10 million rows of Python lists
    would take gigabytes): parsed per row by :meth:`parse`, kept by :meth:`add`."""

    def __init__(self, layout: CsvLayout, names: dict[str, int] | None) -> None:
        self.layout = layout
        self.grow = names is None  # the training CSV: its names are the classes
        self.names = {} if names is None else names
        self.flat = array.array("f" if layout.label_columns and layout.multi_label else "q")
        self.counts = array.array("q")  # label_column, multi-label: names per row

    def parse(self, cells: list[str], where: str) -> list:
        return self._columns(cells, where) if self.layout.label_columns else self._names(cells[0], where)

    def add(self, parsed: list) -> None:
        self.flat.extend(parsed)
        self.counts.append(len(parsed))

    def _names(self, cell: str, where: str) -> list[int]:
        layout = self.layout
        column = layout.label_column
        value = cell.strip()
        parts = value.split(layout.label_sep) if layout.label_sep else [value]
        names = list(dict.fromkeys(p.strip() for p in parts if p.strip()))  # each once, in order
        if layout.multi_label and names == [layout.no_label]:
            return []
        if not names:
            hint = f"an image with none says {text(_show(layout.no_label))}" if layout.multi_label else \
                "give {multi_label} for images with none"
            raise DataArgumentError(f"{text(where)}: no label in column {quote(column)}; {hint}")
        if not layout.multi_label and len(names) > 1:
            raise DataArgumentError(f"{text(where)}: {len(names)} labels in column {quote(column)}, "
                                    f"{text(_show(value))}; give {{multi_label}} for several per image")
        if layout.multi_label and layout.no_label in names:
            raise DataError(f"{where}: {layout.no_label!r} beside other labels in column {column!r}, "
                            f"{_show(value)}")
        ids = []
        for name in names:
            if name not in self.names:
                if not self.grow:
                    known = _shown_list(sorted(self.names))
                    raise DataError(f"{where}: label {_show(name)} is in no row of the training CSV; its labels: "
                                    f"{known}")
                self.names[name] = len(self.names)
            ids.append(self.names[name])
        return ids

    def _columns(self, cells: list[str], where: str) -> list[float]:
        layout = self.layout
        values = []
        for column, cell in zip(layout.label_columns, cells):
            value = _CELL.get(cell.strip(), "bad")
            if value == "bad":
                raise DataError(f"{where}: column {column!r} holds {_show(cell)}; expected 1, 0, -1 (uncertain) "
                                "or nothing (not mentioned)")
            values.append(_UNCERTAIN_VALUE[layout.uncertain] if value is None else value)
        if not layout.multi_label:
            present = [c for c, v in zip(layout.label_columns, values) if v == 1.0]
            if len(present) != 1:
                said = "no label column is 1" if not present else \
                    f"{len(present)} label columns are 1 ({_shown_list(present)})"
                raise DataArgumentError(f"{text(where)}: {text(said)}; a single-label row has exactly one (give "
                                        "{multi_label} for several or none)")
            return [values.index(1.0)]
        return values

    def tensor(self, order: list[int]) -> torch.Tensor:
        """The labels as the core types hold them; ``order`` maps the ids given to names (in the
        order first met) to their class indices."""
        flat = torch.frombuffer(self.flat, dtype=torch.float32 if self.flat.typecode == "f" else torch.int64) \
            if len(self.flat) else torch.zeros(0, dtype=torch.int64)
        n = len(self.counts)
        if self.layout.label_columns:
            if self.layout.multi_label:
                return flat.clone().view(n, len(self.layout.label_columns))
            return flat.clone()
        index = torch.tensor(order, dtype=torch.int64)[flat] if len(flat) else flat
        if not self.layout.multi_label:
            return index
        labels = torch.zeros(n, len(order), dtype=torch.float32)
        rows = torch.repeat_interleave(torch.arange(n), torch.frombuffer(self.counts, dtype=torch.int64))
        labels[rows, index] = 1.0
        return labels


def _read_split(root: Path, csv_path: Path, option: str, layout: CsvLayout, names: dict[str, int] | None,
                skip_missing: bool) -> tuple[list[str], _Labels]:
    """The image files a CSV lists and their labels: each file found, or its row skipped with a
    warning (``skip_missing``) or refused."""
    columns = [layout.path_column, *(layout.label_columns or [layout.label_column])]
    fields = ["path_column"] + ["label_columns" if layout.label_columns else "label_column"] * (len(columns) - 1)
    paths, labels, missing = [], _Labels(layout, names), 0
    for line, cells in _rows(csv_path, option, columns, fields):
        where = f"{csv_path}:{line}"
        if not cells[0].strip():
            raise DataError(f"{where}: no path in column {layout.path_column!r}")
        parsed = labels.parse(cells[1:], where)
        path = os.path.join(root, cells[0].strip())
        if not os.path.isfile(path):
            if not skip_missing:
                raise DataArgumentError(f"{text(where)}: image {text(path)} not found (give {{skip_bad_images}} to "
                                        "skip rows whose image is missing, with a warning)")
            missing += 1
            if missing <= _WARN_MISSING:
                log.warning("skipping %s: image %s not found", where, path)
            continue
        paths.append(path)
        labels.add(parsed)
    if missing > _WARN_MISSING:
        log.warning("skipped %d rows of %s whose image was not found (the first %d named above)", missing, csv_path,
                    _WARN_MISSING)
    if not paths:
        raise DataError(f"{csv_path}: none of its {missing} images found")
    return paths, labels


def load_csv(data_dir: str | os.PathLike, layout: CsvLayout, image_size: int, val_fraction: float = 0.1,
             seed: int = 0, train_limit: int | None = None, workers: int | None = None,
             skip_bad_images: bool = False, stream: bool | None = None) -> dict:
    """The splits listed by ``layout``'s CSV files under ``data_dir`` and what describes them
    (``files.load_files``). ``skip_bad_images`` also skips the rows whose image is missing."""
    if not isinstance(layout, CsvLayout):
        raise DataArgumentError(f"{{csv}} must be a CsvLayout, got {quote(type(layout).__name__)}")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataArgumentError(f"{text(root)}: data directory not found (given as {{data_dir}})")
    train_path = root / layout.train_csv
    paths, train = _read_split(root, train_path, "train_csv", layout, None, skip_bad_images)
    if layout.label_columns:
        classes, order = list(layout.label_columns), []
    else:
        classes = sorted(train.names)
        if layout.multi_label and not classes:
            raise DataError(f"{train_path}: no labels in column {layout.label_column!r}; every row says "
                            f"{layout.no_label!r}")
        place = {name: i for i, name in enumerate(classes)}
        order = [place[name] for name in train.names]  # ids are in the order first met
    splits = {"train": FileSplit(paths, train.tensor(order))}
    for split, option in (("val", "val_csv"), ("test", "test_csv")):
        if getattr(layout, option) is not None:
            split_paths, labels = _read_split(root, root / getattr(layout, option), option, layout, train.names,
                                              skip_bad_images)
            splits[split] = FileSplit(split_paths, labels.tensor(order))
    val_named = f"the images of {root / layout.val_csv}" if layout.val_csv is not None else None
    return load_files(f"csv {train_path}", splits, classes, image_size, val_fraction, seed, train_limit, workers,
                      skip_bad_images, val_named=val_named, stream=stream)
