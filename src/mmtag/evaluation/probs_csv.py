"""Probability files: the one owner of their format.

    val_probs.csv   ImageID,Labels,<one column per label>   a run's (or an ensemble's) best
                                                            model on its validation rows
    --probs FILE    ImageID,<one column per label>          `mmtag predict`'s probabilities

Probabilities are written with 5 decimals. `average_probs` is the one place that averages
probabilities: over the image sizes of multi-scale TTA, over ensemble members, or both.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmtag.atomic import atomic_write
from mmtag.run_files import VAL_PROBS_FILE


def average_probs(parts: Iterable[np.ndarray]) -> np.ndarray:
    """The mean of equally shaped (N, C) probability arrays (sizes, views or members)."""
    parts = list(parts)
    if not parts:
        raise ValueError("no probabilities to average")
    total = 0.0
    for p in parts:  # each part divided first: one part comes back unchanged, in its dtype
        total = total + p / len(parts)
    return total


def join_labels(labels) -> str:
    """A row's labels in val_probs.csv's Labels field: integer ids space-separated (as ever),
    other labels (which may hold spaces) separated by '|'."""
    texts = [str(lab) for lab in labels]
    return (" " if all(t.isascii() and t.isdigit() for t in texts) else "|").join(texts)


def split_labels(field: str, columns: Sequence[str]) -> set[str]:
    """The labels of a Labels field that `join_labels` wrote, given the file's label columns."""
    if all(c.isascii() and c.isdigit() for c in columns):
        return set(field.replace("|", " ").split())
    return {t for t in field.split("|") if t}


def format_probs(image_ids: Sequence[str], label_names: Sequence[str], probs: np.ndarray,
                 true_labels: Sequence[str] | None = None, id_column: str = "ImageID") -> str:
    """The CSV text: the photo's column (`id_column`: a table's own image column for
    predict), then (with `true_labels`: each row's labels, as `join_labels` writes them, in a
    Labels column) one column per label."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([id_column, *(["Labels"] if true_labels is not None else []), *label_names])
    labels = true_labels if true_labels is not None else [None] * len(image_ids)
    for image_id, lab, p in zip(image_ids, labels, probs, strict=True):
        w.writerow([image_id, *([lab] if lab is not None else []), *[f"{x:.5f}" for x in p]])
    return buf.getvalue()


def write_val_probs(run_dir: Path, image_ids: Sequence[str], true_labels: Sequence[str],
                    label_names: Sequence[str], probs: np.ndarray) -> None:
    """RUN/val_probs.csv, atomically: threshold and error analysis, and ensembles, read it."""
    atomic_write(Path(run_dir) / VAL_PROBS_FILE, format_probs(image_ids, label_names, probs,
                                                         true_labels))


@dataclass
class ValProbs:
    """A val_probs.csv as read: rows in file order."""

    image_ids: list[str]
    true_labels: list[str]     # each row's Labels field as written
    label_names: list[str]     # the probability columns
    targets: np.ndarray        # (N, C) multi-hot
    probs: np.ndarray          # (N, C)


def read_val_probs(run_dir: Path) -> ValProbs:
    """RUN/val_probs.csv, checked: a missing or damaged file is an error naming it and saying
    how to write it again."""
    run_dir = Path(run_dir)
    path = run_dir / VAL_PROBS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: only a finished run (one that chose its "
                                f"thresholds) can join an ensemble")
    redo = (f"it is written when a run ends: rewrite it with mmtag train --resume {run_dir} "
            f"--data DIR")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path} is damaged ({e}); {redo}") from None
    if len(rows) < 2 or rows[0][:2] != ["ImageID", "Labels"] or len(rows[0]) < 3:
        raise ValueError(f"{path} is empty or damaged (it needs the header ImageID,Labels,<one "
                         f"column per label> and one row per validation image); {redo}")
    header, body = rows[0], rows[1:]
    labels = header[2:]
    p = np.zeros((len(body), len(labels)))
    for i, r in enumerate(body):
        try:
            if len(r) != len(header):
                raise ValueError(f"{len(r)} fields, the header has {len(header)}")
            p[i] = [float(x) for x in r[2:]]
            if not np.all((p[i] >= 0) & (p[i] <= 1)):
                raise ValueError("a probability outside [0, 1]")
        except ValueError as e:
            raise ValueError(f"{path}, line {i + 2}: {e}; the file is damaged; {redo}") from None
    y = np.array([[int(lab in split_labels(r[1], labels)) for lab in labels] for r in body])
    return ValProbs([r[0] for r in body], [r[1] for r in body], labels, y, p)
