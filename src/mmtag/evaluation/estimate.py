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
    estimate for the rule chosen and for the other one (a run's, or an ensemble's averaged).
    With decision 'auto' the rule is the one of better cross-fit figures (`choose_rule`);
    "decision" is always the rule chosen, "decision_why" says how."""
    thr = choose_thresholds(y, probs, mode=cfg.threshold_mode, metric=cfg.threshold_metric,
                            at_least_one=cfg.at_least_one, min_support=cfg.min_support)
    at05 = multilabel_metrics(y, apply_thresholds(probs, np.full(probs.shape[1], 0.5)))
    estimates = {rule: crossfit(cfg, y, probs, rule) for rule in RULES}
    rule, why = choose_rule(cfg, estimates)
    tuned = multilabel_metrics(y, decide(probs, thr, at_least_one=cfg.at_least_one,
                                         rule=rule), label_names=label_names)
    other = "threshold" if rule == "expected_f1" else "expected_f1"
    return {"decision": rule, "decision_why": why, "thresholds": [float(t) for t in thr],
            "val_at_0.5": {k: at05[k] for k in METRIC_COLUMNS[1:]},
            "val": {k: tuned[k] for k in METRIC_COLUMNS[1:]},
            "val_crossfit": estimates[rule],
            # the same estimate for the rule not chosen, so the choice can be made with numbers
            "val_crossfit_other_rule": {"decision": other, **estimates[other]},
            "per_class": tuned["per_class"]}


RULES = ("threshold", "expected_f1")
# cross-fit figures closer than this are a tie (the estimate's standard error on 4,000
# validation rows is about 0.005): the other F1 decides
TIE = 0.002
RULE_WORDS = {"threshold": "tuned threshold", "expected_f1": "expected-F1 label sets"}


def choose_rule(cfg: TrainConfig, estimates: dict[str, dict]) -> tuple[str, str]:
    """The decision rule a run predicts with, and why, in words. A fixed `cfg.decision` is
    kept; 'auto' takes the rule of the higher cross-fit `cfg.threshold_metric` (closer than
    TIE: the higher other F1; too few rows to cross-fit: the tuned threshold)."""
    if cfg.decision != "auto":
        return cfg.decision, f"decision: {cfg.decision} in the config"
    metric = cfg.threshold_metric
    second = "samples_f1" if metric == "micro_f1" else "micro_f1"
    a, b = estimates["threshold"], estimates["expected_f1"]
    if not a or not b:
        return "threshold", ("decision: auto, but too few validation rows to compare the rules "
                             "out of sample: the tuned threshold")
    gap = b[metric] - a[metric]
    rule = ("expected_f1" if gap > TIE or (abs(gap) <= TIE and b[second] > a[second])
            else "threshold")
    other = "threshold" if rule == "expected_f1" else "expected_f1"
    tie = f" (within {TIE}: a tie, decided by {second})" if abs(gap) <= TIE else ""
    return rule, (f"decision: auto chose {RULE_WORDS[rule]}: cross-fit {metric} "
                  f"{estimates[rule][metric]:.4f} vs {estimates[other][metric]:.4f} for "
                  f"{RULE_WORDS[other]}{tie}, {second} {estimates[rule][second]:.4f} vs "
                  f"{estimates[other][second]:.4f}")


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
