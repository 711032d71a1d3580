"""A relative threshold for micro-F1: predict a label when p >= t, or when p >= r x the image's
highest probability, against the global threshold t alone (both with at least one label per
image). t (and r) are chosen on one half of the validation rows and scored on the other (both
ways, 20 random halvings, averaged).

    python tools/analysis/relative_threshold.py RUN ...      # folders under runs/

Run against commit 478cca4 (2026-11-30) on v6's five seeds. It needs nothing from mmtag (its
original form imported mmtag.training.metrics without using it), only the runs' val_probs.csv.
Results: docs/experiments.md, "Decision rules and thresholds".
"""

import csv
import itertools
import sys

import numpy as np


def load(run):
    with open(f"runs/{run}/val_probs.csv") as f:
        rows = list(csv.reader(f))
    y = np.array([[int(lab in r[1].split()) for lab in rows[0][2:]] for r in rows[1:]])
    return y, np.array([[float(x) for x in r[2:]] for r in rows[1:]])


def decide(p, t, r):
    mx = p.max(1, keepdims=True)
    d = (p >= t) | (p >= r * mx) & (r < 1.01)
    d[np.arange(len(p)), p.argmax(1)] = True
    return d.astype(int)


def micro(y, d):
    tp = (y & d).sum()
    return 2 * tp / (y.sum() + d.sum())


def best_global(y, p):
    return max(T, key=lambda t: micro(y, decide(p, t, 1.1)))


def best_pair(y, p):
    return max(itertools.product(T, R), key=lambda q: micro(y, decide(p, *q)))


T = np.round(np.arange(0.2, 0.7, 0.01), 2)
R = [1.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
for run in sys.argv[1:]:
    y, p = load(run)
    res = {"global": [], "global+rel": []}
    for s in range(20):
        perm = np.random.default_rng(s).permutation(len(y))
        h = (perm[:len(y) // 2], perm[len(y) // 2:])
        for a, b in (h, h[::-1]):
            g = best_global(y[a], p[a])
            res["global"].append(micro(y[b], decide(p[b], g, 1.1)))
            tr = best_pair(y[a], p[a])
            res["global+rel"].append(micro(y[b], decide(p[b], *tr)))
    print(run, {k: round(float(np.mean(v)), 4) for k, v in res.items()}, flush=True)
