"""Anyone's data: tables (CSV with a header, JSON Lines, Parquet) and DataFrames with string
labels, end to end on the product-style demo (train -> evaluate -> predict -> report -> serve),
and the command line's conventions (exit codes, --version, help, next steps)."""

import csv
import json
import os
import signal

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

import mmtag
from conftest import TINY, comp5329_dir
from mmtag.cli import build_parser, main
from mmtag.config import load_config
from mmtag.data.demo import make_table_demo
from mmtag.data.sources import Columns, DataSourceError, open_data, open_rows, read_table
from mmtag.evaluation.estimate import choose_rule
from mmtag.inference.onnx_engine import OnnxPredictor  # noqa: F401 (the engines load lazily)
from mmtag.inference.torch_engine import Predictor
from mmtag.serving.app import ServeOptions, create_app

pytestmark = pytest.mark.xdist_group("tables")

COLS = ["--image-col", "path", "--caption-col", "title", "--labels-col", "tags"]
RUN = [*TINY, "optim.epochs=2"]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    d = tmp_path_factory.mktemp("catalogue")
    make_table_demo(d, n=48, seed=1)
    return d


@pytest.fixture(scope="module")
def run(catalogue, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cat"
    argv = ["-q", "train", "--data", str(catalogue / "catalogue.csv"), *COLS, "--images",
            str(catalogue / "photos"), "--out", str(out), "--config", "demo"]
    for s in RUN:
        argv += ["--set", s]
    assert main(argv) == 0
    return out


# ---- reading tables ----------------------------------------------------------------------


def _table_rows():
    return [{"image": "a/1.jpg", "caption": 'a "red" dress, long', "labels": "dress|red"},
            {"image": "b/1.jpg", "caption": "running shoes", "labels": "running shoes"},
            {"image": "c.jpg", "caption": "", "labels": ""}]


def test_csv_jsonl_and_parquet_tables_read_the_same_rows(tmp_path):
    rows = _table_rows()
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    with (tmp_path / "t.jsonl").open("w") as f:
        for r in rows:  # JSON Lines may hold the labels as a list
            f.write(json.dumps({**r, "labels": [x for x in r["labels"].split("|") if x]}) + "\n")
    pd.DataFrame(rows).to_parquet(tmp_path / "t.parquet")
    got = [read_table(tmp_path / f"t.{k}", Columns()) for k in ("csv", "jsonl", "parquet")]
    for other in got[1:]:
        assert [(r.image_id, r.labels, r.caption) for r in other] == \
               [(r.image_id, r.labels, r.caption) for r in got[0]]
    assert [r.labels for r in got[0]] == [("dress", "red"), ("running shoes",), ()]
    assert got[0][0].caption == 'a "red" dress, long' and got[0][0].line == 2


def test_a_wrong_column_name_lists_the_columns_found(tmp_path):
    (tmp_path / "t.csv").write_text("path,title,tags\nx.jpg,a cat,cat\n")
    with pytest.raises(DataSourceError, match=r"no column 'image', 'caption'.*'path', 'title', "
                                              r"'tags'.*--image-col, --caption-col"):
        read_table(tmp_path / "t.csv", Columns(), need_labels=False)
    rows = read_table(tmp_path / "t.csv", Columns("path", "title", "tags"), need_labels=True)
    assert rows[0].labels == ("cat",)


def test_table_mistakes_name_the_line(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("image,caption,labels\nx.jpg,a,b\nx.jpg,c,d\n")
    with pytest.raises(DataSourceError, match=r"line 3: x.jpg is also on line 2"):
        read_table(f, Columns())
    f.write_text("image,caption,labels\n,a,b\n")
    with pytest.raises(DataSourceError, match=r"line 2: the 'image' field is empty"):
        read_table(f, Columns())
    f.write_text("image,caption,labels\n../x.jpg,a,b\n")
    with pytest.raises(DataSourceError, match=r"line 2: the photo path '../x.jpg' leaves"):
        read_table(f, Columns())
    (tmp_path / "t.jsonl").write_text('{"image": "x.jpg"}\nnot json\n')
    with pytest.raises(DataSourceError, match=r"t.jsonl, line 2: not JSON"):
        read_table(tmp_path / "t.jsonl", Columns())


def test_a_kaggle_csv_is_still_read_by_the_exact_reader(demo):
    src = open_rows(demo / "test.csv")
    assert src.kaggle and src.images == demo / "data"
    assert open_data(demo).kaggle
    folder = comp5329_dir()
    if not (folder / "train.csv").is_file():
        pytest.skip("the COMP5329 data is not on this machine")
    real = open_data(folder)
    assert real.kaggle and len(real.read()) == 20_000  # all rows, exactly (30,000 in the full file)
    assert len(open_rows(folder / "test.csv").read()) == 10_000


# ---- a product table, end to end ---------------------------------------------------------


def test_train_on_a_table_stores_the_label_names(run):
    labels = json.loads((run / "labels.json").read_text())["labels"]
    assert set(labels) <= {"circle", "square", "triangle", "star", "cross", "ring", "diamond",
                           "hexagon"}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["columns"]["labels"] == "tags"
    assert summary["decision_why"].startswith("decision: auto chose")  # the demo recipe's rule
    assert {r["label"] for r in summary["per_class"]} == set(labels)


def test_evaluate_predict_and_report_show_label_names(run, catalogue, tmp_path, capsys):
    images = ["--images", str(catalogue / "photos")]
    assert main(["evaluate", str(run), "--csv", str(catalogue / "holdout.csv"), *images,
                 *COLS]) == 0
    out = capsys.readouterr().out
    assert "holdout.csv: 12 rows" in out and "circle" in out and "next: mmtag report" in out
    sub, probs = tmp_path / "pred.csv", tmp_path / "probs.csv"
    assert main(["predict", str(run), "--csv", str(catalogue / "new.csv"), *images,
                 "--image-col", "path", "--caption-col", "title", "--out", str(sub),
                 "--probs", str(probs)]) == 0
    rows = list(csv.DictReader(sub.open()))
    new = list(csv.DictReader((catalogue / "new.csv").open()))
    assert [r["path"] for r in rows] == [r["path"] for r in new]  # every row, in order
    labels = set(json.loads((run / "labels.json").read_text())["labels"])
    assert all(set(r["labels"].split("|")) <= labels for r in rows if r["labels"])
    header = next(csv.reader(probs.open()))
    assert header[0] == "path" and set(header[1:]) == labels
    assert main(["report", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "catalogue.csv" in md and "| circle |" in md and "Why this rule: decision: auto" in md
    assert list((run / "report_files").glob("gallery_*_*.jpg"))  # a/1.jpg -> gallery_a_1.jpg


def test_serve_answers_with_label_names(run, catalogue):
    pred = Predictor.load(run)
    photo = next((catalogue / "photos" / "circle").glob("*.jpg"))
    with TestClient(create_app(pred, ServeOptions()), base_url="http://127.0.0.1") as c:
        model = c.get("/v1/model").json()
        assert set(model["labels"]) == set(model["label_names"]) and "circle" in model["labels"]
        r = c.post("/v1/tag", files={"image": photo.read_bytes()},
                   data={"caption": "a circle"}).json()
        assert all(isinstance(s["label"], str) and s["name"] == s["label"] for s in r["scores"])
        assert r["labels"] == r["names"]


def test_the_dataframe_api_trains_predicts_and_evaluates(catalogue, tmp_path):
    df = pd.read_csv(catalogue / "catalogue.csv").rename(
        columns={"path": "image", "title": "caption", "tags": "labels"})
    summary = mmtag.train(df, tmp_path / "df", config="demo",
                          overrides=RUN, images=catalogue / "photos", progress=False)
    assert summary["val_rows"] > 0
    tagger = mmtag.load_run(tmp_path / "df")
    held = pd.read_csv(catalogue / "holdout.csv").rename(
        columns={"path": "image", "title": "caption", "tags": "labels"}).set_index("image",
                                                                                  drop=False)
    preds = tagger.predict(held, images=catalogue / "photos")
    assert len(preds) == len(held) and all(isinstance(p, tuple) for p in preds)
    proba = tagger.predict_proba(held, images=catalogue / "photos")
    assert list(proba.columns) == list(tagger.label_map.display)
    assert list(proba.index) == list(held.index) and ((proba >= 0) & (proba <= 1)).all().all()
    m = tagger.evaluate(held, images=catalogue / "photos")
    assert m["rows"] == len(held) and 0 <= m["micro_f1"] <= 1
    assert {r["label"] for r in m["per_class"]} == set(tagger.label_map.display)


def test_a_subset_keeps_a_validation_only_label_and_says_so(demo, tmp_path, caplog):
    # the case: a few training rows lack a label some validation row carries
    cfg = load_config(None, [*TINY, "optim.epochs=1", "data.limit_train=3"])
    with caplog.at_level("WARNING", logger="mmtag.train"):
        summary = mmtag.train(demo, tmp_path / "r", cfg, progress=False)
    assert summary["train_rows"] == 3
    assert "appear only in validation rows" in caplog.text


def test_auto_picks_the_rule_of_the_better_crossfit_figure():
    cfg = load_config(None, ["decision=auto"])
    a = {"micro_f1": 0.67, "samples_f1": 0.60}
    b = {"micro_f1": 0.35, "samples_f1": 0.40}
    assert choose_rule(cfg, {"threshold": a, "expected_f1": b})[0] == "threshold"
    assert choose_rule(cfg, {"threshold": b, "expected_f1": a})[0] == "expected_f1"
    tie = {"micro_f1": 0.6685, "samples_f1": 0.70}  # 0.0015 less micro-F1: within the tie
    rule, why = choose_rule(cfg, {"threshold": a, "expected_f1": tie})
    assert rule == "expected_f1" and "a tie, decided by samples_f1" in why
    assert "samples_f1 0.7000 vs 0.6000" in why
    assert choose_rule(cfg, {"threshold": {}, "expected_f1": {}})[0] == "threshold"
    fixed = load_config(None, ["decision=expected_f1"])
    assert choose_rule(fixed, {"threshold": a, "expected_f1": b})[0] == "expected_f1"


# ---- the command line's conventions ------------------------------------------------------


def test_version_and_help_on_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("mmtag ")
    missing = []

    def walk(parser, where):
        for action in parser._actions:
            if action.dest == "help":
                continue
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for name, sub in action.choices.items():
                    walk(sub, f"{where} {name}")
            elif not action.help:
                missing.append(f"{where} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "mmtag")
    assert not missing, missing


def test_each_kind_of_error_has_its_exit_code(demo, run, catalogue, tmp_path, capsys):
    assert main(["train", "--data", str(demo)]) == 2  # usage: no --out
    assert main(["train", "--data", str(catalogue / "catalogue.csv"), "--out",
                 str(tmp_path / "x")]) == 3  # data: the default column names are not there
    assert "the columns are 'path', 'title', 'tags'" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "none"), "--csv", str(demo / "test.csv"),
                 "--out", str(tmp_path / "p.csv")]) == 4  # run: there is none
    with pytest.raises(SystemExit) as e:
        main(["train", "--no-such-flag"])
    assert e.value.code == 2


def test_sigterm_stops_a_command_with_143_and_says_how_to_resume(demo, tmp_path, capsys,
                                                                   monkeypatch):
    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM should have stopped the command")

    monkeypatch.setattr("mmtag.training.loop.fit", killed)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "r"
    assert main(["train", "--data", str(demo), "--out", str(out)]) == 143
    err = capsys.readouterr().err
    assert "terminated (SIGTERM)" in err and f"mmtag train --resume {out} --data {demo}" in err
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back


def test_check_data_reads_a_table_and_names_the_next_command(catalogue, capsys):
    assert main(["check-data", str(catalogue / "catalogue.csv"), *COLS, "--images",
                 str(catalogue / "photos"), "--workers", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert "48 rows" in out and "OK, no problem found" in out and "next: mmtag train" in out


def test_probabilities_agree_between_torch_predict_and_predict_proba(run, catalogue):
    pred = Predictor.load(run)
    df = pd.read_csv(catalogue / "new.csv").rename(columns={"path": "image",
                                                            "title": "caption"})
    proba = pred.predict_proba(df, images=catalogue / "photos").to_numpy()
    pairs = [(catalogue / "photos" / p, c) for p, c in zip(df["image"], df["caption"],
                                                            strict=True)]
    from PIL import Image
    direct = pred.predict_probs([Image.open(p).convert("RGB") for p, _ in pairs],
                                [c for _, c in pairs])
    np.testing.assert_allclose(proba, direct, atol=1e-4)


def test_a_names_file_names_integer_labels_in_the_run(demo, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("1 person\n2 bicycle\n")
    out = tmp_path / "r"
    argv = ["-q", "train", "--data", str(demo), "--out", str(out), "--label-names", str(names)]
    for s in [*TINY, "optim.epochs=1"]:
        argv += ["--set", s]
    assert main(argv) == 0
    saved = json.loads((out / "labels.json").read_text())
    assert saved["labels"][:2] == ["1", "2"] and saved["names"][:3] == ["person", "bicycle", "3"]
    pred = Predictor.load(out)
    assert pred.label_map.display[0] == "person" and pred.label_map.integer
    sub = tmp_path / "s.csv"  # the Kaggle submission keeps the ids
    assert main(["predict", str(out), "--csv", str(demo / "test.csv"), "--out", str(sub)]) == 0
    assert sub.read_text().startswith("ImageID,Labels\n")
    assert "person" not in sub.read_text()


def test_long_steps_log_progress_when_not_on_a_terminal(monkeypatch, caplog):
    from mmtag import progress as prog

    monkeypatch.setattr(prog, "LOG_EVERY_S", 0.0)
    with caplog.at_level("INFO", logger="mmtag"):
        assert list(prog.progress(range(3), 3, "predict", bar=False)) == [0, 1, 2]
    assert "predict: 3/3 (100 %) batch(es)" in caplog.text
    caplog.clear()
    logger = prog.logging.getLogger("mmtag")
    monkeypatch.setattr(logger, "level", prog.logging.WARNING)  # what -q sets
    assert list(prog.progress(range(3), 3, "predict", bar=False)) == [0, 1, 2]
    assert "predict:" not in caplog.text
