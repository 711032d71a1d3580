"""Score runs on the validation rows they all have, in one order: cross-fit figures of both
decision rules, micro-F1 at a fixed 0.5 threshold, and the validation BCE.

A RUN argument may be A+B: the validation probabilities of several runs pooled, as for folds
(data.val_block 0 and 1 with data.train_prop=0.9 cover the 0.8 split's 4,000 validation rows,
each row predicted by a model that never saw it). Every argument is scored on the rows common
to all arguments, so runs on different splits compare row for row. Its cross-fit halves differ
from summary.json's, so the threshold rule's figure can differ from a run's own by a few tenths
of a point (that figure's noise).

    python tools/analysis/score_common_rows.py RUN [RUN ...]        # folders under runs/
    python tools/analysis/score_common_rows.py fold0+fold1 v3       # two folds pooled, and v3

Prints per argument: [threshold-rule micro-F1, samples-F1, expected-F1 micro-F1, samples-F1],
micro-F1 at 0.5, BCE. Run against commit e33b788 (2026-11-27) and used until 25da108. It
imports the private mmtag.training.loop._crossfit, which may have moved or changed since: check
that commit out to rerun it exactly. Results: docs/experiments.md ("Training data", "Fusion",
"Image encoder and resolution", ...).
"""

import csv
import sys

import numpy as np

from mmtag.config import load_config
from mmtag.training.loop import _crossfit
from mmtag.training.metrics import multilabel_metrics


def load(runs):
    d = {}
    for run in runs.split("+"):
        with open(f"runs/{run}/val_probs.csv") as f:
            rows = list(csv.reader(f))
        for r in rows[1:]:
            d[r[0]] = ([int(lab in r[1].split()) for lab in rows[0][2:]], [float(x) for x in r[2:]])
    return d


ds = [load(a) for a in sys.argv[1:]]
common = sorted(set.intersection(*(set(d) for d in ds)))
for a, d in zip(sys.argv[1:], ds, strict=False):
    y = np.array([d[k][0] for k in common])
    p = np.array([d[k][1] for k in common])
    out = []
    for rule, alo in (("threshold", "false"), ("expected_f1", "true")):
        c = _crossfit(load_config(None, [f"decision={rule}", f"at_least_one={alo}"]), y, p, rule)
        out += [round(c["micro_f1"], 4), round(c["samples_f1"], 4)]
    bce = -np.mean(y * np.log(np.clip(p, 1e-7, 1)) + (1 - y) * np.log(np.clip(1 - p, 1e-7, 1)))
    print(a, out, round(multilabel_metrics(y, (p >= 0.5).astype(int))["micro_f1"], 4), round(bce, 4))
