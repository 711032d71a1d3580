"""A run's validation probabilities predicted from the raw images at another input size.

Loads the run's saved model, predicts its validation rows (flip TTA as the run has it) with
images resized to SIZE px (the network takes any size), and saves the probabilities to
/tmp/RUN-SIZE.npz for score_sizes.py.

    COMP5329_DATA=path/to/comp5329 python tools/analysis/probs_at_size.py RUN SIZE

Run against commit cf1b1fe (2026-11-28) on v4 and v5 `cpu` models, and on v6's five seeds at
commit bb280f6 (2026-11-30). It uses mmtag.inference.predictor.Predictor internals (its config
and dataset), which may have moved since: check that commit out to rerun it exactly.
Results: docs/experiments.md, "Test-time augmentation".
"""

import os
import sys
from pathlib import Path

import numpy as np

from mmtag.allocator import keep_freed_memory
from mmtag.data.csv_io import read_csv
from mmtag.data.dataset import Split
from mmtag.inference.predictor import Predictor

keep_freed_memory()
run, size = sys.argv[1], int(sys.argv[2])
pred = Predictor.load(f"runs/{run}")
pred.config.data.image_size = size  # the transform reads it; the network takes any size
data = Path(os.environ.get("COMP5329_DATA", "comp5329"))  # the Kaggle folder: train.csv, data/
_, rows = Split.load(Path(f"runs/{run}/split.json")).apply(read_csv(data / "train.csv"))
ds = pred.dataset(rows, data / "data", str(data / "train.csv"))
np.savez(f"/tmp/{run}-{size}.npz", ids=np.array([r.image_id for r in rows]),
         probs=pred.probabilities(ds, 64, 1))
