"""Per-class head weights against the global (1, 1, 0.5), from head_logits.py's
/tmp/heads-RUN.npz: for each class, the image and caption heads' weights (fused head 1) are
chosen from a 7 x 6 grid by that class's BCE on one half of the validation rows and scored on
the other (threshold-rule micro-F1 with the global threshold chosen on the first half, and
expected-F1 sets' samples-F1; 10 random halvings, both ways); "halfway" averages the per-class
and the global weights.

    python tools/analysis/per_class_head_weights.py RUN ...     # after head_logits.py RUN ...

Run against commit 17d0651 (2026-11-30) on v5's three seeds (whose trained weights v6 shares).
It imports mmtag.training.thresholds and mmtag.training.metrics, which may have moved since:
check that commit out to rerun it exactly. Results: docs/experiments.md, "Heads".
"""

import sys

import numpy as np

from mmtag.training.metrics import multilabel_metrics
from mmtag.training.thresholds import apply_thresholds, choose_thresholds, expected_f1_sets

G = [(1, a, b) for a in (0.25, 0.5, 0.75, 1, 1.25, 1.5, 2) for b in (0, 0.25, 0.5, 0.75, 1, 1.5)]


def comb(z, W):
    return (W[:, 0] * z[0] + W[:, 1] * z[1] + W[:, 2] * z[2]) / W.sum(1)


def bce(y, z):  # per class
    return np.mean(np.logaddexp(0, z) - y * z, axis=0)


def sig(x):
    return 1 / (1 + np.exp(-x))


def score(y, p, ya, pa):
    g = choose_thresholds(ya, pa, mode="global", metric="micro_f1", at_least_one=True)
    return (multilabel_metrics(y, apply_thresholds(p, g, True))["micro_f1"],
            multilabel_metrics(y, expected_f1_sets(p, True))["samples_f1"])


for run in sys.argv[1:]:
    d = np.load(f"/tmp/heads-{run}.npz")
    y = d["y"].astype(int)
    z = (d["fused"], d["image"], d["text"])
    C = y.shape[1]
    res = {"global": [], "per class": [], "halfway": []}
    for s in range(10):
        perm = np.random.default_rng(s).permutation(len(y))
        h = (perm[:len(y) // 2], perm[len(y) // 2:])
        for a, b in (h, h[::-1]):
            za, zb = [x[a] for x in z], [x[b] for x in z]
            Wg = np.tile(np.array([1, 1, 0.5]), (C, 1))
            loss = np.stack([bce(y[a], comb(za, np.tile(np.array(w, float), (C, 1)))) for w in G])
            Wp = np.array([G[i] for i in loss.argmin(0)], float)
            for k, W in (("global", Wg), ("per class", Wp), ("halfway", (Wp + Wg) / 2)):
                res[k].append(score(y[b], sig(comb(zb, W)), y[a], sig(comb(za, W))))
    print(run, "  ".join(f"{k}: {np.mean([r[0] for r in v]):.4f} / {np.mean([r[1] for r in v]):.4f}"
                         for k, v in res.items()))
