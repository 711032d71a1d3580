"""How good is the cross-fit estimate? The threshold rule's micro-F1 estimated by K-fold
cross-fit (a global threshold tuned on (K-1)/K of the validation rows with the at-least-one
rule, scored on the rest, counts pooled over the folds), 10 random partitions per K = 2, 5, 10,
20; and tuned on all rows, scored on the same rows (optimistic).

    python tools/analysis/kfold_threshold.py RUN ...        # folders under runs/

Run against commit 380839d (2026-11-30) on v6's five seeds ("kfold.py"). It imports
mmtag.training.thresholds, which may have moved since: check that commit out to rerun it
exactly. Results: docs/experiments.md, "Decision rules and thresholds".
"""

import csv
import sys

import numpy as np

from mmtag.training.thresholds import apply_thresholds, choose_thresholds


def f1(y, d):
    return 2 * (d & y).sum() / (d.sum() + y.sum())


def tune(y, p, i):
    return choose_thresholds(y[i], p[i], mode="global", metric="micro_f1", at_least_one=True)


for run in sys.argv[1:]:
    with open(f"runs/{run}/val_probs.csv") as fh:
        rows = list(csv.reader(fh))
    y = np.array([[int(lab in r[1].split()) for lab in rows[0][2:]] for r in rows[1:]])
    p = np.array([[float(x) for x in r[2:]] for r in rows[1:]])
    res = []
    for K in (2, 5, 10, 20):
        f = []
        for s in range(10):
            folds = np.array_split(np.random.default_rng(s).permutation(len(y)), K)
            pred = np.zeros_like(y)
            for k in range(K):
                g = tune(y, p, np.concatenate([folds[j] for j in range(K) if j != k]))
                pred[folds[k]] = apply_thresholds(p[folds[k]], g, True)
            f.append(f1(y, pred))
        res.append(f"K={K} {np.mean(f):.4f}")
    print(run, "  ".join(res), f"tuned on all {f1(y, apply_thresholds(p, tune(y, p, slice(None)), True)):.4f}")
