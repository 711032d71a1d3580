"""The README's first command: the demo trains a model that clearly learns (takes ~2-3 min)."""

import numpy as np
import pytest

from mmtag.demo import run_demo
from mmtag.evaluation.metrics import multilabel_metrics


def best_constant_micro_f1(y: np.ndarray) -> float:
    """Best micro-F1 of predicting one fixed label set for every image: the optimal set is a
    prefix of the labels sorted by frequency."""
    order = np.argsort(-y.sum(0))
    best = 0.0
    for k in range(1, y.shape[1] + 1):
        pred = np.zeros_like(y)
        pred[:, order[:k]] = 1
        best = max(best, multilabel_metrics(y, pred)["micro_f1"])
    return best


@pytest.mark.slow  # the whole demo: about 1.5 minutes on 2 cores
def test_demo_beats_the_best_constant_prediction_by_a_wide_margin(tmp_path, capsys):
    res = run_demo(tmp_path / "demo", progress=False)
    out = capsys.readouterr().out
    assert "Predicted_labels.csv" in out and (tmp_path / "demo" / "Predicted_labels.csv").exists()
    val_targets = res["val"]
    from mmtag.data.csv_io import read_csv
    from mmtag.data.dataset import Split

    split = Split.load(tmp_path / "demo" / "run" / "split.json")
    _, rows = split.apply(read_csv(tmp_path / "demo" / "data" / "train.csv"))
    labels = sorted({lab for r in rows for lab in r.labels})
    y = np.array([[int(lab in r.labels) for lab in labels] for r in rows])
    baseline = best_constant_micro_f1(y)
    assert 0.4 < baseline < 0.7
    assert val_targets["micro_f1"] > baseline + 0.2, (val_targets["micro_f1"], baseline)
    assert res["test"]["micro_f1"] > baseline + 0.2
    # it ends with the run's report, whose final table holds the run's own figure
    assert str(res["report"]) in out and res["report"].name == "report.html"
    md = (res["report"].parent / "report.md").read_text()
    assert f"{res['summary']['val_crossfit']['micro_f1']:.4f}" in md
