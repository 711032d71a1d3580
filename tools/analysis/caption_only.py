"""Rows whose photo is missing: the first N validation rows of a run predicted without their
photos, by the caption head alone (what `mmtag predict --caption-only-missing` does) and by the
whole model with a blank image in place of every photo (what it did before a8665fa). Prints
micro-F1 / samples-F1 with expected-F1 sets and with the run's saved thresholds.

    COMP5329_DATA=path/to/comp5329 python tools/analysis/caption_only.py RUN N

Run against commit a8665fa (2026-11-30) on v6 (seed 0), N = 1000. It uses
mmtag.inference.predictor.Predictor (dataset, caption_probabilities, probabilities,
thresholds), which may have moved since: check that commit out to rerun it exactly.
Results: docs/experiments.md, "Captions without photos".
"""

import os
import sys
from pathlib import Path

from mmtag.data.csv_io import read_csv
from mmtag.data.dataset import Split
from mmtag.inference.predictor import Predictor
from mmtag.training.metrics import multilabel_metrics
from mmtag.training.thresholds import apply_thresholds, expected_f1_sets

DATA = Path(os.environ.get("COMP5329_DATA", "comp5329"))  # the Kaggle folder: train.csv, data/
run, n = sys.argv[1], int(sys.argv[2])
pred = Predictor.load(f"runs/{run}")
_, rows = Split.load(Path(f"runs/{run}/split.json")).apply(read_csv(DATA / "train.csv"))
ds = pred.dataset(rows[:n], "/nonexistent", "val", blank_missing_images=True)
y = ds.targets.numpy().astype(int)
for name, p in (("caption head", pred.caption_probabilities(ds)),
                ("blank image, whole model", pred.probabilities(ds))):
    ef = multilabel_metrics(y, expected_f1_sets(p, True))
    th = multilabel_metrics(y, apply_thresholds(p, pred.thresholds, True))
    print(f"{name}: expected-F1 sets micro {ef['micro_f1']:.4f} samples {ef['samples_f1']:.4f}; "
          f"the run's threshold micro {th['micro_f1']:.4f} samples {th['samples_f1']:.4f}")
