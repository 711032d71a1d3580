"""Weightings of the fused, image, caption and (where recorded) pooled heads' logits of
/tmp/heads-RUN.npz: validation BCE, threshold-rule micro-F1 (cross-fit, 20 random halvings,
at-least-one rule) and expected-F1 sets' micro / samples-F1. With three heads recorded it
scores (1, 1, 0.5) only; with four, the pooled head at weights 0, 0.5, 1, 2 and alone.

    python tools/analysis/head_weights_pooled.py RUN ...   # after head_logits.py RUN ...

Run against commit ebd3f09 (2026-11-30) on two runs with model.pooled_head=true, an option that
is gone: it exists up to commit c54b680 (check that commit out to train such runs and to rerun
this exactly; mmtag.training.thresholds and metrics may have moved since).
Results: docs/experiments.md, "Heads".
"""

import sys

import numpy as np

from mmtag.training.metrics import multilabel_metrics
from mmtag.training.thresholds import apply_thresholds, choose_thresholds, expected_f1_sets


def halves(n, s):
    p = np.random.default_rng(s).permutation(n)
    return p[:n // 2], p[n // 2:]


WEIGHTS = [(1, 1, 0.5, 0), (1, 1, 0.5, 0.5), (1, 1, 0.5, 1), (1, 1, 0.5, 2), (0, 0, 0, 1)]
for run in sys.argv[1:]:
    d = np.load(f"/tmp/heads-{run}.npz")
    y = d["y"].astype(int)
    z = [d[k] for k in ("fused", "image", "text", "pooled") if k in d]
    for w in WEIGHTS[:1 if len(z) == 3 else 5]:
        p = 1 / (1 + np.exp(-sum(a * b for a, b in zip(w, z, strict=False)) / sum(w)))
        pc = np.clip(p, 1e-7, 1 - 1e-7)
        mic = [multilabel_metrics(y[b], apply_thresholds(p[b], choose_thresholds(
                   y[a], p[a], mode="global", metric="micro_f1", at_least_one=True), True))["micro_f1"]
               for s in range(20) for a, b in (halves(len(y), s), halves(len(y), s)[::-1])]
        ef = multilabel_metrics(y, expected_f1_sets(p, True))
        print(run, w, f"BCE {-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc)):.5f} threshold "
              f"micro {np.mean(mic):.4f} EF1 {ef['micro_f1']:.4f} / {ef['samples_f1']:.4f}")
