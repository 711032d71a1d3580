"""Distillation on the demo data: soft targets, the teacher's cached probabilities, unlabelled
rows, honest validation, and the student as an ordinary run."""

import csv
import json

import numpy as np
import pytest
import torch

from conftest import TINY as BASE_TINY
from mmtag import api
from mmtag.config import load_config
from mmtag.data.csv_io import read_csv
from mmtag.data.demo import make_demo_data
from mmtag.inference.predictor import Predictor, predict_csv
from mmtag.training import distill, loop
from mmtag.training.distill import in_label_order, soft_targets, unlabeled_rows

# the cached path on both sides: image stages [0, 3) frozen and cached, as the CPU recipes do
TINY = [*BASE_TINY, "optim.lr=3e-3", "model.freeze_image=3", "cache.flip=true", "tta_flip=true",
        "amp=none"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    make_demo_data(d, n=48, seed=3, n_test=12)
    return d


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def teacher(demo, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "teacher"
    loop.fit(load_config(None, [*TINY, "optim.epochs=3", f"cache.dir={cache}"]), demo, out,
             progress=False)
    return out


def _student(teacher, demo, out, cache, *extra, unlabeled=None):
    return api.distill(teacher, demo, out, None, [*TINY, "optim.epochs=2", f"cache.dir={cache}",
                                                  *extra], unlabeled=unlabeled, progress=False)


def test_soft_targets_mix_the_teacher_into_labelled_rows_only():
    hard = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    teacher = np.array([[0.8, 0.4], [0.2, 0.6], [0.9, 0.1]])
    got = soft_targets(hard, teacher, labelled=2, alpha=0.25)
    want = torch.tensor([[0.95, 0.1], [0.05, 0.9], [0.9, 0.1]])
    assert torch.allclose(got, want)
    assert torch.equal(soft_targets(hard, teacher, 3, 0.0), hard)  # alpha 0: the labels alone


def test_teacher_columns_follow_the_students_labels(tmp_path):
    probs = np.array([[0.1, 0.2, 0.3]])
    assert in_label_order(probs, (1, 2, 3), (3, 1), tmp_path).tolist() == [[0.3, 0.1]]
    with pytest.raises(ValueError, match=r"does not know the label\(s\) \[4\]"):
        in_label_order(probs, (1, 2, 3), (1, 4), tmp_path)


def test_a_student_learns_from_the_teacher_and_is_an_ordinary_run(teacher, demo, cache,
                                                                   tmp_path, monkeypatch):
    out = tmp_path / "student"
    summary = _student(teacher, demo, out, cache, unlabeled=demo / "test.csv")
    cfg = load_config(out / "config.yaml")
    assert cfg.distill.teacher == str(teacher.resolve()) and cfg.distill.alpha == 0.5
    # the teacher's split: its validation rows validate the student, with their labels alone
    assert json.loads((out / "split.json").read_text()) == \
        json.loads((teacher / "split.json").read_text())
    assert summary["val_rows"] == 48 - len(json.loads((out / "split.json").read_text())["train"])
    # the teacher's probabilities were cached once; a second student reads them
    cached = list((cache / "teachers").glob("*.npy"))
    assert len(cached) == 1
    probs = np.load(cached[0])
    n_train, n_test = 48 - summary["val_rows"], len(read_csv(demo / "test.csv"))
    assert probs.shape[0] == n_train + n_test and ((probs > 0.01) & (probs < 0.99)).any()

    def no_scoring(*a, **k):
        raise AssertionError("the teacher ran again")

    monkeypatch.setattr(distill, "_score", no_scoring)
    _student(teacher, demo, tmp_path / "again", cache, "seed=1", unlabeled=demo / "test.csv")
    # an ordinary run: predict reads it as any other
    res = predict_csv(out, demo / "test.csv", demo / "data", tmp_path / "sub.csv")
    assert res["decision"] and len(read_csv(tmp_path / "sub.csv")) == n_test
    assert Predictor.load(out).config.distill.teacher


def test_the_student_fits_soft_targets(teacher, demo, tmp_path, monkeypatch):
    # a teacher sure of the labels (0.1 / 0.9; 0.5 on unlabelled rows): the student's loss on
    # such targets falls towards their entropy (0.325 a label) as it learns them
    def confident(t, rows, *a, **k):
        return np.stack([0.1 + 0.8 * t.label_map.encode(r.labels, "") for r in rows.records])

    monkeypatch.setattr(distill, "_score", confident)
    out = tmp_path / "s"
    _student(teacher, demo, out, tmp_path / "cache", "optim.epochs=6", "distill.alpha=1.0",
             "optim.lr=1e-2")
    with open(out / "metrics.csv") as f:
        losses = [float(r["train_loss"]) for r in csv.DictReader(f)]
    assert losses[-1] < losses[0] - 0.05, losses
    assert losses[-1] > 0.325  # soft targets: the loss cannot reach 0


def test_a_teacher_that_saw_the_validation_rows_is_refused(teacher, demo, cache, tmp_path):
    cfg = load_config(None, [*TINY, "optim.epochs=1", f"cache.dir={cache}", "data.split_seed=7",
                             f"distill.teacher={teacher}"])
    with pytest.raises(ValueError, match=r"trained on \d+ of this run's validation rows"):
        loop.fit(cfg, demo, tmp_path / "leaky", progress=False)


def test_unlabelled_rows_without_a_photo_are_left_out(demo, tmp_path, caplog):
    rows = read_csv(demo / "test.csv")
    (tmp_path / "data").mkdir()
    for r in rows[:3]:
        (tmp_path / "data" / r.image_id).write_bytes((demo / "data" / r.image_id).read_bytes())
    with caplog.at_level("INFO"):
        kept = unlabeled_rows(demo / "test.csv", tmp_path / "data")
    assert [r.image_id for r in kept] == [r.image_id for r in rows[:3]]
    assert f"3 of {len(rows)} rows have their photo" in caplog.text
    with pytest.raises(ValueError, match="no row of .* has its photo"):
        unlabeled_rows(demo / "test.csv", tmp_path)


def test_an_unfinished_or_missing_teacher_is_refused(tmp_path, demo):
    with pytest.raises(FileNotFoundError, match="holds no best.pt"):
        api.distill(tmp_path, demo, tmp_path / "out")


def test_the_distill_command(teacher, demo, cache, tmp_path, capsys):
    from mmtag.cli import main

    out = tmp_path / "cli"
    sets = [a for s in [*TINY, "optim.epochs=1", f"cache.dir={cache}"] for a in ("--set", s)]
    assert main(["distill", str(teacher), "--data", str(demo), "--out", str(out), *sets]) == 0
    printed = capsys.readouterr().out
    assert "validation" in printed and f"next: mmtag benchmark {out}" in printed
    assert load_config(out / "config.yaml").distill.teacher == str(teacher.resolve())
    assert main(["distill", "--data", str(demo), "--out", str(tmp_path / "x")]) == 2
    assert "distill needs TEACHER" in capsys.readouterr().err
