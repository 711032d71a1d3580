"""Decision thresholds chosen on validation probabilities, and applying them.

A label is predicted when its probability is >= its threshold. With `at_least_one`, an image
where no label reaches its threshold gets its single most probable label (plain argmax of the
probabilities, not of probability / threshold: with calibrated probabilities the most probable
label is the one most likely to be right, which is what the image's F1 rewards).

`choose_thresholds` maximises micro F1 or samples F1 (the conventions of
`mmtag.evaluation.metrics`) over a grid of candidate thresholds:

- mode 'global': one threshold for every class.
- mode 'per_class': coordinate ascent started from the best global threshold; each tuned
  class's threshold in turn is moved to the grid value that maximises the *overall* metric
  with the others held fixed, until a full pass changes nothing. Classes with fewer than
  `min_support` validation positives keep the global threshold: a threshold fitted to a
  handful of positives mostly fits noise.

Ties (a plateau of equally good grid values) resolve to the middle of the first plateau, so
the threshold sits away from the scores that bound it; a per-class threshold only moves for a
strict improvement.

The other decision rule, `expected_f1_sets`, fits nothing: per image it predicts the label set
whose expected F1 is highest when each label is present with its predicted probability,
independently of the others. `decide` applies either rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmtag.evaluation.metrics import as_binary

MODES = ("global", "per_class")
DECISIONS = ("threshold", "expected_f1")
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


def check_threshold(value: float) -> float:
    """A user's global threshold: a probability strictly between 0 and 1 (at 0 or below every
    label is predicted for every image, at 1 or above none, and nan predicts nothing)."""
    t = float(value)
    if not (0.0 < t < 1.0):  # also False for nan
        raise ValueError(f"threshold {value!r} must be a number strictly between 0 and 1 (e.g. "
                         f"0.4): at 0 or below every label is set, at 1 or above none is")
    return t


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

    7 parameters on purpose: a public search function in scikit-learn's manner, the data
    positional and each search setting a keyword with its default.
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
    tuned = np.flatnonzero(y.sum(axis=0) >= min_support)
    return g[_coordinate_ascent(_Search(y, p, g, metric, at_least_one), idx, tuned)]


@dataclass(frozen=True)
class _Search:
    """What a threshold search scores: labels y and probabilities p (N, C), the grid g, the
    metric and the decision rule's at_least_one."""

    y: np.ndarray
    p: np.ndarray
    g: np.ndarray
    metric: str
    at_least_one: bool


def _coordinate_ascent(search: _Search, idx: np.ndarray, tuned: np.ndarray) -> np.ndarray:
    """Per-class grid indices, from the global choice `idx`: each class of `tuned` in turn
    moves to the grid value that scores best with the others held fixed, until a pass changes
    nothing (or _MAX_PASSES). Counts are updated incrementally: one (N, G) product per class."""
    y, p, g = search.y, search.p, search.g
    metric, at_least_one = search.metric, search.at_least_one
    n_true = y.sum(axis=1)  # (N,)
    pred = p >= g[idx]  # (N, C), thresholds only; the at_least_one fill is recomputed below
    n_pred = pred.sum(axis=1)  # (N,)
    n_hit = (pred & y).sum(axis=1)
    top_is_true = y[np.arange(len(y)), p.argmax(axis=1)]  # (N,) the fill label is right
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
    return idx


def _count_distributions(p: np.ndarray) -> np.ndarray:
    """(N, m + 1): P(exactly j of the m labels are present), labels independent with
    probabilities p (N, m) (the Poisson-binomial distribution, built one label at a time)."""
    n, m = p.shape
    dist = np.zeros((n, m + 1))
    dist[:, 0] = 1.0
    for j in range(m):
        q = p[:, j, None]  # (N, 1)
        dist[:, 1:j + 2] = dist[:, 1:j + 2] * (1.0 - q) + dist[:, :j + 1] * q
        dist[:, 0] *= 1.0 - q[:, 0]
    return dist


def expected_f1_sets(probs, at_least_one: bool = False) -> np.ndarray:
    """0/1 int array (N, C): per image, the labels whose set has the highest expected F1.

    Treating label c as present with probability p_c, independently, the best set of size k is
    the k most probable labels; its expected F1 is E[2 A / (k + A + B)] with A the number of
    present labels among those k and B the number among the others (both Poisson-binomial), and
    an empty set scores 1 exactly when no label is present. The size with the highest
    expectation wins (the smallest on ties). This is the decision that maximises the expected
    per-image F1 (samples F1) given calibrated probabilities; with `at_least_one` the empty set
    is never chosen.
    """
    p = _check_probs(probs)
    n, c = p.shape
    if c == 0:
        return np.zeros((n, 0), dtype=np.int64)
    order = np.argsort(-p, axis=1, kind="stable")
    ps = np.take_along_axis(p, order, axis=1)  # (N, C) descending
    best = np.full(n, -1.0)
    best_k = np.zeros(n, dtype=np.int64)
    for k in range(1 if at_least_one else 0, c + 1):
        inside = _count_distributions(ps[:, :k])  # (N, k + 1)
        outside = _count_distributions(ps[:, k:])  # (N, C - k + 1)
        a = np.arange(k + 1)[:, None]
        b = np.arange(c - k + 1)[None, :]
        den = k + a + b
        f1 = np.divide(2.0 * a, den, out=np.ones(den.shape), where=den > 0)  # (k+1, C-k+1)
        expected = np.einsum("na,ab,nb->n", inside, f1, outside)
        better = expected > best + _TIE_TOL
        best[better] = expected[better]
        best_k[better] = k
    pred = np.zeros((n, c), dtype=np.int64)
    chosen = np.arange(c)[None, :] < best_k[:, None]  # (N, C) in descending order
    np.put_along_axis(pred, order, chosen.astype(np.int64), axis=1)
    return pred


def decide(probs, thresholds, *, at_least_one: bool = False,
           rule: str = "threshold") -> np.ndarray:
    """0/1 decisions (N, C) by `rule`: 'threshold' (`apply_thresholds`) or 'expected_f1'
    (`expected_f1_sets`, which ignores `thresholds`)."""
    if rule == "threshold":
        return apply_thresholds(probs, thresholds, at_least_one)
    if rule == "expected_f1":
        return expected_f1_sets(probs, at_least_one)
    raise ValueError(f"unknown decision rule {rule!r}; choose from {list(DECISIONS)}")
