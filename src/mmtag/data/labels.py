"""The label set: learned from the training rows, kept in natural order, saved with every run.

A label is its text: `person`, `running shoes`, or `3` (the COMP5329 files' integer ids are one
case of it). A `LabelMap` turns a row's labels into a multi-hot vector and back; position i is
output unit i of the model. The order is natural: numeric when every label is an integer (so a
run trained when labels were integers keeps its unit order), else alphabetical. A label may also
have a display name (`1 person`, from a names file): outputs show the name, files for Kaggle
keep the id. It is plain data (`to_dict` / `from_dict`) so it can live inside a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The names file a data folder may hold next to its rows ('id name' lines).
NAMES_FILE = "labels.txt"


class UnknownLabelError(ValueError):
    """A labelled row carries a label that the training rows never had."""

    def __init__(self, label: str, where: str, message: str):
        super().__init__(message)
        self.label, self.where = label, where


def is_integer_label(label: str) -> bool:
    return label.isascii() and label.isdigit()


def natural_order(labels: Iterable[object]) -> tuple[str, ...]:
    """The distinct labels as text, numeric order when all are integers, else by text."""
    texts = {str(lab) for lab in labels}
    if all(is_integer_label(t) for t in texts):
        return tuple(sorted(texts, key=int))
    return tuple(sorted(texts))


@dataclass(frozen=True)
class LabelMap:
    """Labels in natural order (position i is output unit i), and optional display names."""

    labels: tuple[str, ...]
    names: tuple[str, ...] | None = None  # one per label; None: a label's name is itself

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(str(lab) for lab in self.labels))
        if not self.labels:
            raise ValueError("a label map needs at least one label; the training rows had none")
        if self.labels != natural_order(self.labels) or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be unique and in natural order, got {self.labels}")
        if self.names is not None and len(self.names) != len(self.labels):
            raise ValueError(f"got {len(self.names)} names for {len(self.labels)} labels")
        # Frozen dataclass: cache the reverse lookup without making it a field.
        object.__setattr__(self, "_positions", {lab: i for i, lab in enumerate(self.labels)})

    @classmethod
    def from_records(cls, records: Iterable, names: dict[str, str] | None = None) -> LabelMap:
        """Every label that appears in `records` (objects with `.labels`), named by `names`
        ({label: name}, e.g. a labels.txt) where it has one."""
        seen: set[str] = set()
        for rec in records:
            seen.update(str(lab) for lab in rec.labels)
        return cls(natural_order(seen)).with_names(names)

    def with_names(self, names: dict[str, str] | None) -> LabelMap:
        if not names:
            return LabelMap(self.labels)
        return LabelMap(self.labels, tuple(names.get(lab, lab) for lab in self.labels))

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def display(self) -> tuple[str, ...]:
        """What outputs show for each unit: its name, or the label itself."""
        return self.names or self.labels

    @property
    def integer(self) -> bool:
        """Every label an integer id: the Kaggle submission format can hold them."""
        return all(is_integer_label(lab) for lab in self.labels)

    def index(self, label: object, where: str = "") -> int:
        """Output unit of `label`; `where` names the sample for the error message."""
        try:
            return self._positions[str(label)]
        except KeyError:
            at = f" ({where})" if where else ""
            raise UnknownLabelError(str(label), where,
                f"label {label}{at} was never seen in the training rows; known labels are "
                f"{list(self.labels)}. Retrain with rows that include it, or remove it from the file."
            ) from None

    def encode(self, labels: Sequence[object], where: str = "") -> np.ndarray:
        """Multi-hot float32 vector of length `num_classes`."""
        vec = np.zeros(self.num_classes, dtype=np.float32)
        for lab in labels:
            vec[self.index(lab, where)] = 1.0
        return vec

    def decode(self, multi_hot: Sequence[float] | np.ndarray) -> tuple[str, ...]:
        """The labels (in unit order) of the non-zero entries of a 0/1 vector."""
        arr = np.asarray(multi_hot)
        if arr.shape != (self.num_classes,):
            raise ValueError(f"expected a vector of {self.num_classes} entries, got shape {arr.shape}")
        return tuple(self.labels[i] for i in np.flatnonzero(arr > 0.5))

    def to_dict(self) -> dict:
        return {"labels": list(self.labels), **({"names": list(self.names)} if self.names else {})}

    @classmethod
    def from_dict(cls, d: dict) -> LabelMap:
        """Also a run saved when labels were integers ({"labels": [1, 3, ...]})."""
        labels = tuple(str(x) for x in d["labels"])
        names = tuple(d.get("names") or ()) or None
        return cls(labels, None if names == labels else names)


def read_label_names(path: Path) -> dict[str, str]:
    """{label: name} from a file of 'label name' lines (`1 person`; '#' starts a comment)."""
    names = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; a names file holds 'label name' lines") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise ValueError(f"{path} line {n}: expected 'label name' (e.g. '1 person'), got "
                             f"{line!r}")
        names[parts[0]] = parts[1].strip()
    return names
