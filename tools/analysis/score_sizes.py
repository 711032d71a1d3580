"""Score a run's cached-path validation probabilities, those predicted at other sizes
(probs_at_size.py's /tmp/RUN-SIZE.npz files), and their average (multi-scale TTA).

Per set: [threshold-rule micro-F1, samples-F1, expected-F1 micro-F1, samples-F1] cross-fit as
summary.json computes it (threshold rule without the at-least-one rule; expected-F1 sets with
it), micro-F1 at 0.5, BCE.

    python tools/analysis/score_sizes.py RUN /tmp/RUN-384.npz [/tmp/RUN-512.npz ...]

Run against commit cf1b1fe (2026-11-28) and b8eaf23; for v6's five seeds (bb280f6) it ran with
at_least_one=true for the threshold rule too, as those runs decide. It imports the private
mmtag.training.loop._crossfit, which may have moved or changed since: check that commit out to
rerun it exactly. Results: docs/experiments.md, "Test-time augmentation".
"""

import csv
import sys

import numpy as np

from mmtag.config import load_config
from mmtag.training.loop import _crossfit
from mmtag.training.metrics import multilabel_metrics

with open(f"runs/{sys.argv[1]}/val_probs.csv") as f:
    rows = list(csv.reader(f))
ids = [r[0] for r in rows[1:]]
y = np.array([[int(lab in r[1].split()) for lab in rows[0][2:]] for r in rows[1:]])
sets = {"cached": np.array([[float(x) for x in r[2:]] for r in rows[1:]])}
for path in sys.argv[2:]:
    z = np.load(path)
    pos = {k: i for i, k in enumerate(z["ids"])}
    sets[path] = z["probs"][[pos[k] for k in ids]]
sets["mean"] = np.mean(list(sets.values()), 0)
for name, p in sets.items():
    out = []
    for rule, alo in (("threshold", "false"), ("expected_f1", "true")):
        c = _crossfit(load_config(None, [f"decision={rule}", f"at_least_one={alo}"]), y, p, rule)
        out += [round(c["micro_f1"], 4), round(c["samples_f1"], 4)]
    bce = -np.mean(y * np.log(np.clip(p, 1e-7, 1)) + (1 - y) * np.log(np.clip(1 - p, 1e-7, 1)))
    print(name, out, round(multilabel_metrics(y, (p >= 0.5).astype(int))["micro_f1"], 4), round(bce, 4))
