"""Resuming a cached-feature run with the real pretrained encoder ends exactly like an
uninterrupted run: the frozen stages that fill the cache must hold the checkpoint's weights."""

import csv
import json
import shutil

import pytest

from mmtag.config import load_config, recipe_path
from mmtag.inference.predictor import evaluate_run
from mmtag.training import loop

# the demo recipe's shape (pretrained Lite0, stages [0, 5) frozen and cached), made small
CACHED = ["data.image_size=64", "data.num_workers=0", "model.lstm_hidden=8", "model.hidden=16",
          "optim.batch_size=8", "optim.epochs=3", "data.len_quantile=1.0", "tta_flip=true"]
FIGURES = ("best_epoch", "decision", "thresholds", "val_at_0.5", "val", "val_crossfit",
           "val_crossfit_other_rule", "per_class", "tta", "saved_model_mb", "val_rows",
           "train_rows", "model_mb")


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory):
    """An uninterrupted cached run, and its cache folder."""
    root = tmp_path_factory.mktemp("ref")
    cfg = load_config(recipe_path("demo"), [*CACHED, f"cache.dir={root / 'cache'}"])
    loop.fit(cfg, demo, root / "run", progress=False)
    return root / "run", cfg


def figures(run):
    s = json.loads((run / "summary.json").read_text())
    return {k: s[k] for k in FIGURES}


def metrics(run):
    """metrics.csv without its timings."""
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def assert_same_run(a, b):
    assert (a / "val_probs.csv").read_bytes() == (b / "val_probs.csv").read_bytes()
    assert metrics(a) == metrics(b)
    assert figures(a) == figures(b)


def test_the_reference_run_caches_pretrained_features(reference):
    run, cfg = reference
    assert cfg.model.pretrained and cfg.model.freeze_image == "5"
    assert any((run.parent / "cache").rglob("*.npy"))
    assert figures(run)["val"]["micro_f1"] > 0.3  # pretrained features: well above chance


def test_resuming_a_finished_cached_run_changes_nothing(reference, demo, tmp_path):
    run, cfg = reference
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    loop.fit(cfg, demo, copy, resume=True, progress=False)
    assert_same_run(run, copy)
    assert evaluate_run(copy, data_dir=demo)["micro_f1"] == pytest.approx(
        figures(run)["val"]["micro_f1"], abs=1e-6)


def test_a_cached_run_interrupted_mid_epoch_resumes_byte_identical(reference, demo, tmp_path,
                                                                   monkeypatch):
    run, cfg = reference
    real = loop.train_one_epoch
    calls = {"n": 0}

    def crash_in_epoch_2(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "train_one_epoch", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        loop.fit(cfg, demo, tmp_path / "cut", progress=False)
    monkeypatch.setattr(loop, "train_one_epoch", real)
    loop.fit(cfg, demo, tmp_path / "cut", resume=True, progress=False)
    assert_same_run(run, tmp_path / "cut")
