"""Multi-label metrics on 0/1 predictions (numpy only).

Conventions, chosen once here so every report agrees:

- Micro precision / recall / F1 count every (image, label) pair; a ratio with a zero
  denominator is 0 (sklearn's `zero_division=0`). Micro F1 = 2 TP / (2 TP + FP + FN).
- Per-class precision / recall / F1 use the same `zero_division=0` rule.
- Macro F1 is the mean per-class F1 over the classes that occur in `y_true` or in `y_pred`.
  A class absent from both (no positives in this split and never predicted) has no defined
  F1 and is left out rather than counted as 0, so a validation split that happens to miss a
  rare label does not drag the score down. `macro_f1_classes` says how many classes were
  averaged; with none, macro F1 is 0.
- Samples F1 is the F1 of each image's label set, averaged over images (the Kaggle
  "Mean F1-Score"); an image with no true and no predicted labels scores 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def as_binary(name: str, a) -> np.ndarray:
    """`a` as a bool array (N, C); refuses anything that is not 2-D and all 0/1."""
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (images, labels), got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(
            f"{name} must hold only 0/1, found {arr[i, j].item()!r} at row {i}, column {j}; "
            "turn probabilities into 0/1 first (mmtag.evaluation.thresholds.apply_thresholds)"
        )
    return arr.astype(bool)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, 0 where den == 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def _checked(y_true, y_pred, label_names: Sequence | None) -> tuple[np.ndarray, np.ndarray, list]:
    """(true, predicted) as boolean (N, C) arrays of one shape with N > 0, and the C names."""
    t = as_binary("y_true", y_true)
    p = as_binary("y_pred", y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true shape {t.shape} does not match y_pred shape {p.shape}")
    n, c = t.shape
    if n == 0:
        raise ValueError("no images to score (y_true has 0 rows)")
    names = list(range(c)) if label_names is None else list(label_names)
    if len(names) != c:
        raise ValueError(f"got {len(names)} label names for {c} label columns")
    return t, p, names


def multilabel_metrics(y_true, y_pred, label_names: Sequence | None = None) -> dict:
    """Micro / macro / samples scores and a per-class breakdown of 0/1 predictions.

    Args:
        y_true: 0/1 (or bool) array (N, C) of true labels.
        y_pred: 0/1 (or bool) array (N, C) of predicted labels.
        label_names: C names for the `per_class` rows; default the column indices 0..C-1.

    Returns a JSON-friendly dict: `precision`, `recall`, `micro_f1`, `macro_f1`,
    `macro_f1_classes` (int), `samples_f1`, and `per_class`, a list of C dicts
    `{label, support, precision, recall, f1, predicted}` (support / predicted: number of images
    truly / predicted carrying the label). See the module docstring for the conventions.
    """
    t, p, names = _checked(y_true, y_pred, label_names)
    c = t.shape[1]
    hit = t & p
    tp = hit.sum(axis=0)  # (C,)
    support = t.sum(axis=0)
    predicted = p.sum(axis=0)
    precision_c = _ratio(tp, predicted)
    recall_c = _ratio(tp, support)
    f1_c = _ratio(2 * tp, support + predicted)

    present = (support + predicted) > 0
    macro_f1 = float(f1_c[present].mean()) if present.any() else 0.0

    n_true = t.sum(axis=1)  # (N,)
    n_pred = p.sum(axis=1)
    den = n_true + n_pred
    f1_i = np.where(den > 0, _ratio(2 * hit.sum(axis=1), den), 1.0)

    tp_all, pred_all, true_all = int(tp.sum()), int(predicted.sum()), int(support.sum())
    per_class = [{"label": names[j], "support": int(support[j]),
                  "precision": float(precision_c[j]), "recall": float(recall_c[j]),
                  "f1": float(f1_c[j]), "predicted": int(predicted[j])} for j in range(c)]
    return {
        "precision": float(_ratio(tp_all, pred_all)),
        "recall": float(_ratio(tp_all, true_all)),
        "micro_f1": float(_ratio(2 * tp_all, true_all + pred_all)),
        "macro_f1": macro_f1,
        "macro_f1_classes": int(present.sum()),
        "samples_f1": float(f1_i.mean()),
        "per_class": per_class,
    }


def format_per_class_table(metrics: dict) -> str:
    """A fixed-width text table of `metrics["per_class"]` followed by the summary scores."""
    rows = metrics["per_class"]
    width = max([len("label")] + [len(str(r["label"])) for r in rows])
    header = f"{'label':<{width}}  {'support':>7}  {'predicted':>9}  {'precision':>9}  {'recall':>6}  {'f1':>6}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{str(r['label']):<{width}}  {r['support']:>7d}  {r['predicted']:>9d}  "
            f"{r['precision']:>9.3f}  {r['recall']:>6.3f}  {r['f1']:>6.3f}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"micro  precision {metrics['precision']:.3f}  recall {metrics['recall']:.3f}  "
        f"F1 {metrics['micro_f1']:.3f}"
    )
    n_macro = metrics.get("macro_f1_classes", len(rows))
    lines.append(
        f"macro F1 {metrics['macro_f1']:.3f} ({n_macro} of {len(rows)} classes)  "
        f"samples F1 {metrics['samples_f1']:.3f}"
    )
    return "\n".join(lines)
