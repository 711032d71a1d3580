"""Where a dataset's rows and photos are: the one owner of that rule, and of the table formats.

Two layouts are read:

* a **Kaggle folder** (`DIR/train.csv` + `DIR/data/*.jpg`, the COMP5329 layout), read by the
  exact reader of `csv_io` (its quirks and its submission format stay as Kaggle has them);
* a **table**: a CSV file with a header, JSON Lines (`.jsonl`, one object per line) or Parquet,
  one row per sample, with the photo's path (relative to `--images`, subfolders allowed), its
  caption and its labels (one text with the labels separated by `|`, or in JSON Lines and Parquet
  also a list). The column names default to `image`, `caption` and `labels` (`Columns`).

A CSV file whose header is a Kaggle one (`ImageID,Labels,Caption`, `ImageID,Caption`) is always
read by the exact reader, so test.csv given to `predict --csv` is read as Kaggle wrote it.
A pandas DataFrame with the table's columns is read by `frame_records`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mmtag.data.csv_io import CSVFormatError, Record, csv_columns, read_csv
from mmtag.data.labels import NAMES_FILE, read_label_names

TABLE_KINDS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
               ".pq": "parquet"}
KAGGLE_ROWS = "train.csv"
KAGGLE_IMAGES = "data"


class DataSourceError(ValueError):
    """The data given cannot be read as a dataset: the message names the file and the fix."""


class DataNotFoundError(DataSourceError, FileNotFoundError):
    """The data, or the rows file it should hold, does not exist."""


@dataclass(frozen=True)
class Columns:
    """A table's column names and the text between two labels in one field."""

    image: str = "image"
    caption: str = "caption"
    labels: str = "labels"
    sep: str = "|"

    def __post_init__(self) -> None:
        if not self.sep:
            raise DataSourceError("--label-sep must not be empty (default '|')")


@dataclass(frozen=True)
class Source:
    """A dataset's rows file, its photo folder, and how to read the rows.

    `given` is the path as the user typed it: messages show it, not where a link resolves."""

    rows: Path | None               # None: rows held in memory (a DataFrame's)
    images: Path
    columns: Columns | None = None  # None: a Kaggle CSV, read exactly
    given: str = ""
    names: dict[str, str] = field(default_factory=dict)  # labels.txt beside the data, if any
    records: tuple[Record, ...] | None = None  # a DataFrame's rows, read once

    @property
    def kaggle(self) -> bool:
        return self.columns is None

    @property
    def shown(self) -> str:
        return self.given or str(self.rows)

    def read(self, need_labels: bool = False) -> list[Record]:
        """The rows, in file order (a bad file is an error naming its line)."""
        if self.records is not None:
            if need_labels and not any(r.labels for r in self.records):
                raise DataSourceError(f"{self.shown} has no labels in its "
                                      f"{(self.columns or Columns()).labels!r} column")
            return list(self.records)
        if self.columns is None:
            return read_csv(self.rows)
        return read_table(self.rows, self.columns, need_labels)

    def flags(self) -> str:
        """The command-line flags that name this data again (for the commands a message
        suggests)."""
        import shlex

        if self.rows is None:
            return "--data TABLE"  # a DataFrame: the command line needs it saved as a table
        parts = ["--data", self.given or str(self.rows.parent if self.kaggle else self.rows)]
        default_images = (self.rows.parent / KAGGLE_IMAGES if self.rows.name == KAGGLE_ROWS
                          else self.rows.parent)
        if self.images != default_images:
            parts += ["--images", str(self.images)]
        if self.columns is not None:
            for flag, value, default in zip(
                    ("--image-col", "--caption-col", "--labels-col", "--label-sep"),
                    asdict(self.columns).values(), asdict(Columns()).values(), strict=True):
                if value != default:
                    parts += [flag, value]
        return " ".join(shlex.quote(p) for p in parts)

    def to_dict(self) -> dict:
        """Plain data for summary.json (absolute paths: a report finds the photos again)."""
        return {"rows": str(self.rows.resolve()) if self.rows else None,
                "images": str(self.images.resolve()),
                "columns": asdict(self.columns) if self.columns else None, "given": self.given}

    @classmethod
    def from_dict(cls, d: dict) -> Source | None:
        """The data a summary.json names; None for rows that were held in memory."""
        if not d.get("rows"):
            return None
        return cls(Path(d["rows"]), Path(d["images"]),
                   Columns(**d["columns"]) if d.get("columns") else None, d.get("given", ""),
                   _names_beside(Path(d["rows"])))


def open_data(data: Path | str, images: Path | str | None = None,
              columns: Columns | None = None) -> Source:
    """The training data `--data` names: a Kaggle folder (its train.csv and data/), or a table
    file (`images`: the folder its paths are relative to, default the table's folder)."""
    path = Path(data)
    if not path.exists() and path.suffix.lower() not in TABLE_KINDS:
        raise DataNotFoundError(f"{path / KAGGLE_ROWS} not found: {path} does not exist; --data "
                                f"must be a Kaggle-layout folder (train.csv, data/*.jpg) or a "
                                f"table file (CSV with a header, .jsonl, .parquet)")
    if path.is_dir():
        rows = path / KAGGLE_ROWS
        if not rows.is_file():
            tables = sorted(p.name for p in path.iterdir() if p.suffix.lower() in TABLE_KINDS)
            hint = (f"; to train on a table give the file: --data {path / tables[0]}" if tables
                    else "")
            raise DataNotFoundError(f"{rows} not found: --data must be a Kaggle-layout folder "
                                    f"(train.csv, data/*.jpg) or a table file (CSV with a "
                                    f"header, .jsonl, .parquet){hint}")
        image_dir = Path(images) if images is not None else path / KAGGLE_IMAGES
        return Source(rows, image_dir, _kaggle_or(rows, columns), str(data), _names_beside(rows))
    return open_rows(path, images, columns)


def open_rows(path: Path | str, images: Path | str | None = None,
              columns: Columns | None = None) -> Source:
    """A rows file (`evaluate --csv`, `predict --csv`): a Kaggle CSV (photos in `images`,
    default data/ beside it) or a table (photos relative to `images`, default its folder)."""
    path = Path(path)
    if not path.exists():
        raise DataNotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise DataSourceError(f"{path} is a folder; give a rows file (a CSV, .jsonl or "
                              f".parquet table, or a Kaggle CSV such as test.csv)")
    if path.suffix.lower() not in TABLE_KINDS:
        raise DataSourceError(f"{path}: unknown table format {path.suffix or '(no suffix)'}; "
                              f"mmtag reads {', '.join(sorted(TABLE_KINDS))} files")
    cols = _kaggle_or(path, columns)
    default_images = path.parent / KAGGLE_IMAGES if cols is None else path.parent
    return Source(path, Path(images) if images is not None else default_images, cols, str(path),
                  _names_beside(path))


def _kaggle_or(path: Path, columns: Columns | None) -> Columns | None:
    """None (read exactly) for a CSV with a Kaggle header, else the table's columns."""
    if path.suffix.lower() != ".csv":
        return columns or Columns()
    try:
        csv_columns(path)
        return None
    except CSVFormatError:
        return columns or Columns()


def _names_beside(rows: Path) -> dict[str, str]:
    """labels.txt next to the rows file: label names for every output."""
    f = rows.parent / NAMES_FILE
    return read_label_names(f) if f.is_file() else {}


def read_table(path: Path, columns: Columns, need_labels: bool = False) -> list[Record]:
    """The rows of a CSV (with a header), JSON Lines or Parquet table, as Records whose
    `line` is the row's line in the file (Parquet: its row number, from 1)."""
    kind = TABLE_KINDS.get(path.suffix.lower())
    if kind == "csv":
        found, rows = _csv_rows(path)
    elif kind == "jsonl":
        found, rows = _jsonl_rows(path)
    elif kind == "parquet":
        found, rows = _parquet_rows(path)
    else:
        raise DataSourceError(f"{path}: unknown table format {path.suffix or '(no suffix)'}")
    return table_records(str(path), found, rows, columns, need_labels)


def is_frame(data: object) -> bool:
    """A pandas DataFrame (told by its shape, so pandas is imported only by those who use it)."""
    return hasattr(data, "itertuples") and hasattr(data, "columns") and hasattr(data, "index")


def frame_source(frame, images: Path | str | None = None, columns: Columns = Columns(),
                 need_labels: bool = False) -> Source:
    """A pandas DataFrame as a Source: its rows read now, photos relative to `images` (default
    the working folder)."""
    records = frame_records(frame, columns, need_labels)
    return Source(None, Path(images) if images is not None else Path("."), columns,
                  "the DataFrame", records=tuple(records))


def frame_records(frame, columns: Columns = Columns(), need_labels: bool = False,
                  where: str = "the DataFrame") -> list[Record]:
    """A pandas DataFrame's rows (its index is not used): `line` is the row's position + 1."""
    found = [str(c) for c in frame.columns]
    rows = ((i + 1, dict(zip(found, values, strict=True)))
            for i, values in enumerate(frame.itertuples(index=False, name=None)))
    return table_records(where, found, rows, columns, need_labels)


def table_records(where: str, found: Sequence[str], rows: Iterable[tuple[int, dict]],
                  columns: Columns, need_labels: bool) -> list[Record]:
    """Records of (line, {column: value}) rows, checked: a missing column lists those found,
    an empty image path or a repeated one names its line."""
    wanted = [columns.image, columns.caption] + ([columns.labels] if need_labels else [])
    missing = [c for c in wanted if c not in found]
    if missing:
        flags = {columns.image: "--image-col", columns.caption: "--caption-col",
                 columns.labels: "--labels-col"}
        raise DataSourceError(
            f"{where}: no column {', '.join(repr(c) for c in missing)}; the columns are "
            f"{', '.join(repr(c) for c in found) or '(none)'}. Name yours with "
            f"{', '.join(flags[c] for c in missing)}")
    has_labels = columns.labels in found
    out, first_line = [], {}
    for line, row in rows:
        image = _text(row.get(columns.image))
        if not image:
            raise DataSourceError(f"{where}, line {line}: the {columns.image!r} field is empty; "
                                  f"every row needs the path of its photo")
        if ".." in Path(image).parts or "\0" in image or "\\" in image:
            raise DataSourceError(f"{where}, line {line}: the photo path {image!r} leaves the "
                                  f"image folder ('..'); give paths inside --images, with '/' "
                                  f"between folders")
        if image in first_line:
            raise DataSourceError(f"{where}, line {line}: {image} is also on line "
                                  f"{first_line[image]}; each photo may appear only once: "
                                  f"remove or merge one of the two rows")
        first_line[image] = line
        labels = _labels(row.get(columns.labels), columns.sep) if has_labels else ()
        out.append(Record(image, labels, _text(row.get(columns.caption)), line))
    if not out:
        raise DataSourceError(f"{where} has no rows")
    return out


def _text(value: object) -> str:
    """A field as text; missing values (None, NaN) are empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _labels(value: object, sep: str) -> tuple[str, ...]:
    """A labels field: text split at `sep`, or a list (JSON Lines, Parquet); blanks dropped,
    order kept, a repeat kept once."""
    if hasattr(value, "tolist"):  # a numpy array from Parquet
        value = value.tolist()
    parts = value if isinstance(value, list | tuple) else _text(value).split(sep)
    seen: dict[str, None] = {}
    for p in parts:
        t = _text(p)
        if t:
            seen.setdefault(t, None)
    return tuple(seen)


def _csv_rows(path: Path) -> tuple[list[str], Iterable[tuple[int, dict]]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataSourceError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") \
            from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if not header:
            raise DataSourceError(f"{path} is empty; a table needs a header line (e.g. "
                                  f"image,caption,labels) and one row per photo")
        header = [h.strip() for h in header]
        rows = []
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise DataSourceError(
                    f"{path}, line {reader.line_num}: {len(values)} fields, the header has "
                    f"{len(header)}; quote a field that holds a comma (\"a, b\")")
            rows.append((reader.line_num, dict(zip(header, values, strict=True))))
    except csv.Error as e:
        raise DataSourceError(f"{path}, line {reader.line_num}: {e}") from None
    return header, rows


def _jsonl_rows(path: Path) -> tuple[list[str], Iterable[tuple[int, dict]]]:
    rows, found = [], {}
    with path.open(encoding="utf-8") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError:
            raise DataSourceError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataSourceError(f"{path}, line {n}: not JSON ({e.msg}); JSON Lines holds one "
                                  f"object per line") from None
        if not isinstance(obj, dict):
            raise DataSourceError(f"{path}, line {n}: expected an object "
                                  f"({{\"image\": ..., \"caption\": ...}}), got {type(obj).__name__}")
        found.update(dict.fromkeys(obj))
        rows.append((n, obj))
    return list(found), rows


def _parquet_rows(path: Path) -> tuple[list[str], Iterable[tuple[int, dict]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own types for a damaged file
        raise DataSourceError(f"{path} cannot be read as Parquet: {e}") from None
    data = table.to_pylist()
    return list(table.column_names), ((i + 1, row) for i, row in enumerate(data))


def format_table_predictions(image_ids: Sequence[str], label_sets: Sequence[Sequence[str]],
                             columns: Columns) -> str:
    """A CSV of predictions for a table: its image and labels columns (labels joined by the
    table's separator), one row per photo in the input's order."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([columns.image, columns.labels])
    for image, labels in zip(image_ids, label_sets, strict=True):
        w.writerow([image, columns.sep.join(labels)])
    return buf.getvalue()
