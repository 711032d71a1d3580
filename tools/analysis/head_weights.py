"""Weightings of the fused, image and caption heads' logits (head_logits.py's
/tmp/heads-RUN.npz): validation BCE, threshold-rule micro-F1 (cross-fit, 20 random halvings,
at-least-one rule) and expected-F1 sets' micro / samples-F1 for (1, 1, 1), (1, 1, 0.5) and
(1, 0.75, 0.5); then weights chosen on one half of the validation rows (24 combinations, by
samples-F1 of expected-F1 sets) and scored on the other, as a gain over the plain average.

    python tools/analysis/head_weights.py RUN ...       # after head_logits.py RUN ...

Run against commit 371121f (2026-11-30) on v5's three seeds (the figures behind
model.head_weights [1, 1, 0.5], recipe v6). It imports mmtag.training.thresholds and
mmtag.training.metrics, which may have moved since: check that commit out to rerun it exactly.
Results: docs/experiments.md, "Heads".
"""

import itertools
import sys

import numpy as np

from mmtag.training.metrics import multilabel_metrics
from mmtag.training.thresholds import apply_thresholds, choose_thresholds, expected_f1_sets

W = [w for w in itertools.product((0.5, 1, 1.5, 2), repeat=3) if w[0] == 1 or w == (2, 1, 1)]


def prob(z, w):
    return 1 / (1 + np.exp(-(w[0] * z[0] + w[1] * z[1] + w[2] * z[2]) / sum(w)))


def sf1(y, z, w):
    return multilabel_metrics(y, expected_f1_sets(prob(z, w), True))["samples_f1"]


def halves(n, s):
    p = np.random.default_rng(s).permutation(n)
    return p[:n // 2], p[n // 2:]


def best_weights(y, z):
    return max(W, key=lambda w: sf1(y, z, w))


for run in sys.argv[1:]:
    d = np.load(f"/tmp/heads-{run}.npz")
    y = d["y"].astype(int)
    z = (d["fused"], d["image"], d["text"])
    for w in ((1, 1, 1), (1, 1, 0.5), (1, 0.75, 0.5)):
        p = prob(z, w)
        pc = np.clip(p, 1e-7, 1 - 1e-7)
        mic = [multilabel_metrics(y[b], apply_thresholds(p[b], choose_thresholds(
                   y[a], p[a], mode="global", metric="micro_f1", at_least_one=True), True))["micro_f1"]
               for s in range(20) for a, b in (halves(len(y), s), halves(len(y), s)[::-1])]
        ef = multilabel_metrics(y, expected_f1_sets(p, True))
        print(run, w, f"BCE {-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc)):.5f} threshold "
              f"micro {np.mean(mic):.4f} EF1 {ef['micro_f1']:.4f} / {ef['samples_f1']:.4f}")
    gains = []
    for s in range(20):
        for a, b in (halves(len(y), s), halves(len(y), s)[::-1]):
            wa = best_weights(y[a], [x[a] for x in z])
            gains.append(sf1(y[b], [x[b] for x in z], wa) - sf1(y[b], [x[b] for x in z], (1, 1, 1)))
    print(run, f"weights chosen on the other half: samples-F1 {np.mean(gains):+.4f}")
