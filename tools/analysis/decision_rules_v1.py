"""Global-threshold decision rules on a run's saved validation probabilities (no retraining).

Measures the cross-fit micro-F1 and samples-F1 of one global threshold chosen for micro-F1 or
for samples-F1, with and without the at-least-one-label rule: thresholds chosen on one seeded
half of the validation rows, scored on the other, both ways, averaged.

    python tools/analysis/decision_rules_v1.py [RUN]    # RUN: a folder under runs/ (default: cpu)

Run against commit c3cef0d (2026-11-27) on the v1 `cpu` model, then on v2's. It imports
mmtag.training.thresholds and mmtag.training.metrics, which may have moved since: check that
commit out to rerun it exactly. Results: docs/experiments.md, "Decision rules and thresholds".
"""

import csv
import sys

import numpy as np

from mmtag.training.metrics import multilabel_metrics
from mmtag.training.thresholds import apply_thresholds, choose_thresholds

run = sys.argv[1] if len(sys.argv) > 1 else "cpu"
with open(f"runs/{run}/val_probs.csv") as f:
    rows = list(csv.reader(f))
labels = rows[0][2:]
y = np.array([[int(lab in r[1].split()) for lab in labels] for r in rows[1:]])
p = np.array([[float(x) for x in r[2:]] for r in rows[1:]])
perm = np.random.default_rng(0).permutation(len(y))
halves = (perm[:len(y) // 2], perm[len(y) // 2:])
for metric in ("micro_f1", "samples_f1"):
    for alo in (False, True):
        scores = [multilabel_metrics(y[b], apply_thresholds(p[b], choose_thresholds(
            y[a], p[a], mode="global", metric=metric, at_least_one=alo), alo))
            for a, b in (halves, halves[::-1])]
        print(metric, alo, *(round(np.mean([m[k] for m in scores]), 4)
                             for k in ("micro_f1", "samples_f1")))
