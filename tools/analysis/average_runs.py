"""Runs' validation probabilities averaged (an ensemble without retraining), scored over 20
random halvings of the validation rows.

For each argument (one run, or several joined by +): threshold-rule micro-F1 (global threshold
chosen on one half with the at-least-one rule, scored on the other, both ways, 20 random
halvings, averaged) and expected-F1 sets' micro-F1 / samples-F1 on all validation rows. The
runs joined by + must share their validation rows in one order (the same data.split_seed).

    python tools/analysis/average_runs.py RUN RUN+RUN RUN+RUN+RUN ...     # folders under runs/

Written at commit 6e42b90 (2026-11-30) and used again as "avg.py" at 380839d (2026-11-30) and
3a653dc (2026-12-01): the same computation. It imports mmtag.training.thresholds and
mmtag.training.metrics, which may have moved since: check one of those commits out to rerun it
exactly. Results: docs/experiments.md, "Ensembles".
"""

import csv
import sys

import numpy as np

from mmtag.training.metrics import multilabel_metrics
from mmtag.training.thresholds import apply_thresholds, choose_thresholds, expected_f1_sets


def load(run):
    with open(f"runs/{run}/val_probs.csv") as f:
        rows = list(csv.reader(f))
    labels = rows[0][2:]
    y = np.array([[int(lab in r[1].split()) for lab in labels] for r in rows[1:]])
    return [r[0] for r in rows[1:]], y, np.array([[float(x) for x in r[2:]] for r in rows[1:]])


for arg in sys.argv[1:]:
    parts = [load(r) for r in arg.split("+")]
    ids, y, _ = parts[0]
    assert all(part[0] == ids for part in parts)
    p = np.mean([q[2] for q in parts], axis=0)
    mic = []
    for s in range(20):
        perm = np.random.default_rng(s).permutation(len(y))
        h = (perm[:len(y) // 2], perm[len(y) // 2:])
        for a, b in (h, h[::-1]):
            g = choose_thresholds(y[a], p[a], mode="global", metric="micro_f1", at_least_one=True)
            mic.append(multilabel_metrics(y[b], apply_thresholds(p[b], g, True))["micro_f1"])
    ef = multilabel_metrics(y, expected_f1_sets(p, True))
    print(f"{arg}: threshold micro {np.mean(mic):.4f}  EF1 micro {ef['micro_f1']:.4f} "
          f"samples {ef['samples_f1']:.4f}")
