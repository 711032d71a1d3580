"""A run folder written by an earlier mmtag (tests/fixtures/run-2026-12-07) still loads,
predicts as it did when it was written, is evaluated, reported on and exported."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from mmtag.data.csv_io import read_csv
from mmtag.data.demo import make_demo_data
from mmtag.evaluation.probs_csv import read_val_probs
from mmtag.inference.predictor import evaluate_run, predict_csv
from mmtag.inference.torch_engine import Predictor
from mmtag.prediction.checkpoint import BestCheckpoint

OLD = Path(__file__).parent / "fixtures" / "run-2026-12-07"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    # the data it was trained on (tests/fixtures/README.md)
    d = tmp_path_factory.mktemp("demo")
    make_demo_data(d, n=40, seed=7, n_test=4)
    return d


@pytest.fixture
def old_run(tmp_path):
    # a copy: nothing a test does may change the fixture
    run = tmp_path / "old"
    shutil.copytree(OLD, run)
    return run


def test_its_best_pt_reads_as_the_typed_schema(old_run):
    best = BestCheckpoint.load(old_run / "best.pt")
    assert best.finished and best.epoch in (1, 2) and best.ensemble is None
    assert len(best.thresholds) == len(best.labels["labels"]) and len(best.states()) == 1
    assert best.config["model"]["image_encoder"] == "none"


def test_it_predicts_what_it_wrote_in_val_probs(old_run, demo):
    pred = Predictor.load(old_run, "cpu")
    saved = read_val_probs(old_run)
    rows = {r.image_id: r for r in read_csv(demo / "train.csv")}
    probs = pred.probabilities(pred.dataset([rows[i] for i in saved.image_ids], demo / "data"))
    assert probs.shape == saved.probs.shape
    assert np.abs(probs - saved.probs).max() < 1e-5


def test_it_is_evaluated_and_predicts_a_csv(old_run, demo, tmp_path):
    m = evaluate_run(old_run, data_dir=demo)
    assert 0 <= m["micro_f1"] <= 1 and m["tuned_on_these_rows"]
    res = predict_csv(old_run, demo / "test.csv", demo / "data", tmp_path / "sub.csv")
    assert len(read_csv(tmp_path / "sub.csv")) == 4 and res["decision"]


def test_it_is_reported_on_and_exported(old_run, demo, tmp_path):
    from mmtag.inference.export import export_run
    from mmtag.inference.onnx_engine import OnnxPredictor
    from mmtag.reporting.report import write_report

    write_report(old_run, data_dir=demo, out=tmp_path / "report")
    assert "mmtag report" in (tmp_path / "report" / "report.html").read_text()
    export_run(old_run, tmp_path / "export")
    onnx = OnnxPredictor.load(tmp_path / "export", "onnx")
    rows = read_csv(demo / "test.csv")
    pred = Predictor.load(old_run, "cpu")
    torch_probs = pred.probabilities(pred.dataset(rows, demo / "data", with_targets=False))
    assert np.abs(onnx.probabilities(onnx.dataset(rows, demo / "data", with_targets=False))
                  - torch_probs).max() < 1e-4


def test_a_run_made_with_multi_scale_tta_predicts_at_its_training_size(old_run, demo, caplog):
    import torch

    from mmtag.prediction.checkpoint import atomic_save

    ck = torch.load(old_run / "best.pt", weights_only=True)
    ck["config"]["tta_sizes"] = [40]  # as a run of e2ba04c or before could hold it
    atomic_save(ck, old_run / "best.pt")
    with caplog.at_level("WARNING"):
        pred = Predictor.load(old_run, "cpu")
    assert "multi-scale TTA (tta_sizes=[40])" in caplog.text and pred.image_size is None
