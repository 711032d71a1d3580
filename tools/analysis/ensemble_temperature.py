"""Runs' validation probabilities averaged (an ensemble, no retraining), and the expected-F1 rule
after temperature scaling of the logits.

For each run and for their mean: cross-fit micro-F1 / samples-F1 of the threshold rule (no
at-least-one rule) and of expected-F1 sets (at least one label), as summary.json computes it;
then samples-F1 of expected-F1 sets at temperatures 0.8-1.5 (on all validation rows).

    python tools/analysis/ensemble_temperature.py RUN RUN ...      # folders under runs/

The runs must share their validation rows in one order (same data.split_seed). Run against
commit 6d8870a (2026-11-27). It imports the private mmtag.training.loop._crossfit and
mmtag.training.thresholds.decide, which may have moved since: check that commit out to rerun it
exactly. Results: docs/experiments.md, "Ensembles" and "Decision rules and thresholds".
"""

import csv
import sys

import numpy as np

from mmtag.config import load_config
from mmtag.training.loop import _crossfit
from mmtag.training.metrics import multilabel_metrics
from mmtag.training.thresholds import decide


def load(run):
    with open(f"runs/{run}/val_probs.csv") as f:
        rows = list(csv.reader(f))
    y = np.array([[int(lab in r[1].split()) for lab in rows[0][2:]] for r in rows[1:]])
    return y, np.array([[float(x) for x in r[2:]] for r in rows[1:]])


runs = [load(r) for r in sys.argv[1:]]
y = runs[0][0]
named = [*zip(sys.argv[1:], (p for _, p in runs), strict=False),
         ("mean", np.mean([p for _, p in runs], 0))]
for name, p in named:
    print(name, *(round(_crossfit(load_config(None, [f"decision={rule}", f"at_least_one={alo}"]),
                                  y, p, rule)[k], 4)
                  for rule, alo in (("threshold", "false"), ("expected_f1", "true"))
                  for k in ("micro_f1", "samples_f1")))
    z = np.log(np.clip(p, 1e-7, 1 - 1e-7) / np.clip(1 - p, 1e-7, 1))
    for t in (0.8, 0.9, 1.0, 1.1, 1.2, 1.35, 1.5):
        pred = decide(1 / (1 + np.exp(-z * t)), np.full(y.shape[1], 0.5), at_least_one=True,
                      rule="expected_f1")
        print(f"  T={t} samples-F1 {multilabel_metrics(y, pred)['samples_f1']:.4f}")
