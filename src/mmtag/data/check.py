"""Checking a data folder in the Kaggle layout before any training is spent on it.

``mmtag check-data DIR`` calls :func:`check_data` and prints either the JSON report or
:func:`format_report`'s text. The folder is expected to look like the competition download::

    DIR/train.csv   ImageID,Labels,Caption
    DIR/test.csv    ImageID,Caption          (optional)
    DIR/data/       the images named by ImageID

What counts as a *problem* (``report["ok"]`` is False):

* a train row whose image is missing, or any referenced image (train or test) that cannot be
  fully decoded;
* a train row with no labels, or train.csv with no rows at all;
* an ImageID that repeats (within a file or across train and test) or is not a plain file name;
* test rows without an image, only when ``strict_test=True``.

Everything else is a *note*: the published development folder holds images for only the first
1,000 test rows, so test rows without an image are counted but are not a failure by default;
files in the image folder that no row references are listed for information.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmtag.data.csv_io import Record, read_csv
from mmtag.data.images import load_image
from mmtag.data.sources import Source, open_data

__all__ = ["DataLayoutError", "check_data", "format_report"]

EXPECTED_LAYOUT = (
    "expected the Kaggle layout: DIR/train.csv (ImageID,Labels,Caption), "
    "DIR/data/ holding the images named in the ImageID column, "
    "and optionally DIR/test.csv (ImageID,Caption)"
)

# Lists of offending rows are capped so that a folder with every image missing still gives a
# JSON report of reasonable size; the counts next to them are always complete.
MAX_LISTED = 1000
# a label on fewer rows than this is reported as unexpected (likely a typo in the file)
RARE_LABEL_ROWS = 5
# the name rows of the labelled file are reported under (train.csv, or a table's rows)
TRAIN = "train.csv"
# How many entries the text report shows per list (the JSON report has up to MAX_LISTED).
_TEXT_LISTED = 10
# How many example names the informative lists (unreferenced files, test rows without an image)
# keep: they are expected to be long on the real data and are not errors.
_FIRST_FEW = 10


class DataLayoutError(FileNotFoundError):
    """The folder given to :func:`check_data` is not in the expected Kaggle layout."""


# --------------------------------------------------------------------------------------------
# Image decoding (runs in worker processes)
# --------------------------------------------------------------------------------------------


def _pool_init() -> None:
    """Worker initialiser: make truncated files fail even if the parent relaxed PIL's check.

    Training code commonly sets ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` to survive bad
    files; a forked worker would inherit that and silently pass a truncated JPEG.
    """
    from PIL import ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    """The in-process equivalent of :func:`_pool_init`, restoring the caller's setting after."""
    from PIL import ImageFile

    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _decode_one(job: tuple[str, str]) -> tuple[str, str | None, int, int, str, str | None]:
    """Fully decode one image; return ``(image_id, error, width, height, mode, warning)``.

    Reading only the header (``Image.open`` alone, or ``verify()``) misses files whose pixel
    data is truncated or garbled, which is exactly what breaks a training run hours later, so
    the whole image is decoded and converted to RGB as the data loaders will do.
    """
    image_id, path = job
    from PIL import Image

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # as the data loaders will (regular files only, the decode budget, EXIF orientation)
            load_image(path)
            with Image.open(path) as im:
                width, height, mode = im.width, im.height, im.mode
    except Exception as exc:  # any failure to decode is what we report, whatever its type
        return image_id, f"{type(exc).__name__}: {exc}", 0, 0, "", None
    warning = str(caught[0].message) if caught else None
    return image_id, None, width, height, mode, warning


def _decode_all(
    jobs: Sequence[tuple[str, str]], workers: int, progress: bool
) -> list[tuple[str, str | None, int, int, str, str | None]]:
    """Decode every job, in a process pool when ``workers > 1``, with an optional tqdm bar."""
    from tqdm import tqdm

    results = []
    bar = tqdm(
        total=len(jobs),
        desc="decoding images",
        unit="img",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    with bar:
        if workers <= 1 or len(jobs) < 2:
            with _strict_truncation():
                for job in jobs:
                    results.append(_decode_one(job))
                    bar.update(1)
        else:
            import multiprocessing

            # Small chunks keep the bar moving and the load balanced; large enough that the
            # per-task IPC cost stays well below the ~1 ms it takes to decode a small JPEG.
            chunksize = max(1, min(64, len(jobs) // (workers * 8)))
            with multiprocessing.Pool(workers, initializer=_pool_init) as pool:
                for result in pool.imap_unordered(_decode_one, jobs, chunksize=chunksize):
                    results.append(result)
                    bar.update(1)
    return results


# --------------------------------------------------------------------------------------------
# Statistics helpers
# --------------------------------------------------------------------------------------------


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method) of already sorted values."""
    if not sorted_values:
        raise ValueError("percentile of an empty sequence")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _caption_stats(records: Sequence[Record]) -> dict[str, Any]:
    """Caption length in whitespace-separated words."""
    lengths = sorted(len(r.caption.split()) for r in records)
    if not lengths:
        return {"rows": 0, "empty": 0}
    return {
        "rows": len(lengths),
        "empty": sum(1 for n in lengths if n == 0),
        "min": lengths[0],
        "mean": round(sum(lengths) / len(lengths), 3),
        "median": _percentile(lengths, 50),
        "p90": _percentile(lengths, 90),
        "p95": _percentile(lengths, 95),
        "p99": _percentile(lengths, 99),
        "max": lengths[-1],
    }


def _label_stats(train: Sequence[Record]) -> dict[str, Any]:
    """Label set, per-label frequencies and the labels-per-image distribution of train rows."""
    images_with = Counter()  # label -> number of rows carrying it (a repeat counts once)
    occurrences = Counter()  # label -> number of times it is written in the file
    per_image = Counter()  # number of distinct labels -> number of rows
    repeated = []
    for r in train:
        distinct = set(r.labels)
        images_with.update(distinct)
        occurrences.update(r.labels)
        per_image[len(distinct)] += 1
        if len(distinct) != len(r.labels):
            repeated.append(_row_ref("train.csv", r))
    n_rows = len(train)
    n_occ = sum(occurrences.values())
    frequency = [
        {
            "label": label,
            "images": images_with[label],
            "pct_images": round(100.0 * images_with[label] / n_rows, 3) if n_rows else 0.0,
            "occurrences": occurrences[label],
            "pct_occurrences": round(100.0 * occurrences[label] / n_occ, 3) if n_occ else 0.0,
        }
        for label in sorted(images_with)
    ]
    return {
        "set": sorted(images_with),
        "count": len(images_with),
        "occurrences": n_occ,
        "frequency": frequency,
        "per_image": {
            # String keys so that the report equals its own JSON round trip.
            "histogram": {str(k): per_image[k] for k in sorted(per_image)},
            "mean": round(sum(k * c for k, c in per_image.items()) / n_rows, 4) if n_rows else None,
            "min": min(per_image) if per_image else None,
            "max": max(per_image) if per_image else None,
        },
        "rows_with_repeated_labels": _listing(repeated),
        "unexpected": _rare_labels(train, images_with),
    }


def _rare_labels(train: Sequence[Record], images_with: Counter) -> list[dict[str, Any]]:
    """Labels on fewer than RARE_LABEL_ROWS rows, with those rows: a typo in the file, or a
    label too rare to learn or to tune a threshold for."""
    rare = {label for label, n in images_with.items() if n < RARE_LABEL_ROWS}
    rows: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in train:
        for label in sorted(rare.intersection(r.labels)):
            rows[label].append(_row_ref("train.csv", r))
    return [{"label": label, "images": images_with[label], "rows": rows[label][:MAX_LISTED]}
            for label in sorted(rare)]


def _natural_key(name: str) -> list[Any]:
    """Sort ``2.jpg`` before ``10.jpg``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _row_ref(csv_name: str, record: Record, **extra: Any) -> dict[str, Any]:
    return {"csv": csv_name, "line": record.line, "image_id": record.image_id, **extra}


def _listing(items: list[Any], cap: int = MAX_LISTED) -> dict[str, Any]:
    return {"count": len(items), "items": items[:cap], "truncated": len(items) > cap}


# --------------------------------------------------------------------------------------------
# The check, step by step
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where the parts of a Kaggle-layout folder are."""

    root: Path
    train: Source           # the labelled rows: train.csv, or a table
    test_csv: Path | None  # None when the folder has no test.csv (it is optional)
    images_dir: Path


@dataclass
class _Findings:
    """The problem and note messages of one step, in the order the report lists them.

    Each step's messages follow those of the steps before it, so concatenating the steps'
    findings in order gives the report's lists.
    """

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # usable, but something a user must know
    notes: list[str] = field(default_factory=list)


@dataclass
class _RowCheck:
    """What the CSV rows alone tell (no image is opened for these)."""

    labels: dict[str, Any]
    empty_labels: list[dict[str, Any]]
    duplicates: list[dict[str, Any]]
    captions: dict[str, dict[str, Any] | None]


@dataclass
class _Presence:
    """Which referenced images have a file, from one listing of the image folder."""

    on_disk: set[str]
    referenced: set[str]
    missing_train: list[dict[str, Any]]
    test_without_image: list[dict[str, Any]]
    present: list[str]  # distinct ImageIDs that have a file, in file order, train first
    unreferenced: list[str]  # files no row names, in natural order


@dataclass
class _Decoding:
    """The outcome of fully decoding the present images (or the first ``limit`` of them)."""

    decoded: int
    workers: int
    seconds: float
    errors: dict[str, str]  # ImageID -> the decoder's error
    warned: list[dict[str, str]]  # in natural order of ImageID
    sizes: Counter[tuple[int, int]]
    modes: Counter[str]


def check_data(
    data_dir: str | os.PathLike[str] | Source,
    *,
    workers: int | None = None,
    progress: bool = True,
    images_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    strict_test: bool = False,
) -> dict[str, Any]:
    """Check a Kaggle-layout data folder (`data_dir`: train.csv, optionally test.csv, and
    data/, or the image folder `images_dir`), or a table (a table file, or a `Source` with
    other column names); a JSON-serialisable report.

    `workers`: processes decoding images (default os.cpu_count(); 1: this process). `progress`:
    a tqdm bar on stderr. `limit`: decode only the first `limit` referenced images that exist
    (train rows first, in file order); missing and unreferenced files are still found for every
    row (a directory listing), and the report notes that an image past the limit may be
    corrupt. `strict_test`: test rows without an image are a problem (off: the published
    development folder has images for only part of test.csv).

    `report["ok"]` is True when `report["problems"]` is empty. Lists of offending rows are
    {"count", "items", "truncated"} with at most MAX_LISTED items, each naming the CSV file,
    the 1-based line where the row starts and the ImageID (and the decoder's error for an
    unreadable image). Raises DataLayoutError (no data_dir, train.csv or image folder),
    CSVFormatError (an unreadable CSV), ValueError (`workers` < 1, a negative `limit`)."""
    started = time.perf_counter()
    workers = _validated_workers(workers)
    _validate_limit(limit)
    layout = _locate(data_dir, images_dir)

    train, test, labelled = _read_rows(layout)

    rows = _check_rows(train, test, labelled, has_test=layout.test_csv is not None)
    presence = _find_images(labelled, layout.images_dir)
    decoding = _decode_present(presence.present, layout.images_dir, workers, limit, progress)
    unreadable = _unreadable_rows(labelled, decoding.errors)

    findings = [
        _layout_findings(layout, train),
        _row_findings(rows),
        _presence_findings(presence, layout.images_dir, strict_test, layout.train.kaggle),
        _decode_findings(decoding, unreadable, limit, len(presence.present)),
    ]
    problems = [p for f in findings for p in f.problems]
    return {
        "ok": not problems,
        "problems": problems,
        "warnings": [w for f in findings for w in f.warnings],
        "notes": [n for f in findings for n in f.notes],
        "strict_test": strict_test,
        "paths": _paths_section(layout),
        "rows": {"train": len(train), "test": len(test) if layout.test_csv is not None else None},
        "labels": rows.labels,
        "rows_with_empty_labels": _listing(rows.empty_labels),
        "duplicate_image_ids": _listing(rows.duplicates),
        "captions": rows.captions,
        "images": _images_section(presence, decoding, unreadable, limit),
        "seconds": round(time.perf_counter() - started, 3),
    }


# -- arguments and layout --------------------------------------------------------------------


def _read_rows(layout: _Layout) -> tuple[list[Record], list[Record], list[tuple[str, Record]]]:
    """The labelled rows, test.csv's, and (csv name, row) for every row, train first: the
    order in which rows are reported."""
    train = layout.train.read(need_labels=True)
    test = read_csv(layout.test_csv) if layout.test_csv is not None else []
    return train, test, [(TRAIN, r) for r in train] + [("test.csv", r) for r in test]


def _validated_workers(workers: int | None) -> int:
    """The number of decoding processes: all cores unless told otherwise."""
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    return workers


def _validate_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be at least 0, got {limit}")


def _locate(data_dir: str | os.PathLike[str] | Source,
            images_dir: str | os.PathLike[str] | None) -> _Layout:
    """Find the folder's parts, failing early (before any reading) if a required one is absent."""
    if isinstance(data_dir, Source) or Path(data_dir).is_file():
        src = data_dir if isinstance(data_dir, Source) else open_data(data_dir, images_dir)
        if not src.images.is_dir():
            raise DataLayoutError(f"image folder not found: {src.images}; give the folder the "
                                  f"table's image paths are relative to with --images")
        return _Layout(src.rows.parent, src, None, src.images)
    root = Path(data_dir)
    if not root.is_dir():
        raise DataLayoutError(f"data folder not found (or not a folder): {root}; {EXPECTED_LAYOUT}")
    train_csv = root / "train.csv"
    if not train_csv.is_file():
        raise DataLayoutError(f"train.csv not found: {train_csv}; {EXPECTED_LAYOUT}")
    test_csv = root / "test.csv"
    has_test = test_csv.is_file()
    img_dir = Path(images_dir) if images_dir is not None else root / "data"
    if not img_dir.is_dir():
        raise DataLayoutError(f"image folder not found: {img_dir}; {EXPECTED_LAYOUT}")
    return _Layout(root, Source(train_csv, img_dir, None, str(train_csv)),
                   test_csv if has_test else None, img_dir)


def _layout_findings(layout: _Layout, train: Sequence[Record]) -> _Findings:
    found = _Findings()
    if not train:
        found.problems.append("train.csv has no rows")
    if layout.test_csv is None and layout.train.kaggle:
        found.notes.append(f"no test.csv in {layout.root} (optional)")
    return found


def _paths_section(layout: _Layout) -> dict[str, str | None]:
    return {
        "data_dir": str(layout.root),
        "train_csv": layout.train.shown,
        "test_csv": str(layout.test_csv) if layout.test_csv is not None else None,
        "images_dir": str(layout.images_dir),
    }


# -- rows: labels, identifiers, captions -----------------------------------------------------


def _check_rows(
    train: Sequence[Record],
    test: Sequence[Record],
    labelled: Sequence[tuple[str, Record]],
    has_test: bool,
) -> _RowCheck:
    return _RowCheck(
        labels=_label_stats(train),
        empty_labels=[_row_ref("train.csv", r) for r in train if not r.labels],
        duplicates=_duplicate_ids(labelled),
        captions={
            "train": _caption_stats(train),
            "test": _caption_stats(test) if has_test else None,
        },
    )


def _duplicate_ids(labelled: Sequence[tuple[str, Record]]) -> list[dict[str, Any]]:
    """ImageIDs named by more than one row, with every row that names them.

    csv_io already rejects a repeat within one file; a repeat across train and test is only
    visible here.
    """
    rows_by_id: dict[str, list[tuple[str, Record]]] = defaultdict(list)
    for name, r in labelled:
        rows_by_id[r.image_id].append((name, r))
    return [
        {
            "image_id": image_id,
            "rows": [{"csv": name, "line": r.line} for name, r in refs],
        }
        for image_id, refs in rows_by_id.items()
        if len(refs) > 1
    ]


def _row_findings(rows: _RowCheck) -> _Findings:
    found = _Findings()
    if rows.empty_labels:
        found.problems.append(f"{len(rows.empty_labels):,} train row(s) with no labels")
    if rows.duplicates:
        found.problems.append(f"{len(rows.duplicates):,} ImageID(s) used by more than one row")
    unexpected = rows.labels["unexpected"]
    if unexpected:
        found.notes.append(f"{len(unexpected)} label(s) on fewer than {RARE_LABEL_ROWS} rows "
                           f"(see the label table): "
                           + ", ".join(str(u["label"]) for u in unexpected))
    repeated = rows.labels["rows_with_repeated_labels"]["count"]
    if repeated:
        found.notes.append(f"{repeated} train row(s) repeat a label (counted once per image)")
    for split, stats in rows.captions.items():
        if stats and stats["empty"]:
            found.notes.append(f"{stats['empty']} {split} row(s) with an empty caption")
    return found


# -- images: presence ------------------------------------------------------------------------


def _find_images(labelled: Sequence[tuple[str, Record]], img_dir: Path) -> _Presence:
    """Sort every row into has-a-file or not, and list the files that no row names."""
    # One directory listing answers every existence question, far faster than a stat per row
    # (a table's paths may name subfolders: then the whole tree is listed).
    if any("/" in r.image_id for _, r in labelled):
        on_disk = {p.relative_to(img_dir).as_posix() for p in img_dir.rglob("*") if p.is_file()}
    else:
        with os.scandir(img_dir) as entries:
            on_disk = {e.name for e in entries if e.is_file()}

    missing_train = []
    test_without_image = []
    present: list[str] = []
    queued = set()
    for name, r in labelled:
        if r.image_id not in on_disk:
            (missing_train if name == TRAIN else test_without_image).append(_row_ref(name, r))
        elif r.image_id not in queued:  # an image shared by two rows is decoded once
            queued.add(r.image_id)
            present.append(r.image_id)
    referenced = {r.image_id for _, r in labelled}
    return _Presence(
        on_disk=on_disk,
        referenced=referenced,
        missing_train=missing_train,
        test_without_image=test_without_image,
        present=present,
        unreferenced=sorted(on_disk - referenced, key=_natural_key),
    )


def _presence_findings(presence: _Presence, img_dir: Path, strict_test: bool,
                       kaggle: bool) -> _Findings:
    found = _Findings()
    if presence.missing_train:
        found.problems.append(f"{len(presence.missing_train):,} train row(s) whose image is missing")
    if presence.test_without_image:
        message = (f"{len(presence.test_without_image):,} test row(s) without a photo in "
                   f"{img_dir}: mmtag predict refuses them, unless --caption-only-missing "
                   f"(then they are predicted from the caption alone, and listed)")
        # the published folder has images for only part of test.csv: a warning unless asked
        (found.problems if strict_test else found.warnings).append(message)
    if presence.unreferenced and kaggle:  # a table's folder may hold other files
        found.notes.append(
            f"{len(presence.unreferenced):,} file(s) in {img_dir} not referenced by any CSV row"
        )
    return found


# -- images: full decode ---------------------------------------------------------------------


def _decode_present(
    present: Sequence[str], img_dir: Path, workers: int, limit: int | None, progress: bool
) -> _Decoding:
    """Decode the present images (the first ``limit`` of them) and tally what came out."""
    to_decode = present[:limit] if limit is not None else present
    # no more processes than images: starting idle workers costs more than a small check
    workers_used = max(1, min(workers, len(to_decode)))
    decode_started = time.perf_counter()
    results = _decode_all([(i, str(img_dir / i)) for i in to_decode], workers_used, progress)
    decode_seconds = time.perf_counter() - decode_started

    errors: dict[str, str] = {}
    warned: list[dict[str, str]] = []
    sizes: Counter[tuple[int, int]] = Counter()
    modes: Counter[str] = Counter()
    for image_id, error, width, height, mode, warning in results:
        if error is not None:
            errors[image_id] = error
            continue
        sizes[(width, height)] += 1
        modes[mode] += 1
        if warning is not None:
            warned.append({"image_id": image_id, "warning": warning})
    # Results arrive in completion order; sort so the list reads like the folder.
    warned.sort(key=lambda w: _natural_key(w["image_id"]))
    return _Decoding(len(results), workers_used, decode_seconds, errors, warned, sizes, modes)


def _unreadable_rows(
    labelled: Sequence[tuple[str, Record]], errors: dict[str, str]
) -> list[dict[str, Any]]:
    """One entry per row that uses an undecodable image, in file order, so each can be fixed."""
    return [
        _row_ref(name, r, error=errors[r.image_id]) for name, r in labelled if r.image_id in errors
    ]


def _decode_findings(
    decoding: _Decoding, unreadable: list[dict[str, Any]], limit: int | None, n_present: int
) -> _Findings:
    found = _Findings()
    if limit is not None and limit < n_present:
        # an image past the limit may still be corrupt: say so rather than imply a full check
        found.notes.append(
            f"image decoding limited to the first {limit:,} of {n_present:,} present images; "
            "the rest were not checked"
        )
    if unreadable:
        found.problems.append(
            f"{len(decoding.errors):,} image(s) that cannot be decoded, "
            f"used by {len(unreadable):,} row(s)"
        )
    if decoding.warned:
        found.notes.append(f"{len(decoding.warned):,} image(s) decoded with a warning")
    non_rgb = {m: c for m, c in decoding.modes.items() if m != "RGB"}
    if non_rgb:
        found.notes.append(
            "image modes other than RGB (converted on load): "
            + ", ".join(f"{m} x{c}" for m, c in sorted(non_rgb.items()))
        )
    return found


def _size_stats(sizes: Counter[tuple[int, int]]) -> dict[str, Any]:
    """Width and height ranges and the five commonest sizes; empty if nothing was decoded."""
    if not sizes:
        return {}
    widths = [w for w, _ in sizes]
    heights = [h for _, h in sizes]
    return {
        "min_width": min(widths),
        "max_width": max(widths),
        "min_height": min(heights),
        "max_height": max(heights),
        "most_common": [{"size": f"{w}x{h}", "images": c} for (w, h), c in sizes.most_common(5)],
    }


def _images_section(
    presence: _Presence,
    decoding: _Decoding,
    unreadable: list[dict[str, Any]],
    limit: int | None,
) -> dict[str, Any]:
    seconds = decoding.seconds
    return {
        "on_disk": len(presence.on_disk),
        "referenced": len(presence.referenced),
        "decoded": decoding.decoded,
        "limit": limit,
        "limited": limit is not None and decoding.decoded < len(presence.present),
        "workers": decoding.workers,
        "decode_seconds": round(seconds, 3),
        "images_per_second": round(decoding.decoded / seconds, 1) if seconds > 0 else None,
        "missing_train": _listing(presence.missing_train),
        "unreadable": _listing(unreadable),
        "test_without_image": _listing(presence.test_without_image, cap=_FIRST_FEW),
        "unreferenced": {
            "count": len(presence.unreferenced),
            "first": presence.unreferenced[:_FIRST_FEW],
        },
        "decoded_with_warning": _listing(decoding.warned),
        "size": _size_stats(decoding.sizes),
        "modes": dict(sorted(decoding.modes.items())),
    }


# --------------------------------------------------------------------------------------------
# Text rendering
# --------------------------------------------------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    """Render a :func:`check_data` report as plain text for a terminal."""
    out = _text_paths(report["paths"], report["rows"])
    out += _text_labels(report["labels"])
    out += _text_captions(report["captions"])
    out += _text_images(report["images"])
    out += _text_row_problems(report["rows_with_empty_labels"], report["duplicate_image_ids"])
    out += _text_verdict(report)
    return "\n".join(out)


def _fmt_num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))
    return f"{value:,}" if isinstance(value, int) else str(value)


def _fmt_rows(listing: dict[str, Any], render, indent: str = "    ") -> list[str]:
    """The first few entries of a ``_listing`` plus how many were not shown."""
    lines = [indent + render(item) for item in listing["items"][:_TEXT_LISTED]]
    hidden = listing["count"] - min(len(listing["items"]), _TEXT_LISTED)
    if hidden > 0:
        lines.append(f"{indent}... and {hidden:,} more")
    return lines


def _fmt_ref(item: dict[str, Any]) -> str:
    text = f"{item['csv']} line {item['line']}: {item['image_id']}"
    return f"{text} ({item['error']})" if "error" in item else text


def _fmt_warning(item: dict[str, str]) -> str:
    return f"{item['image_id']}: {item['warning']}"


def _fmt_duplicate(item: dict[str, Any]) -> str:
    return item["image_id"] + ": " + ", ".join(f"{r['csv']} line {r['line']}" for r in item["rows"])


def _text_paths(paths: dict[str, Any], rows: dict[str, Any]) -> list[str]:
    if paths["test_csv"] is None:
        test = "  test.csv  : (absent)"
    else:
        test = f"  test.csv  : {paths['test_csv']} ({_fmt_num(rows['test'])} rows)"
    return [
        f"Data folder: {paths['data_dir']}",
        f"  train.csv : {paths['train_csv']} ({_fmt_num(rows['train'])} rows)",
        test,
        f"  images    : {paths['images_dir']}",
    ]


def _text_labels(labels: dict[str, Any]) -> list[str]:
    """The label set, a frequency table, the rare labels and the labels-per-image spread."""
    out = [
        "",
        f"Labels: {labels['count']} distinct, {_fmt_num(labels['occurrences'])} occurrences; "
        f"set = {' '.join(str(x) for x in labels['set'])}",
        f"  {'label':>5} {'images':>8} {'% images':>9} {'% occurrences':>14}",
    ]
    for f in labels["frequency"]:
        out.append(
            f"  {f['label']:>5} {f['images']:>8,} {f['pct_images']:>8.2f}% "
            f"{f['pct_occurrences']:>13.2f}%"
        )
    for u in labels["unexpected"]:
        where = ", ".join(f"line {ref['line']} ({ref['image_id']})" for ref in u["rows"][:3])
        out.append(f"  unexpected label {u['label']}: only {u['images']} row(s) carry it ({where}): "
                   f"a typo, or too rare to learn; check those rows")
    per = labels["per_image"]
    hist = ", ".join(f"{k}: {_fmt_num(v)}" for k, v in per["histogram"].items())
    out.append(
        f"  labels per image: mean {_fmt_num(per['mean'])}, min {_fmt_num(per['min'])}, "
        f"max {_fmt_num(per['max'])}; histogram {{{hist}}}"
    )
    return out


def _text_captions(captions: dict[str, dict[str, Any] | None]) -> list[str]:
    out = [
        "",
        "Caption length (words):",
        f"  {'split':<6}{'rows':>8}{'min':>6}{'mean':>8}{'median':>8}"
        f"{'p90':>7}{'p95':>7}{'p99':>7}{'max':>6}",
    ]
    for split, s in captions.items():
        if not s or not s["rows"]:  # no test.csv, or a file without rows
            continue
        out.append(
            f"  {split:<6}{s['rows']:>8,}{s['min']:>6}{s['mean']:>8.2f}{_fmt_num(s['median']):>8}"
            f"{_fmt_num(s['p90']):>7}{_fmt_num(s['p95']):>7}{_fmt_num(s['p99']):>7}{s['max']:>6}"
        )
    return out


def _text_images(img: dict[str, Any]) -> list[str]:
    """Counts and speed, sizes and modes, then each kind of image trouble that was found."""
    rate = f"{img['images_per_second']:,.0f}" if img["images_per_second"] else "-"
    out = [
        "",
        f"Images: {_fmt_num(img['on_disk'])} files on disk, {_fmt_num(img['referenced'])} "
        f"referenced, {_fmt_num(img['decoded'])} fully decoded in {img['decode_seconds']:.1f} s "
        f"({rate} images/s, {img['workers']} worker(s))"
        + (f" [limited to {img['limit']}]" if img["limited"] else ""),
    ]
    size = img["size"]
    if size:
        common = ", ".join(f"{c['size']} x{c['images']:,}" for c in size["most_common"])
        out.append(
            f"  width {size['min_width']}..{size['max_width']}, "
            f"height {size['min_height']}..{size['max_height']}; most common: {common}"
        )
    if img["modes"]:
        out.append("  modes: " + ", ".join(f"{m} x{c:,}" for m, c in img["modes"].items()))
    return out + _text_image_troubles(img)


def _text_image_troubles(img: dict[str, Any]) -> list[str]:
    out = []
    if img["missing_train"]["count"]:
        out.append(f"  missing train images: {img['missing_train']['count']:,}")
        out.extend(_fmt_rows(img["missing_train"], _fmt_ref))
    if img["unreadable"]["count"]:
        out.append(f"  unreadable images (rows): {img['unreadable']['count']:,}")
        out.extend(_fmt_rows(img["unreadable"], _fmt_ref))
    # The two informative lists are long on the real data: one line each, first few names only.
    twi = img["test_without_image"]
    if twi["count"]:
        first = ", ".join(f"{i['image_id']} (line {i['line']})" for i in twi["items"][:5])
        out.append(f"  test rows without an image: {twi['count']:,} (first: {first})")
    unref = img["unreferenced"]
    if unref["count"]:
        out.append(
            f"  files not referenced by any row: {unref['count']:,} "
            f"(first: {', '.join(unref['first'][:5])})"
        )
    if img["decoded_with_warning"]["count"]:
        out.append(f"  decoded with a warning: {img['decoded_with_warning']['count']:,}")
        out.extend(_fmt_rows(img["decoded_with_warning"], _fmt_warning))
    return out


def _text_row_problems(empty_labels: dict[str, Any], duplicates: dict[str, Any]) -> list[str]:
    out = []
    if empty_labels["count"]:
        out += ["", f"train rows with no labels: {empty_labels['count']:,}"]
        out.extend(_fmt_rows(empty_labels, _fmt_ref))
    if duplicates["count"]:
        out += ["", f"ImageIDs used by more than one row: {duplicates['count']:,}"]
        out.extend(_fmt_rows(duplicates, _fmt_duplicate))
    return out


def _text_verdict(report: dict[str, Any]) -> list[str]:
    out = [""]
    if report["notes"]:
        out.append("Notes:")
        out.extend(f"  - {n}" for n in report["notes"])
    if report["warnings"]:
        out.append("WARNINGS:")
        out.extend(f"  - {w}" for w in report["warnings"])
    if report["problems"]:
        out.append("PROBLEMS:")
        out.extend(f"  - {p}" for p in report["problems"])
    verdict = ("FAILED" if not report["ok"] else
               f"usable for training, with {len(report['warnings'])} warning(s)"
               if report["warnings"] else "OK, no problem found")
    out.append(f"Result: {verdict} ({report['seconds']:.1f} s)")
    return out
