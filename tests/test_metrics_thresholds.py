import time

import numpy as np
import pytest

from mmtag.evaluation.metrics import format_per_class_table, multilabel_metrics
from mmtag.evaluation.thresholds import (
    apply_thresholds,
    choose_thresholds,
    decide,
    default_grid,
    expected_f1_sets,
)

# 4 images x 4 labels. Label 3 is neither true nor predicted anywhere; image 3 has no labels.
Y_TRUE = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
Y_PRED = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


def test_metrics_on_a_hand_worked_example():
    m = multilabel_metrics(Y_TRUE, Y_PRED, label_names=["cat", "dog", "car", "boat"])
    # Pairs: TP = 3 (cat@0, dog@1, cat@2), predicted = 4, true = 5.
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["micro_f1"] == pytest.approx(6 / 9)
    # Per class F1: cat 2*2/(2+2) = 1, dog 2*1/(2+2) = 0.5, car 0 (missed); boat is absent
    # from truth and predictions, so it is left out of the mean (sklearn would count 0 -> 0.375).
    assert m["macro_f1"] == pytest.approx(0.5)
    assert m["macro_f1_classes"] == 3
    # Images: 2*1/(2+2) = 0.5, 1, 2*1/(2+1) = 2/3, empty vs empty = 1.
    assert m["samples_f1"] == pytest.approx((0.5 + 1 + 2 / 3 + 1) / 4)
    assert m["per_class"][1] == {
        "label": "dog", "support": 2, "precision": 0.5, "recall": 0.5, "f1": 0.5, "predicted": 2,
    }
    car, boat = m["per_class"][2], m["per_class"][3]
    assert (car["support"], car["predicted"], car["precision"], car["f1"]) == (1, 0, 0.0, 0.0)
    assert (boat["support"], boat["predicted"], boat["f1"]) == (0, 0, 0.0)
    table = format_per_class_table(m)
    assert "dog" in table and "0.500" in table and "3 of 4 classes" in table


def test_a_class_predicted_but_never_true_counts_as_zero_in_macro():
    y_true = np.array([[1, 0], [1, 0]])
    y_pred = np.array([[1, 1], [1, 0]])
    m = multilabel_metrics(y_true, y_pred)
    assert m["macro_f1"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert m["per_class"][1]["label"] == 1  # default names are column indices
    assert m["samples_f1"] == pytest.approx((2 / 3 + 1) / 2)


def test_metrics_refuse_bad_inputs():
    with pytest.raises(ValueError, match=r"only 0/1, found 0.7 at row 0, column 1"):
        multilabel_metrics(Y_TRUE, np.array([[0, 0.7, 0, 0]] * 4))
    with pytest.raises(ValueError, match="does not match"):
        multilabel_metrics(Y_TRUE, Y_PRED[:, :3])
    with pytest.raises(ValueError, match="3 label names for 4"):
        multilabel_metrics(Y_TRUE, Y_PRED, label_names=["a", "b", "c"])


def _separable(rng, n_pos, n_neg, pos_range, neg_range):
    """Scores of one class: positives uniform in pos_range, negatives in neg_range."""
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    s = np.r_[rng.uniform(*pos_range, n_pos), rng.uniform(*neg_range, n_neg)]
    order = rng.permutation(len(y))
    return y[order], s[order]


def test_global_threshold_falls_in_the_gap():
    rng = np.random.default_rng(0)
    y, s = _separable(rng, 40, 60, (0.3, 0.4), (0.1, 0.2))
    for metric in ("micro_f1", "samples_f1"):
        t = choose_thresholds(y[:, None], s[:, None], metric=metric)
        assert t.shape == (1,)
        assert 0.2 < t[0] <= 0.3
        m = multilabel_metrics(y[:, None], apply_thresholds(s[:, None], t))
        assert m[metric] == pytest.approx(1.0)


def _two_class_problem(rng, n=200):
    """Class 0 separates at 0.5..0.6, class 1 at 0.2..0.3; no single threshold does both."""
    y0, s0 = _separable(rng, n // 2, n // 2, (0.6, 0.7), (0.4, 0.5))
    y1, s1 = _separable(rng, n // 2, n // 2, (0.3, 0.4), (0.1, 0.2))
    return np.c_[y0, y1].astype(int), np.c_[s0, s1]


def test_per_class_thresholds_separate_each_class():
    rng = np.random.default_rng(1)
    y, s = _two_class_problem(rng)
    for metric in ("micro_f1", "samples_f1"):
        glob = choose_thresholds(y, s, metric=metric)
        assert glob[0] == glob[1]
        glob_score = multilabel_metrics(y, apply_thresholds(s, glob))[metric]
        assert glob_score < 0.95
        t = choose_thresholds(y, s, mode="per_class", metric=metric)
        assert 0.5 < t[0] <= 0.6
        assert 0.2 < t[1] <= 0.3
        assert multilabel_metrics(y, apply_thresholds(s, t))[metric] == pytest.approx(1.0)


def test_rare_class_keeps_the_global_threshold():
    rng = np.random.default_rng(2)
    y, s = _two_class_problem(rng)
    # A third class with 2 positives at 0.9 and negatives up to 0.8.
    y2 = np.zeros(len(y), dtype=int)
    y2[:2] = 1
    s2 = np.where(y2 == 1, 0.9, rng.uniform(0.5, 0.8, len(y)))
    y, s = np.c_[y, y2], np.c_[s, s2]
    glob = choose_thresholds(y, s)
    t = choose_thresholds(y, s, mode="per_class", min_support=20)
    assert t[2] == glob[2]
    assert 0.5 < t[0] <= 0.6 and 0.2 < t[1] <= 0.3
    # With the guard off, the 2 positives are enough to pull the threshold above 0.8.
    t_free = choose_thresholds(y, s, mode="per_class", min_support=1)
    assert 0.8 < t_free[2] <= 0.9


def test_apply_thresholds_and_at_least_one():
    probs = np.array([[0.9, 0.2, 0.1], [0.3, 0.4, 0.1], [0.05, 0.02, 0.01], [0.5, 0.5, 0.6]])
    thr = np.array([0.5, 0.5, 0.7])
    np.testing.assert_array_equal(
        apply_thresholds(probs, thr), [[1, 0, 0], [0, 0, 0], [0, 0, 0], [1, 1, 0]]
    )
    filled = apply_thresholds(probs, thr, at_least_one=True)
    # Empty rows get their most probable label (argmax of probs, whatever the thresholds).
    np.testing.assert_array_equal(filled, [[1, 0, 0], [0, 1, 0], [1, 0, 0], [1, 1, 0]])
    assert filled.dtype.kind == "i"
    np.testing.assert_array_equal(apply_thresholds(probs, 0.35), [[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match="expected a scalar or 3 thresholds"):
        apply_thresholds(probs, [0.5, 0.5])
    with pytest.raises(ValueError, match="apply a sigmoid"):
        apply_thresholds(probs * 3 - 1, 0.5)


def test_at_least_one_is_part_of_the_search():
    # Every image has exactly one label, always scored below 0.3, but ranked first;
    # other labels are scored lower still. With the fill rule any threshold above 0.3 is perfect.
    rng = np.random.default_rng(3)
    n = 60
    y = np.zeros((n, 3), dtype=int)
    y[np.arange(n), rng.integers(0, 3, n)] = 1
    s = np.where(y == 1, 0.25, 0.1) + rng.uniform(0, 0.02, (n, 3))
    t = choose_thresholds(y, s, metric="samples_f1", at_least_one=True, min_support=0)
    filled = apply_thresholds(s, t, at_least_one=True)
    np.testing.assert_array_equal(filled, y)


@pytest.mark.parametrize("metric", ["micro_f1", "samples_f1"])
@pytest.mark.parametrize("at_least_one", [False, True])
def test_search_matches_brute_force(metric, at_least_one):
    rng = np.random.default_rng(4)
    n, c = 150, 4
    y = (rng.random((n, c)) < [0.6, 0.3, 0.15, 0.1]).astype(int)
    s = np.clip(0.35 * y + rng.uniform(0, 0.65, (n, c)), 0, 1)
    grid = np.round(np.arange(0.05, 0.96, 0.05), 2)

    def score(thr):
        return multilabel_metrics(y, apply_thresholds(s, thr, at_least_one))[metric]

    kw = {"metric": metric, "at_least_one": at_least_one, "grid": grid, "min_support": 0}
    glob = choose_thresholds(y, s, **kw)
    assert score(glob) == pytest.approx(max(score(g) for g in grid))
    t = choose_thresholds(y, s, mode="per_class", **kw)
    assert set(t) <= set(grid)
    best = score(t)
    assert best >= score(glob) - 1e-12
    # Coordinate-wise optimal: no single class's threshold can be moved to do better.
    for j in range(c):
        for g in grid:
            moved = t.copy()
            moved[j] = g
            assert score(moved) <= best + 1e-12


def test_per_class_search_is_fast():
    rng = np.random.default_rng(5)
    n, c = 4000, 18
    rates = np.r_[0.76, np.geomspace(0.2, 0.004, c - 1)]
    y = (rng.random((n, c)) < rates).astype(int)
    s = 1 / (1 + np.exp(-(rng.normal(0, 1, (n, c)) + 2.0 * y - 2)))
    start = time.perf_counter()
    for metric in ("micro_f1", "samples_f1"):
        t = choose_thresholds(y, s, mode="per_class", metric=metric, at_least_one=True)
        assert t.shape == (c,)
    assert time.perf_counter() - start < 6.0


def test_choose_thresholds_refuses_bad_options():
    y, s = np.array([[1, 0]]), np.array([[0.8, 0.1]])
    with pytest.raises(ValueError, match=r"unknown mode 'best'; choose from \['global', 'per_class'\]"):
        choose_thresholds(y, s, mode="best")
    with pytest.raises(ValueError, match=r"unknown metric 'f2'; choose from \['micro_f1', 'samples_f1'\]"):
        choose_thresholds(y, s, metric="f2")
    with pytest.raises(ValueError, match="grid"):
        choose_thresholds(y, s, grid=[1.5])
    assert default_grid()[0] == 0.05 and default_grid()[-1] == 0.95 and len(default_grid()) == 91


def _expected_f1_brute_force(p: np.ndarray, chosen: np.ndarray) -> float:
    """E[F1(chosen, Y)] over every label vector Y, labels independent with probabilities p."""
    c = len(p)
    total = 0.0
    for bits in range(2 ** c):
        y = np.array([(bits >> j) & 1 for j in range(c)])
        prob = np.prod(np.where(y == 1, p, 1 - p))
        den = chosen.sum() + y.sum()
        total += prob * (2 * (chosen & y).sum() / den if den else 1.0)
    return total


@pytest.mark.parametrize("at_least_one", [False, True])
def test_expected_f1_sets_are_the_best_of_every_subset(at_least_one):
    rng = np.random.default_rng(3)
    probs = np.vstack([rng.random((6, 5)) ** 3, [[0.02, 0.01, 0.03, 0.01, 0.02]],
                       [[0.9, 0.85, 0.5, 0.4, 0.1]]])
    got = expected_f1_sets(probs, at_least_one)
    subsets = [np.array([(s >> j) & 1 for j in range(5)]) for s in range(2 ** 5)]
    if at_least_one:
        subsets = subsets[1:]
    for p, pred in zip(probs, got, strict=True):
        best = max(_expected_f1_brute_force(p, s) for s in subsets)
        assert _expected_f1_brute_force(p, pred) == pytest.approx(best, abs=1e-12)
        assert pred.sum() >= (1 if at_least_one else 0)
    # all labels improbable: the empty set is the best guess, unless a label is required
    # (then, given that the image has one, casting a wider net pays: three labels here)
    assert got[6].tolist() == ([1, 0, 1, 0, 1] if at_least_one else [0, 0, 0, 0, 0])


def test_expected_f1_beats_every_global_threshold_on_samples_f1():
    # labels drawn from the probabilities themselves: calibrated by construction
    rng = np.random.default_rng(0)
    probs = rng.beta(0.3, 2.0, size=(4000, 12))
    y = (rng.random(probs.shape) < probs).astype(int)
    ef1 = multilabel_metrics(y, decide(probs, None, rule="expected_f1"))["samples_f1"]
    best_thr = max(multilabel_metrics(y, apply_thresholds(probs, t))["samples_f1"]
                   for t in default_grid())
    assert ef1 > best_thr + 0.005
    with pytest.raises(ValueError, match="decision rule"):
        decide(probs, 0.5, rule="top3")
