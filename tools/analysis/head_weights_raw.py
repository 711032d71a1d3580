"""Each head's logits on a run's validation rows, computed from the raw images (flip TTA), then
weighted averages of the fused, image and caption heads' logits.

It records what Tagger.forward_all returns while mmtag's evaluate_run scores the run's
validation rows, averages each head's logits over the original and mirrored image, and scores
the weights (fused, image, caption) (1,0,0) ... (3,1,1): cross-fit threshold rule and
expected-F1 sets (as summary.json computes them), micro-F1 at 0.5, BCE.

    COMP5329_DATA=path/to/comp5329 python tools/analysis/head_weights_raw.py RUN

Run against commit 356268f (2026-11-27) on the v4 `cpu` model (label queries, three heads).
It monkeypatches mmtag.models.tagger.Tagger.forward and imports mmtag.inference.predictor and
the private mmtag.training.loop._crossfit, all of which may have moved since: check that commit
out to rerun it exactly. Results: docs/experiments.md, "Heads".
"""

import csv
import os
import sys

import numpy as np

import mmtag.models.tagger as T
from mmtag.config import load_config
from mmtag.inference.predictor import evaluate_run
from mmtag.training.loop import _crossfit
from mmtag.training.metrics import multilabel_metrics

DATA = os.environ.get("COMP5329_DATA", "comp5329")  # the Kaggle folder: train.csv, data/
rec = []


def forward(self, images, ids, lengths):
    out = self.forward_all(images, ids, lengths)
    rec.append({k: v.detach().float().numpy() for k, v in out.items()})
    return out["logits"]


T.Tagger.forward = forward
evaluate_run(f"runs/{sys.argv[1]}", data_dir=DATA)
h = {k: np.concatenate([(a[k] + b[k]) / 2 for a, b in zip(rec[::2], rec[1::2], strict=False)])
     for k in rec[0]}
with open(f"runs/{sys.argv[1]}/val_probs.csv") as f:  # the same rows, same order
    rows = list(csv.reader(f))
y = np.array([[int(lab in r[1].split()) for lab in rows[0][2:]] for r in rows[1:]])
for w in [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1), (2, 1, 1), (1, 1, 0.5), (3, 1, 1)]:
    p = 1 / (1 + np.exp(-(w[0] * h["fused"] + w[1] * h["image"] + w[2] * h["text"]) / sum(w)))
    out = []
    for rule, alo in (("threshold", "false"), ("expected_f1", "true")):
        c = _crossfit(load_config(None, [f"decision={rule}", f"at_least_one={alo}"]), y, p, rule)
        out += [round(c["micro_f1"], 4), round(c["samples_f1"], 4)]
    bce = -np.mean(y * np.log(np.clip(p, 1e-7, 1)) + (1 - y) * np.log(np.clip(1 - p, 1e-7, 1)))
    print(w, out, round(multilabel_metrics(y, (p >= 0.5).astype(int))["micro_f1"], 4), round(bce, 4))
