"""Decision thresholds chosen on validation probabilities, and applying them.

A label is predicted when its probability is >= its threshold. With `at_least_one`, an image
where no label reaches its threshold gets its single most probable label (plain argmax of the
probabilities, not of probability / threshold: with calibrated probabilities the most probable
label is the one most likely to be right, which is what the image's F1 rewards).

`choose_thresholds` maximises micro F1 or samples F1 (the conventions of
`mmtag.training.metrics`) over a grid of candidate thresholds:

- mode 'global': one threshold for every class.
- mode 'per_class': coordinate ascent started from the best global threshold; each tuned
  class's threshold in turn is moved to the grid value that maximises the *overall* metric
  with the others held fixed, until a full pass changes nothing. Classes with fewer than
  `min_support` validation positives keep the global threshold: a threshold fitted to a
  handful of positives mostly fits noise.

Ties (a plateau of equally good grid values) resolve to the middle of the first plateau, so
the threshold sits away from the scores that bound it; a per-class threshold only moves for a
strict improvement.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmtag.training.metrics import as_binary

MODES = ("global", "per_class")
METRICS = ("micro_f1", "samples_f1")
_MAX_PASSES = 20
_TIE_TOL = 1e-12


def default_grid() -> np.ndarray:
    """Candidate thresholds 0.05, 0.06, ..., 0.95."""
    return np.round(np.arange(5, 96) / 100.0, 2)


def _check_probs(probs) -> np.ndarray:
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"probs must be 2-D (images, labels), got shape {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any() or (arr > 1).any():
        raise ValueError(
            "probs must be finite probabilities in [0, 1]; apply a sigmoid to the logits first"
        )
    return arr


def apply_thresholds(probs, thresholds, at_least_one: bool = False) -> np.ndarray:
    """0/1 int array (N, C): 1 where `probs` >= `thresholds` (a scalar or one per class).

    With `at_least_one`, rows left empty get a 1 at their highest probability.
    """
    p = _check_probs(probs)
    thr = np.asarray(thresholds, dtype=np.float64)
    if thr.ndim == 0:
        thr = np.full(p.shape[1], float(thr))
    if thr.shape != (p.shape[1],):
        raise ValueError(f"expected a scalar or {p.shape[1]} thresholds, got shape {thr.shape}")
    return _predict(p, thr, at_least_one).astype(np.int64)


def _predict(p: np.ndarray, thr, at_least_one: bool) -> np.ndarray:
    """Bool predictions (N, C) of checked probabilities `p` at `thr` (scalar or (C,))."""
    pred = p >= thr
    if at_least_one and p.shape[1] > 0:
        empty = np.flatnonzero(~pred.any(axis=1))
        pred[empty, p[empty].argmax(axis=1)] = True
    return pred


def _score(tp: np.ndarray, n_pred: np.ndarray, n_true: np.ndarray, metric: str) -> np.ndarray:
    """The metric from per-image counts; axis 0 is images, any trailing axes are candidates."""
    if metric == "micro_f1":
        den = (n_pred + n_true).sum(axis=0)
        return np.divide(2.0 * tp.sum(axis=0), den, out=np.zeros(den.shape), where=den > 0)
    den = n_pred + n_true
    per_image = np.divide(2.0 * tp, den, out=np.ones(den.shape), where=den > 0)
    return per_image.mean(axis=0)


def _best_index(scores: np.ndarray) -> int:
    """Index of the middle of the first plateau of maximal scores."""
    best = scores >= scores.max() - _TIE_TOL
    first = int(np.argmax(best))
    run = first
    while run + 1 < len(best) and best[run + 1]:
        run += 1
    return (first + run) // 2


def _check_grid(grid) -> np.ndarray:
    g = default_grid() if grid is None else np.unique(np.asarray(grid, dtype=np.float64).ravel())
    if g.size == 0 or not np.isfinite(g).all() or g[0] < 0 or g[-1] > 1:
        raise ValueError("grid must be a non-empty sequence of thresholds in [0, 1]")
    return g


def choose_thresholds(
    y_true,
    probs,
    *,
    mode: str = "global",
    metric: str = "micro_f1",
    at_least_one: bool = False,
    min_support: int = 20,
    grid: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Thresholds (C,) that maximise `metric` of `apply_thresholds(probs, ., at_least_one)`.

    Args:
        y_true: 0/1 array (N, C) of validation labels.
        probs: probabilities (N, C) for the same images.
        mode: 'global' (one value repeated C times) or 'per_class'.
        metric: 'micro_f1' or 'samples_f1'.
        at_least_one: search with the same rule `apply_thresholds` will use at prediction time.
        min_support: in 'per_class' mode, classes with fewer validation positives keep the
            global threshold.
        grid: candidate thresholds (sorted and de-duplicated); default `default_grid()`.
            Every returned threshold is a grid value.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {list(MODES)}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {list(METRICS)}")
    y = as_binary("y_true", y_true)
    p = _check_probs(probs)
    if y.shape != p.shape:
        raise ValueError(f"y_true shape {y.shape} does not match probs shape {p.shape}")
    if y.shape[0] == 0:
        raise ValueError("no validation images to choose thresholds on")
    g = _check_grid(grid)
    n_true = y.sum(axis=1)  # (N,)

    global_scores = np.empty(len(g))
    for k, t in enumerate(g):
        pred = _predict(p, t, at_least_one)
        global_scores[k] = _score((pred & y).sum(axis=1), pred.sum(axis=1), n_true, metric)
    idx = np.full(y.shape[1], _best_index(global_scores))
    if mode == "global":
        return g[idx]

    pred = p >= g[idx]  # (N, C), thresholds only; the at_least_one fill is recomputed below
    n_pred = pred.sum(axis=1)  # (N,)
    n_hit = (pred & y).sum(axis=1)
    top_is_true = y[np.arange(len(y)), p.argmax(axis=1)]  # (N,) the fill label is right
    tuned = np.flatnonzero(y.sum(axis=0) >= min_support)
    for _ in range(_MAX_PASSES):
        changed = False
        for c in tuned:
            cand = p[:, c, None] >= g[None, :]  # (N, G) class c predicted at each candidate
            pred_other = n_pred - pred[:, c]
            hit_other = n_hit - (pred[:, c] & y[:, c])
            cand_pred = pred_other[:, None] + cand
            cand_hit = hit_other[:, None] + (cand & y[:, c, None])
            if at_least_one:
                empty = (pred_other[:, None] == 0) & ~cand
                cand_pred = cand_pred + empty
                cand_hit = cand_hit + (empty & top_is_true[:, None])
            scores = _score(cand_hit, cand_pred, n_true[:, None], metric)  # (G,)
            k = _best_index(scores)
            if scores[k] > scores[idx[c]] + _TIE_TOL:
                idx[c] = k
                pred[:, c] = cand[:, k]
                n_pred = pred_other + pred[:, c]
                n_hit = hit_other + (pred[:, c] & y[:, c])
                changed = True
        if not changed:
            break
    return g[idx]
