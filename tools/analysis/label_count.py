"""Is samples-F1 lost in the decision rule? Expected-F1 sets against (a) the oracle number of
labels per image, (b) a count model fitted on the probabilities + the exact F-measure maximiser
(GFM, Dembczynski et al. 2011), (c) per-class Platt scaling before expected-F1 sets.

(a) scores all validation rows; (b) and (c) are fitted on one seeded half of the validation
rows and scored on the other, both ways, averaged, at three regularisation strengths C.

    python tools/analysis/label_count.py RUN            # a folder under runs/; needs scikit-learn

Run against commit cf1b1fe (2026-11-28) on the v4 `cpu` model's two seeds. It imports
mmtag.training.metrics and mmtag.training.thresholds.expected_f1_sets, which may have moved
since: check that commit out to rerun it exactly. Results: docs/experiments.md, "Decision rules
and thresholds".
"""

import csv
import sys
import warnings

import numpy as np
from sklearn.linear_model import LogisticRegression

from mmtag.training.metrics import multilabel_metrics
from mmtag.training.thresholds import expected_f1_sets

warnings.filterwarnings("ignore")
with open(f"runs/{sys.argv[1]}/val_probs.csv") as f:
    rows = list(csv.reader(f))
y = np.array([[int(lab in r[1].split()) for lab in rows[0][2:]] for r in rows[1:]])
p = np.clip(np.array([[float(x) for x in r[2:]] for r in rows[1:]]), 1e-6, 1 - 1e-6)
n, m = y.shape


def sf1(yy, d):
    return multilabel_metrics(yy, d)["samples_f1"]


def pb(p):  # Poisson-binomial: (n, m + 1) probabilities of 0..m labels present
    d = np.zeros((len(p), m + 1))
    d[:, 0] = 1
    for j in range(p.shape[1]):
        d[:, 1:] = d[:, 1:] * (1 - p[:, j:j + 1]) + d[:, :-1] * p[:, j:j + 1]
        d[:, 0] *= 1 - p[:, j]
    return d


def joint(p, q):  # P(y_i = 1, count = s) from the marginals and a count distribution q (n, m + 1)
    full, P = pb(p), np.zeros((len(p), m, m + 1))
    for i in range(m):
        rest = pb(np.delete(p, i, 1))[:, :m]  # the other labels: 0..m-1 present
        P[:, i, 1:] = q[:, 1:] * p[:, i:i + 1] * rest / np.maximum(full[:, 1:], 1e-300)
    return P


def gfm(P):  # the label set of each size k with the highest expected F1, then the best k >= 1
    s, k = np.arange(m + 1), np.arange(1, m + 1)
    D = 2 * P @ (1.0 / (s[:, None] + k[None, :]))  # (n, label, size)
    out = np.zeros((len(P), m), int)
    for r in range(len(P)):
        kk = np.argmax([np.sort(D[r, :, j])[::-1][:j + 1].sum() for j in range(m)])
        out[r, np.argsort(-D[r, :, kk])[:kk + 1]] = 1
    return out


count = y.sum(1)
print("expected-F1 sets", round(sf1(y, expected_f1_sets(p, at_least_one=True)), 4),
      "| oracle count", round(sf1(y, gfm(joint(p, np.eye(m + 1)[count]))), 4))
X = np.concatenate([np.log(p / (1 - p)), np.log(pb(p)[:, :7])], 1)
perm = np.random.default_rng(0).permutation(n)
halves = [perm[: n // 2], perm[n // 2:]]
for C in (0.01, 0.1, 1.0):
    r = []
    for a, b in (halves, halves[::-1]):
        clf = LogisticRegression(C=C, max_iter=5000).fit(X[a], np.minimum(count[a], 6))
        q = np.zeros((len(b), m + 1))
        q[:, clf.classes_] = clf.predict_proba(X[b])
        cal = np.column_stack([LogisticRegression(C=C).fit(X[a, i:i + 1], y[a, i])
                               .predict_proba(X[b, i:i + 1])[:, 1] for i in range(m)])
        r.append((sf1(y[b], expected_f1_sets(p[b], at_least_one=True)),
                  sf1(y[b], gfm(joint(p[b], q))),
                  sf1(y[b], expected_f1_sets(cal, at_least_one=True))))
    print(f"C={C}: expected-F1 sets, count model + GFM, Platt + expected-F1 sets",
          np.round(np.mean(r, 0), 4))
