"""The figures a run (or an ensemble) reports for its validation rows: at threshold 0.5, with
the decision rule tuned on those rows, and the honest cross-fit estimate for unseen rows."""

from __future__ import annotations

import numpy as np

from mmtag.config import TrainConfig
from mmtag.evaluation.metrics import multilabel_metrics
from mmtag.evaluation.thresholds import apply_thresholds, choose_thresholds, decide

# the figures of each epoch's row in metrics.csv and of summary.json, in this order
METRIC_COLUMNS = ["loss", "precision", "recall", "micro_f1", "macro_f1", "samples_f1"]


def epoch_scores(prefix: str, loss: float, probs: np.ndarray, targets: np.ndarray) -> dict:
    """`{prefix}_loss` and the metrics at threshold 0.5: one side of an epoch's row."""
    # soft targets (distillation) count as labels from 0.5 up, like the probabilities
    m = multilabel_metrics((targets >= 0.5).astype(int),
                           apply_thresholds(probs, np.full(probs.shape[1], 0.5)))
    return {f"{prefix}_loss": loss, **{f"{prefix}_{k}": m[k] for k in METRIC_COLUMNS[1:]}}


def decision_figures(cfg: TrainConfig, y: np.ndarray, probs: np.ndarray,
                     label_names: list[str]) -> dict:
    """Thresholds chosen on validation targets `y` and probabilities `probs` by the config's
    rule, and the figures summary.json reports: at 0.5, tuned on these rows, and the cross-fit
    estimate for the rule chosen and for the other one (a run's, or an ensemble's averaged)."""
    thr = choose_thresholds(y, probs, mode=cfg.threshold_mode, metric=cfg.threshold_metric,
                            at_least_one=cfg.at_least_one, min_support=cfg.min_support)
    at05 = multilabel_metrics(y, apply_thresholds(probs, np.full(probs.shape[1], 0.5)))
    tuned = multilabel_metrics(y, decide(probs, thr, at_least_one=cfg.at_least_one,
                                         rule=cfg.decision), label_names=label_names)
    other = "threshold" if cfg.decision == "expected_f1" else "expected_f1"
    return {"decision": cfg.decision, "thresholds": [float(t) for t in thr],
            "val_at_0.5": {k: at05[k] for k in METRIC_COLUMNS[1:]},
            "val": {k: tuned[k] for k in METRIC_COLUMNS[1:]},
            "val_crossfit": crossfit(cfg, y, probs, cfg.decision),
            # the same estimate for the rule not chosen, so the choice can be made with numbers
            "val_crossfit_other_rule": {"decision": other, **crossfit(cfg, y, probs, other)},
            "per_class": tuned["per_class"]}


def crossfit(cfg: TrainConfig, y: np.ndarray, probs: np.ndarray, rule: str,
             seed: int = 0) -> dict:
    """Validation figures with thresholds chosen on the *other* half of the validation rows
    (both ways, averaged): tuning thresholds and scoring on the same rows flatters a model.
    (The expected-F1 rule tunes nothing; its halves are scored the same way.)"""
    n = len(y)
    if n < 4:
        return {}
    perm = np.random.default_rng(seed).permutation(n)
    halves = (perm[: n // 2], perm[n // 2:])
    scores = []
    for fit_idx, test_idx in (halves, halves[::-1]):
        thr = choose_thresholds(y[fit_idx], probs[fit_idx], mode=cfg.threshold_mode,
                                metric=cfg.threshold_metric, at_least_one=cfg.at_least_one,
                                min_support=max(1, cfg.min_support // 2))
        scores.append(multilabel_metrics(y[test_idx], decide(
            probs[test_idx], thr, at_least_one=cfg.at_least_one, rule=rule)))
    return {k: float(np.mean([m[k] for m in scores])) for k in METRIC_COLUMNS[1:]}
