"""Thresholds per label group against one global threshold: person / the rest, and person /
labels on at least 3 % of images / rarer labels; each group's threshold chosen on one half of
the validation rows by coordinate ascent (two rounds) over a 0.15-0.79 grid, scored by micro-F1
on the other half (at least one label per image; both ways, 20 random halvings, averaged).

    python tools/analysis/group_thresholds.py RUN ...        # folders under runs/

Run against commit 380839d (2026-11-30) on v6 (seeds 0, 1) ("groups.py"). It needs nothing
from mmtag, only the runs' val_probs.csv. Results: docs/experiments.md, "Decision rules and
thresholds".
"""

import csv
import sys

import numpy as np

grid = np.round(np.arange(0.15, 0.80, 0.01), 2)


def f1(y, d):
    return 2 * (d & y).sum() / (d.sum() + y.sum())


def predict(p, t):
    d = p >= t
    d[np.arange(len(p)), p.argmax(1)] = True
    return d


def best_value(y, p, m, t):
    return max(grid, key=lambda v: f1(y, predict(p, np.where(m, v, t))))


def fit(y, p, groups):
    t = np.full(p.shape[1], 0.45)
    for _ in range(2):
        for g in groups:
            m = np.isin(np.arange(p.shape[1]), g)
            t = np.where(m, best_value(y, p, m, t), t)
    return t


for run in sys.argv[1:]:
    with open(f"runs/{run}/val_probs.csv") as fh:
        rows = list(csv.reader(fh))
    y = np.array([[lab in r[1].split() for lab in rows[0][2:]] for r in rows[1:]])
    p = np.array([[float(x) for x in r[2:]] for r in rows[1:]])
    C, fr = p.shape[1], y.mean(0)
    schemes = {"global": [list(range(C))], "person/rest": [[0], list(range(1, C))],
               "3 groups": [[0], [c for c in range(1, C) if fr[c] >= 0.03],
                            [c for c in range(1, C) if fr[c] < 0.03]]}
    out = {k: [] for k in schemes}
    for s in range(20):
        perm = np.random.default_rng(s).permutation(len(y))
        h = (perm[:len(y) // 2], perm[len(y) // 2:])
        for a, b in (h, h[::-1]):
            for k, g in schemes.items():
                out[k].append(f1(y[b], predict(p[b], fit(y[a], p[a], g))))
    print(run, "  ".join(f"{k} {np.mean(v):.4f}" for k, v in out.items()))
