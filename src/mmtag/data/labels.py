"""The label set: learned from the training rows, kept sorted, saved with every run.

A `LabelMap` turns a tuple of original label ids (e.g. COCO ids 1..19 without 12) into a multi-hot
vector and back. It is plain data (`to_dict` / `from_dict`) so it can live inside a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


class UnknownLabelError(ValueError):
    """A labelled row carries a label that the training rows never had."""

    def __init__(self, label: int, where: str, message: str):
        super().__init__(message)
        self.label, self.where = label, where


@dataclass(frozen=True)
class LabelMap:
    """Sorted original label ids; position i is output unit i of the model."""

    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.labels:
            raise ValueError("a label map needs at least one label; the training rows had none")
        if list(self.labels) != sorted(set(self.labels)):
            raise ValueError(f"labels must be sorted and unique, got {self.labels}")
        # Frozen dataclass: cache the reverse lookup without making it a field.
        object.__setattr__(self, "_positions", {lab: i for i, lab in enumerate(self.labels)})

    @classmethod
    def from_records(cls, records: Iterable) -> LabelMap:
        """The sorted set of every label that appears in `records` (objects with `.labels`)."""
        seen: set[int] = set()
        for rec in records:
            seen.update(rec.labels)
        return cls(tuple(sorted(seen)))

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def index(self, label: int, where: str = "") -> int:
        """Output unit of `label`; `where` names the sample for the error message."""
        try:
            return self._positions[label]
        except KeyError:
            at = f" ({where})" if where else ""
            raise UnknownLabelError(label, where,
                f"label {label}{at} was never seen in the training rows; known labels are "
                f"{list(self.labels)}. Retrain with rows that include it, or remove it from the file."
            ) from None

    def encode(self, labels: Sequence[int], where: str = "") -> np.ndarray:
        """Multi-hot float32 vector of length `num_classes`."""
        vec = np.zeros(self.num_classes, dtype=np.float32)
        for lab in labels:
            vec[self.index(lab, where)] = 1.0
        return vec

    def decode(self, multi_hot: Sequence[float] | np.ndarray) -> tuple[int, ...]:
        """Original label ids (ascending) of the non-zero entries of a 0/1 vector."""
        arr = np.asarray(multi_hot)
        if arr.shape != (self.num_classes,):
            raise ValueError(f"expected a vector of {self.num_classes} entries, got shape {arr.shape}")
        return tuple(self.labels[i] for i in np.flatnonzero(arr > 0.5))

    def to_dict(self) -> dict:
        return {"labels": list(self.labels)}

    @classmethod
    def from_dict(cls, d: dict) -> LabelMap:
        return cls(tuple(int(x) for x in d["labels"]))
