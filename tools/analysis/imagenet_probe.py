"""A linear probe on imagenet_features.py's ImageNet class logits (/tmp/imagenet-feats.npz:
standardised; AdamW 3e-3, weight decay 1e-2, 30 epochs of batch 128, a random view per sample;
validation logits averaged over the two views), scored alone and added to a run's validation
logits at weights 0.1-0.5: threshold-rule micro-F1 (20 random halvings, at-least-one rule),
expected-F1 sets' micro / samples-F1, BCE.

    COMP5329_DATA=path/to/comp5329 python tools/analysis/imagenet_probe.py RUN

Run against commit 380839d (2026-11-30) on v6 (seed 0) ("probe.py"; it read
/tmp/imnet-feats.npz). It imports mmtag.data.csv_io, mmtag.training.thresholds and metrics,
which may have moved since: check that commit out to rerun it exactly.
Results: docs/experiments.md, "Image encoder and resolution".
"""

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from mmtag.data.csv_io import read_csv
from mmtag.training.metrics import multilabel_metrics
from mmtag.training.thresholds import apply_thresholds, choose_thresholds, expected_f1_sets

torch.manual_seed(0)
D = Path(os.environ.get("COMP5329_DATA", "comp5329"))  # the Kaggle folder: train.csv, data/
run = f"runs/{sys.argv[1]}"
F = np.load("/tmp/imagenet-feats.npz")
recs = {r.image_id: r for r in read_csv(D / "train.csv")}
split = json.loads(Path(f"{run}/split.json").read_text())
with open(f"{run}/val_probs.csv") as fh:
    rows = list(csv.reader(fh))
labels = [int(lab) for lab in rows[0][2:]]


def Y(ids):
    return np.array([[lab in recs[i].labels for lab in labels] for i in ids], np.float32)


ytr, yva = Y(split["train"]), Y(split["val"])
pv = np.clip(np.array([[float(x) for x in r[2:]] for r in rows[1:]]), 1e-6, 1 - 1e-6)
xtr, xva = (F[k].astype(np.float32).reshape(len(F[k]), 2, -1) for k in ("train", "val"))
mu, sd = xtr.reshape(-1, 2000).mean(0), xtr.reshape(-1, 2000).std(0) + 1e-3
xtr, xva, yt = torch.tensor((xtr - mu) / sd), torch.tensor((xva - mu) / sd), torch.tensor(ytr)
net = torch.nn.Linear(2000, 18)
opt = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=1e-2)
for _epoch in range(30):
    perm = torch.randperm(len(xtr))
    for s in range(0, len(perm), 128):
        i = perm[s:s + 128]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            net(xtr[i, torch.randint(0, 2, (len(i),))]), yt[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
with torch.no_grad():
    lv = ((net(xva[:, 0]) + net(xva[:, 1])) / 2).numpy()


def score(p, name):
    mic = []
    for s in range(20):
        perm = np.random.default_rng(s).permutation(len(yva))
        h = (perm[:2000], perm[2000:])
        for a, b in (h, h[::-1]):
            g = choose_thresholds(yva[a], p[a], mode="global", metric="micro_f1", at_least_one=True)
            mic.append(multilabel_metrics(yva[b], apply_thresholds(p[b], g, True))["micro_f1"])
    ef = multilabel_metrics(yva, expected_f1_sets(p, True))
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    print(name, f"threshold micro {np.mean(mic):.4f} EF1 {ef['micro_f1']:.4f} / {ef['samples_f1']:.4f} "
          f"BCE {-np.mean(yva * np.log(pc) + (1 - yva) * np.log(1 - pc)):.4f}")


def sig(z):
    return 1 / (1 + np.exp(-z))


score(sig(lv), "probe")
for w in (0.1, 0.2, 0.3, 0.5):
    score(sig(np.log(pv / (1 - pv)) + w * lv), f"run + {w} x probe")
