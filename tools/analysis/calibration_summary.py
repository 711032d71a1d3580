"""summary.json's cross-fit figures of a run's saved validation probabilities (the trainer's
own seeded halves, both ways), without and with the per-class recalibration option
`calibration: per_class`: threshold-rule micro-F1 / expected-F1 samples-F1 (and expected-F1
micro-F1).

    python tools/analysis/calibration_summary.py RUN ...     # folders under runs/

Needs commit 48eab5a (2026-12-01), the only commit with the `calibration` option (removed again
in f3f5e95): check it out to run this ("calsum.py"). It imports mmtag.config.TrainConfig and the
private mmtag.training.loop._crossfit of that commit. Results: docs/experiments.md, "Decision
rules and thresholds".
"""

import csv
import dataclasses
import sys

import numpy as np
import yaml

from mmtag.config import TrainConfig
from mmtag.training.loop import _crossfit

for run in sys.argv[1:]:
    with open(f"runs/{run}/val_probs.csv") as fh:
        rows = list(csv.reader(fh))
    y = np.array([[int(lab in r[1].split()) for lab in rows[0][2:]] for r in rows[1:]])
    p = np.array([[float(x) for x in r[2:]] for r in rows[1:]])
    with open(f"runs/{run}/config.yaml") as fh:
        cfg = TrainConfig.from_dict(yaml.safe_load(fh))
    out = []
    for cal in ("none", "per_class"):
        c = dataclasses.replace(cfg, calibration=cal)
        t, e = _crossfit(c, y, p, "threshold"), _crossfit(c, y, p, "expected_f1")
        out.append(f"{cal}: {t['micro_f1']:.4f} / {e['samples_f1']:.4f} (EF1 micro {e['micro_f1']:.4f})")
    print(run, " | ".join(out), flush=True)
