"""Both decision rules, cross-fit, on a run's saved validation probabilities (no retraining).

Prints micro-F1 and samples-F1 of: the global threshold for micro-F1; the same with the
at-least-one-label rule; expected-F1 label sets with at least one label. Cross-fit as a run's
summary.json computes it (the trainer's own seeded halves, both ways).

    python tools/analysis/rules_crossfit.py RUN         # RUN: a folder under runs/

Run against commit 9cb1958 (2026-11-27). It imports the private mmtag.training.loop._crossfit,
which may have moved or changed since: check that commit out to rerun it exactly.
Results: docs/experiments.md, "Decision rules and thresholds".
"""

import csv
import sys

import numpy as np

from mmtag.config import load_config
from mmtag.training.loop import _crossfit

with open(f"runs/{sys.argv[1]}/val_probs.csv") as f:
    rows = list(csv.reader(f))
labels = rows[0][2:]
y = np.array([[int(lab in r[1].split()) for lab in labels] for r in rows[1:]])
p = np.array([[float(x) for x in r[2:]] for r in rows[1:]])
for rule, alo in (("threshold", "false"), ("threshold", "true"), ("expected_f1", "true")):
    c = _crossfit(load_config(None, [f"decision={rule}", f"at_least_one={alo}"]), y, p, rule)
    print(rule, alo, round(c["micro_f1"], 4), round(c["samples_f1"], 4))
