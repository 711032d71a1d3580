"""Per-class thresholds shrunk toward the global one, against the global threshold.

Per-class thresholds are chosen for micro-F1 (as threshold_mode: per_class does, for classes
with at least ms = 20, 50 or 100 validation positives), then t = g + lambda (t_c - g) with the
global threshold g, lambda 0 ... 1; chosen on one half of the validation rows, scored on the
other (at-least-one rule, both ways, 20 random halvings, averaged).

    python tools/analysis/shrunk_thresholds.py RUN ...       # folders under runs/

Run against commit 6e42b90 (2026-11-30) on v5 runs and again at 0f8d58f (2026-12-01) on v6's
five seeds. It imports mmtag.training.thresholds and mmtag.training.metrics, which may have
moved since: check that commit out to rerun it exactly. Results: docs/experiments.md, "Decision
rules and thresholds".
"""

import csv
import sys

import numpy as np

from mmtag.training.metrics import multilabel_metrics
from mmtag.training.thresholds import apply_thresholds, choose_thresholds

for run in sys.argv[1:]:
    with open(f"runs/{run}/val_probs.csv") as f:
        rows = list(csv.reader(f))
    labels = rows[0][2:]
    y = np.array([[int(lab in r[1].split()) for lab in labels] for r in rows[1:]])
    p = np.array([[float(x) for x in r[2:]] for r in rows[1:]])
    res = {}
    for s in range(20):
        perm = np.random.default_rng(s).permutation(len(y))
        h = (perm[:len(y) // 2], perm[len(y) // 2:])
        for a, b in (h, h[::-1]):
            g = choose_thresholds(y[a], p[a], mode="global", metric="micro_f1", at_least_one=True)
            for ms in (20, 50, 100):
                pc = choose_thresholds(y[a], p[a], mode="per_class", metric="micro_f1",
                                       at_least_one=True, min_support=ms)
                for lam in (0.0, 0.25, 0.5, 0.75, 1.0):
                    m = multilabel_metrics(y[b], apply_thresholds(p[b], g + lam * (pc - g), True))
                    res.setdefault((ms, lam), []).append(m["micro_f1"])
    print(run, " ".join(f"ms{ms}/l{lam}:{np.mean(v):.4f}" for (ms, lam), v in res.items()))
