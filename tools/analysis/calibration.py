"""Per-class recalibration (Platt scaling) before the decision rules: each class's
probabilities refitted on one half of the validation rows as p' = sigmoid(s_c logit(p) + b_c)
by log-loss with an L2 penalty lambda toward the identity (bias only, "b", or log-scale and
bias, "ab"; lambda 1, 10, 100), then the global threshold (micro-F1, at-least-one) and
expected-F1 sets on the other half; both ways, 20 random halvings, averaged. Prints per setting:
threshold-rule micro-F1, expected-F1 micro-F1, samples-F1.

    python tools/analysis/calibration.py RUN ...             # folders under runs/

Run against commit 0f8d58f (2026-12-01) on v6's five seeds and on the GPU check's seven runs
("calib.py"). It imports mmtag.training.thresholds and metrics, which may have moved since:
check that commit out to rerun it exactly. Results: docs/experiments.md, "Decision rules and
thresholds".
"""

import csv
import sys

import numpy as np
import torch

from mmtag.training.metrics import multilabel_metrics
from mmtag.training.thresholds import apply_thresholds, choose_thresholds, expected_f1_sets


def load(run):
    with open(f"runs/{run}/val_probs.csv") as fh:
        rows = list(csv.reader(fh))
    y = np.array([[int(lab in r[1].split()) for lab in rows[0][2:]] for r in rows[1:]])
    return y, np.array([[float(x) for x in r[2:]] for r in rows[1:]])


def fit(z, y, mode, lam):
    z, y = torch.tensor(z), torch.tensor(y, dtype=torch.float64)
    a = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)  # log-scale
    b = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        s = a.exp() if mode == "ab" else torch.ones_like(a)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z * s + b, y, reduction="sum")
        loss = loss + lam * (a.pow(2).sum() + b.pow(2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    s = a.exp() if mode == "ab" else torch.ones_like(a)
    return s.detach().numpy(), b.detach().numpy()


def recalibrated(z, s, c):
    return 1 / (1 + np.exp(-(z * s + c)))


for run in sys.argv[1:]:
    y, p = load(run)
    z = np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1))
    res = {}
    for seed in range(20):
        perm = np.random.default_rng(seed).permutation(len(y))
        h = (perm[:len(y) // 2], perm[len(y) // 2:])
        for a, b in (h, h[::-1]):
            for key in [("none", 0)] + [(m, lam) for m in ("b", "ab") for lam in (1.0, 10.0, 100.0)]:
                if key[0] == "none":
                    pa, pb = p[a], p[b]
                else:
                    s, c = fit(z[a], y[a], *key)
                    pa, pb = recalibrated(z[a], s, c), recalibrated(z[b], s, c)
                g = choose_thresholds(y[a], pa, mode="global", metric="micro_f1", at_least_one=True)
                mt = multilabel_metrics(y[b], apply_thresholds(pb, g, True))["micro_f1"]
                ef = multilabel_metrics(y[b], expected_f1_sets(pb, True))
                res.setdefault(key, []).append((mt, ef["micro_f1"], ef["samples_f1"]))
    print(run, " | ".join(f"{k[0]}/{k[1]:g}: " + " ".join(f"{x:.4f}" for x in np.mean(v, 0))
                          for k, v in res.items()), flush=True)
