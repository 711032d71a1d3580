"""The run folder: the one place its files are named, and metrics.csv's format.

A run folder (`mmtag train --out RUN`) holds:

    config.yaml    the resolved recipe              split.json     which rows train, which validate
    labels.json    the label set                    vocab.json     the caption encoder's vocabulary
    metrics.csv    one row per finished epoch       best.pt        what predicts (its schema:
    last.pt        what resumes (weights, optimizer,                mmtag.prediction.checkpoint)
                   scheduler, random states)        summary.json   the final figures; written
    val_probs.csv  the validation rows'                             last, it says the run ended
                   probabilities                    curves.png     the learning curves
    .lock          held by the process training in the folder

An ensemble folder (`mmtag ensemble`) holds best.pt, the first member's config, label, vocabulary
and split files, val_probs.csv and summary.json.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from mmtag.atomic import atomic_write, is_temp_file

CONFIG_FILE = "config.yaml"
SPLIT_FILE = "split.json"
LABELS_FILE = "labels.json"
VOCAB_FILE = "vocab.json"
METRICS_FILE = "metrics.csv"
BEST_FILE = "best.pt"
LAST_FILE = "last.pt"
SUMMARY_FILE = "summary.json"
VAL_PROBS_FILE = "val_probs.csv"
CURVES_FILE = "curves.png"
LOCK_FILE = ".lock"
# What a run writes before its first checkpoint (last.pt) is complete (best.pt of epoch 1 is
# written just before last.pt); a folder holding only these is a run that stopped early.
PRE_CHECKPOINT_FILES = frozenset({CONFIG_FILE, SPLIT_FILE, LABELS_FILE, VOCAB_FILE,
                                  METRICS_FILE, BEST_FILE})
RUN_FILES = PRE_CHECKPOINT_FILES | {LOCK_FILE, LAST_FILE, SUMMARY_FILE, VAL_PROBS_FILE,
                                    CURVES_FILE}
# a folder holding any of these is a run folder (or an ensemble's)
RUN_MARKERS = (BEST_FILE, LAST_FILE, SPLIT_FILE)


class RunError(Exception):
    """A run folder or checkpoint is missing, in use, damaged, or not the kind asked for
    (`mmtag` exits 4 for it)."""


class RunInvalidError(RunError, ValueError):
    """The run is unfinished where a finished one is needed, or its files disagree."""


class RunNotFoundError(RunError, FileNotFoundError):
    """The run folder, or the checkpoint it should hold, does not exist."""


class RunFolderTakenError(FileExistsError):
    """--out holds another run's files (a usage mistake: choose another --out)."""


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_MARKERS)


def best_checkpoint(run: Path | str) -> Path:
    """The checkpoint a run predicts with: RUN/best.pt for a run folder, else the file given."""
    run = Path(run)
    return run / BEST_FILE if run.is_dir() else run


def read_metrics_rows(path: Path) -> list[dict]:
    """metrics.csv's rows (one per epoch) as dicts of strings; [] when it does not exist."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_metrics_rows(path: Path, rows: list[dict]) -> None:
    """metrics.csv rewritten whole, atomically: a crash never leaves half a row in it."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, buf.getvalue())


def append_metrics_row(path: Path, row: dict) -> None:
    """Add one epoch's row, its floats rounded to 6 decimals."""
    row = {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}
    write_metrics_rows(path, [*read_metrics_rows(path), row])


def truncate_metrics(path: Path, epoch: int) -> None:
    """Drop rows after `epoch` (written by an interrupted run after its last checkpoint)."""
    rows = read_metrics_rows(path)
    keep = [r for r in rows if int(r["epoch"]) <= epoch]
    if keep and len(keep) != len(rows):
        write_metrics_rows(path, keep)
    elif not keep and path.exists():
        path.unlink()


def is_run_file(p: Path) -> bool:
    """A file a run writes (or a temporary file of one being written)."""
    return p.is_file() and (p.name in RUN_FILES or is_temp_file(p))
