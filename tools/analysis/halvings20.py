"""The 20-halving estimate of a run's validation figures: threshold-rule micro-F1 (global
threshold chosen on one half with the at-least-one rule, scored on the other, both ways, 20
random halvings, averaged), expected-F1 sets' micro / samples-F1, and the validation BCE of the
run's val_probs.csv. Steadier than summary.json's single seeded halving (about 0.2 points of
noise on the threshold rule's figure).

    python tools/analysis/halvings20.py RUN ...          # folders under runs/

Run against commit 3145821 (2026-11-30) and used for the v6 variants measured up to 380839d
("cf20.py"). It imports mmtag.training.thresholds and mmtag.training.metrics, which may have
moved since: check that commit out to rerun it exactly. Results: docs/experiments.md (the
"20 halvings" figures).
"""

import csv
import sys

import numpy as np

from mmtag.training.metrics import multilabel_metrics
from mmtag.training.thresholds import apply_thresholds, choose_thresholds, expected_f1_sets

for run in sys.argv[1:]:
    with open(f"runs/{run}/val_probs.csv") as f:
        rows = list(csv.reader(f))
    y = np.array([[int(lab in r[1].split()) for lab in rows[0][2:]] for r in rows[1:]])
    p = np.array([[float(x) for x in r[2:]] for r in rows[1:]])
    mic = []
    for s in range(20):
        perm = np.random.default_rng(s).permutation(len(y))
        h = (perm[:len(y) // 2], perm[len(y) // 2:])
        for a, b in (h, h[::-1]):
            g = choose_thresholds(y[a], p[a], mode="global", metric="micro_f1", at_least_one=True)
            mic.append(multilabel_metrics(y[b], apply_thresholds(p[b], g, True))["micro_f1"])
    ef = multilabel_metrics(y, expected_f1_sets(p, True))
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    print(f"{run:14s} threshold micro {np.mean(mic):.4f}  EF1 {ef['micro_f1']:.4f} / {ef['samples_f1']:.4f}"
          f"  BCE {-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc)):.4f}")
