"""`mmtag ensemble`: members' probabilities averaged, shared weights stored once, mismatched
members refused."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch

from conftest import TINY as BASE_TINY
from mmtag.cli import main
from mmtag.config import load_config
from mmtag.data.csv_io import read_csv
from mmtag.inference.ensemble import build_ensemble
from mmtag.inference.export import export_run
from mmtag.inference.onnx_engine import OnnxPredictor
from mmtag.inference.predictor import Predictor, evaluate_run, predict_csv
from mmtag.prediction.checkpoint import ModelTooLargeError, atomic_save
from mmtag.training import loop

# image stages 0-2 frozen and cached: with one seed, the members' frozen weights are equal
TINY = [*BASE_TINY, "model.freeze_image=3", "optim.epochs=1", "data.lemmatizer=none"]


@pytest.fixture(scope="module")
def runs(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cache = f"cache.dir={root / 'cache'}"
    for name, extra in (("a", "optim.lr=1e-3"), ("b", "optim.lr=3e-3"),
                        ("other_size", "data.image_size=64"), ("other_split", "data.split_seed=5")):
        loop.fit(load_config(None, [*TINY, cache, extra]), demo, root / name, progress=False)
    return root


def test_a_member_saved_by_an_older_version_joins_an_ensemble(runs, tmp_path):
    """A run saved before options were removed and before the lemmatizer was a choice (its
    config holds the removed keys at their off values and data.lemmatize, its vocabulary
    "lemmas") is the same model as today's, and is averaged with one."""
    from mmtag.config import REMOVED_OPTIONS

    old = tmp_path / "old"
    shutil.copytree(runs / "b", old)
    ck = torch.load(old / "best.pt", weights_only=True)
    for key, (off, _) in REMOVED_OPTIONS.items():
        *section, name = key.split(".")
        (ck["config"][section[0]] if section else ck["config"])[name] = off
    assert ck["config"]["data"].pop("lemmatizer") == "none"
    ck["config"]["data"]["lemmatize"] = False
    assert ck["caption"].pop("lemmatizer") == "none"
    ck["caption"]["lemmas"] = False
    atomic_save(ck, old / "best.pt")
    summary = build_ensemble([runs / "a", old], tmp_path / "ens")
    assert summary["val_rows"] == len(_val_probs(old / "val_probs.csv")[0])


def _val_probs(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return [r[:2] for r in rows[1:]], np.array([[float(x) for x in r[2:]] for r in rows[1:]])


def test_ensemble_averages_its_members(runs, demo, tmp_path):
    a, b, out = runs / "a", runs / "b", tmp_path / "ens"
    summary = build_ensemble([a, b], out)
    # the frozen stages are stored once: smaller than the two files, larger than one
    assert summary["shared_tensors"] > 0
    size = (out / "best.pt").stat().st_size
    assert (a / "best.pt").stat().st_size < size
    assert size < (a / "best.pt").stat().st_size + (b / "best.pt").stat().st_size - 10_000
    # validation probabilities: the members' mean; the thresholds are chosen on them
    rows, p = _val_probs(out / "val_probs.csv")
    rows_a, pa = _val_probs(a / "val_probs.csv")
    _, pb = _val_probs(b / "val_probs.csv")
    assert rows == rows_a and not np.allclose(pa, pb)
    np.testing.assert_allclose(p, (pa + pb) / 2, atol=1e-5)
    assert summary["val_rows"] == len(rows) and "micro_f1" in summary["val_crossfit"]
    # predicting from raw images: the mean of what each member predicts
    test_rows = read_csv(demo / "test.csv")
    preds = [Predictor.load(r) for r in (out, a, b)]
    assert len(preds[0].models) == 2
    probs = [pr.probabilities(pr.dataset(test_rows, demo / "data")) for pr in preds]
    np.testing.assert_allclose(probs[0], (probs[1] + probs[2]) / 2, atol=1e-5)
    pairs = [(demo / "data" / r.image_id, r.caption) for r in test_rows[:3]]
    sub = tmp_path / "Predicted_labels.csv"
    predict_csv(out, demo / "test.csv", demo / "data", sub)
    assert [tuple(map(str, r.labels)) for r in read_csv(sub)[:3]] == preds[0].predict(pairs)
    # evaluate reads the ensemble's split and reports its cross-fit estimate
    m = evaluate_run(out, data_dir=demo)
    assert m["rows"] == len(rows) and "crossfit" in m


def test_an_exported_ensemble_averages_its_members_in_one_graph(runs, demo, tmp_path):
    out = tmp_path / "ens"
    build_ensemble([runs / "a", runs / "b"], out)
    export_run(out, out / "export")
    test_rows = read_csv(demo / "test.csv")
    # the ONNX graph is fp32: compare with fp32 torch (amp: auto is bf16 on a CPU with it)
    torch_pred = Predictor.load(out, "cpu", amp="none")
    onnx_pred = OnnxPredictor.load(out, "onnx")
    assert onnx_pred.describe()["model"]["members"] == 2
    expected = torch_pred.probabilities(torch_pred.dataset(test_rows, demo / "data"))
    got = onnx_pred.probabilities(onnx_pred.dataset(test_rows, demo / "data"))
    assert np.abs(got - expected).max() < 1e-4


def test_ensemble_refuses_members_that_do_not_fit(runs, tmp_path, capsys):
    a = runs / "a"
    with pytest.raises(ValueError, match="data.image_size: 32 against 64"):
        build_ensemble([a, runs / "other_size"], tmp_path / "e1")
    with pytest.raises(ValueError, match="split.json differs"):
        build_ensemble([a, runs / "other_split"], tmp_path / "e2")
    with pytest.raises(ValueError, match="at least two runs"):
        build_ensemble([a], tmp_path / "e3")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        build_ensemble([a, runs / "b"], runs)
    ens = tmp_path / "ens"
    build_ensemble([a, runs / "b"], ens)
    with pytest.raises(ValueError, match="is an ensemble already"):
        build_ensemble([ens, a], tmp_path / "e4")
    # the size limit (model.max_size_mb) holds for the ensemble as a whole
    small = []
    for name in ("a", "b"):
        copy = tmp_path / f"small_{name}"
        shutil.copytree(runs / name, copy)
        ck = torch.load(copy / "best.pt", weights_only=True)
        ck["config"]["model"]["max_size_mb"] = 0.001
        atomic_save(ck, copy / "best.pt")
        small.append(copy)
    with pytest.raises(ModelTooLargeError, match="over the limit of 0.001 MB"):
        build_ensemble(small, tmp_path / "e5")
    # the command line
    assert main(["ensemble", str(a), str(runs / "b"), "--out", str(tmp_path / "e6")]) == 0
    assert "ensemble of 2 runs" in capsys.readouterr().out
