"""Ablations, comparisons and reports: tables that agree with the runs, a resumable runner
(also after a real kill), and reports whose numbers are the run's and whose HTML stands alone."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mmtag.cli import main
from mmtag.config import ConfigError
from mmtag.reporting import ablation as ablation_mod
from mmtag.reporting.ablation import load_grid, prepare_ablation, run_ablation
from mmtag.reporting.compare import compare
from mmtag.reporting.report import write_report
from mmtag.reporting.stats import paired

# a cached tiny recipe: frozen stages [0, 5) cached once, a few seconds a run
TINY = {"data": {"image_size": 64, "num_workers": 0, "len_quantile": 1.0},
        "model": {"pretrained": False, "freeze_image": "5", "lstm_hidden": 8, "hidden": 16},
        "optim": {"batch_size": 8, "epochs": 2, "lr": 1e-3}, "cache": {"num_workers": 0}}
GRID = {"baseline": "base", "common": ["optim.scheduler=plateau"],
        "variants": {"base": [], "focal": ["loss.name=focal"]}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("abl-files")
    base, grid = root / "tiny.yaml", root / "grid.yaml"
    cfg = {**TINY, "cache": {**TINY["cache"], "dir": str(root / "cache")}}
    base.write_text(yaml.safe_dump(cfg))
    grid.write_text(yaml.safe_dump(GRID))
    return base, grid


@pytest.fixture(scope="module")
def ablation(demo, files, tmp_path_factory):
    """A finished 2-variant x 2-seed ablation, run in this process."""
    base, grid = files
    out = tmp_path_factory.mktemp("abl") / "a"
    abl = prepare_ablation(demo, str(base), load_grid(grid), 2, out)
    run_ablation(abl, progress=False)
    return out


def _csv_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_results_csv_has_one_row_per_run_with_its_summary_figures(ablation):
    rows = _csv_rows(ablation / "results.csv")
    assert [(r["variant"], r["seed"]) for r in rows] == [
        ("base", "0"), ("base", "1"), ("focal", "0"), ("focal", "1")]
    for r in rows:
        s = json.loads((ablation / r["run"] / "summary.json").read_text())
        assert float(r["val_crossfit.micro_f1"]) == pytest.approx(s["val_crossfit"]["micro_f1"])
        assert float(r["val_at_0.5.samples_f1"]) == pytest.approx(s["val_at_0.5"]["samples_f1"])
        assert float(r["saved_model_mb"]) == s["saved_model_mb"]
        assert float(r["train_seconds"]) > 0
    config = yaml.safe_load((ablation / "runs/focal/seed1/config.yaml").read_text())
    assert config["loss"]["name"] == "focal" and config["seed"] == 1
    assert config["optim"]["scheduler"] == "plateau"  # the grid's common override


def test_results_md_agrees_with_each_runs_summary(ablation):
    md = (ablation / "results.md").read_text()
    for variant in ("base", "focal"):
        values = [100 * json.loads((ablation / f"runs/{variant}/seed{s}/summary.json")
                                   .read_text())["val_crossfit"]["micro_f1"] for s in (0, 1)]
        mean = sum(values) / 2
        sd = abs(values[0] - values[1]) / math.sqrt(2)
        row = next(line for line in md.splitlines() if line.startswith(f"| {variant}"))
        assert f"{mean:.2f} ± {sd:.2f}" in row
    diffs = [100 * (json.loads((ablation / f"runs/focal/seed{s}/summary.json").read_text())
                    ["val_crossfit"]["micro_f1"]
                    - json.loads((ablation / f"runs/base/seed{s}/summary.json").read_text())
                    ["val_crossfit"]["micro_f1"]) for s in (0, 1)]
    row = next(line for line in md.splitlines()
               if line.startswith("| focal | micro-F1, tuned threshold"))
    assert f"{diffs[0]:+.2f}, {diffs[1]:+.2f}" in row
    assert f"{sum(diffs) / 2:+.2f}" in row
    assert "mmtag ablate --data" in md and "--seeds 2" in md


def test_a_rerun_trains_nothing_that_finished(ablation, demo, files, monkeypatch):
    base, grid = files
    before = {p: p.stat().st_mtime_ns for p in ablation.glob("runs/*/*/best.pt")}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ablation_mod, "train", no_training)
    abl = prepare_ablation(demo, str(base), load_grid(grid), 2, ablation)
    assert len(run_ablation(abl)) == 4
    assert before == {p: p.stat().st_mtime_ns for p in ablation.glob("runs/*/*/best.pt")}


def test_a_rerun_with_another_grid_or_base_is_refused(ablation, demo, files, tmp_path):
    base, _ = files
    other = tmp_path / "grid.yaml"
    other.write_text(yaml.safe_dump({"variants": {"base": [], "lr": ["optim.lr=1e-2"]}}))
    with pytest.raises(ValueError, match="another variants"):
        prepare_ablation(demo, str(base), load_grid(other), 2, ablation)


@pytest.mark.slow  # 18 s: a real run killed and resumed; make test-slow runs it
def test_killed_in_the_middle_of_a_run_the_ablation_resumes_it(ablation, demo, files, tmp_path):
    """A real SIGKILL of `mmtag ablate` while a run is half done: the rerun leaves the finished
    run alone, continues the killed one from its last.pt, and both end as in the uninterrupted
    ablation (one seed here: two runs, the first one already finished)."""
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location(
        "fault_inject", Path(__file__).resolve().parents[1] / "tools" / "fault_inject.py")
    fi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fi)
    base, grid = files
    out, log = tmp_path / "abl", tmp_path / "ablate.log"
    prepare_ablation(demo, str(base), load_grid(grid), 1, out)
    shutil.copytree(ablation / "runs/base/seed0", out / "runs/base/seed0")  # finished before
    first = out / "runs/base/seed0/best.pt"
    first_mtime = first.stat().st_mtime_ns
    cmd = [sys.executable, "-m", "mmtag", "ablate", "--data", str(demo), "--base", str(base),
           "--grid", str(grid), "--seeds", "1", "--out", str(out)]
    half_done = out / "runs/focal/seed0"
    assert fi.kill_at(cmd, log, target="last.pt write", run=half_done, cache=None)
    assert (half_done / "config.yaml").exists() and not (half_done / "summary.json").exists()
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "1 already finished" in res.stderr
    assert "focal, seed 0 (resuming)" in res.stderr
    assert first.stat().st_mtime_ns == first_mtime
    for run in ("base/seed0", "focal/seed0"):
        assert fi.differences(fi.fingerprint(ablation / "runs" / run),
                              fi.fingerprint(out / "runs" / run)) == [], run


def test_paired_test_matches_the_textbook_t_test():
    # differences 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3) = 3.464 with 2 degrees of freedom
    p = paired([11.0, 22.0, 33.0], [10.0, 20.0, 30.0])
    assert p.mean == pytest.approx(2.0) and p.sd == pytest.approx(1.0)
    assert p.p == pytest.approx(0.0742, abs=1e-4)
    assert p.low == pytest.approx(2 - 4.3027 / math.sqrt(3), abs=1e-3)
    assert p.verdict == "within seed noise"
    assert paired([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]).verdict == "identical on every seed"
    same = paired([51.0, 52.0, 53.0], [50.0, 51.0, 52.0])
    assert same.mean == 1.0 and same.verdict == "the same on every seed"
    one = paired([1.0], [0.5])
    assert one.verdict == "one seed: no test" and math.isnan(one.sd) and math.isnan(one.low)


@pytest.mark.parametrize("grid,message", [
    ({"variants": {}}, "a grid needs `variants:`"),
    ({"variants": {"a b": []}}, "must be letters"),
    ({"variants": {"a": ["optim.lr"]}}, "list of key=value"),
    ({"variants": {"a": []}, "baseline": "z"}, "baseline 'z' is not one of"),
    ({"variants": {"a": []}, "seeds": 3}, "unknown keys"),
])
def test_a_bad_grid_file_is_a_clear_error(tmp_path, grid, message):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises(ConfigError, match=message):
        load_grid(path)


def test_a_variant_with_a_bad_value_is_refused_before_any_training(demo, tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"variants": {"base": [], "bad": ["loss.name=hinge"]}}))
    assert main(["ablate", "--data", str(demo), "--base", "demo", "--grid", str(grid),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "variant bad" in err[0] and "loss.name" in err[0]
    assert not (tmp_path / "out").exists()


def test_the_built_in_report_grid_holds_the_reports_three_ablations():
    grid = load_grid("report")
    assert grid.baseline == "baseline"
    common = grid.variants["baseline"]
    assert {"optim.scheduler=plateau", "loss.name=bce", "optim.lr=5.0e-4"} <= set(common)
    assert grid.variants["no_plateau"][-1] == "optim.scheduler=none"
    assert grid.variants["focal"][-1] == "loss.name=focal"
    assert grid.variants["lr_1e-3"][-1] == "optim.lr=1.0e-3"


def _png_ok(path: Path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200


def test_compare_draws_curves_pairs_and_final_bars(ablation, tmp_path):
    written = compare([ablation], tmp_path / "cmp")
    assert [p.name for p in written] == ["curves.png", "base_vs_focal.png", "final.png"]
    for p in written:
        _png_ok(p)


def test_compare_names_a_folder_that_is_neither_a_run_nor_an_ablation(tmp_path, capsys):
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "c")]) == 4
    err = capsys.readouterr().err
    assert "neither a run folder" in err and str(tmp_path) in err


class _Page(HTMLParser):
    """The images and links of a page."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        for key in ("href", "src"):
            if a.get(key):
                self.links.append(a[key])

    def handle_data(self, data):
        self.text.append(data)


def _page(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.close()
    return page


def _assert_self_contained(html_path: Path, min_images: int) -> _Page:
    page = _page(html_path.read_text())
    assert len(page.images) >= min_images
    for src in page.images:
        assert src.startswith("data:image/"), src[:60]
        head, data = src.split(",", 1)
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            im.verify()
    assert not [x for x in page.links if not x.startswith("data:")], "a link leaves the page"
    return page


@pytest.fixture(scope="module")
def fabricated(ablation, tmp_path_factory):
    """A finished run whose summary.json and metrics.csv were given distinctive numbers."""
    import shutil

    run = tmp_path_factory.mktemp("fab") / "run"
    shutil.copytree(ablation / "runs/base/seed0", run)
    s = json.loads((run / "summary.json").read_text())
    for i, section in enumerate(("val", "val_at_0.5", "val_crossfit")):
        for j, fig in enumerate(("precision", "recall", "micro_f1", "macro_f1", "samples_f1")):
            s[section][fig] = 0.1 + 0.1 * i + 0.0123 * j + 0.00001 * (i + j)
    s["per_class"][0].update(precision=0.3141, recall=0.2718, f1=0.1618)
    (run / "summary.json").write_text(json.dumps(s))
    rows = _csv_rows(run / "metrics.csv")
    for k, r in enumerate(rows):
        r.update(val_loss=f"{0.5 - 0.0111 * k:.6f}", val_micro_f1=f"{0.6 + 0.0222 * k:.6f}",
                 seconds=f"{12.5 + k}")
    with (run / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return run, s, rows


def test_a_run_report_shows_the_runs_own_numbers(fabricated, demo):
    run, s, rows = fabricated
    md_path, html_path = write_report(run, data_dir=demo)
    md = md_path.read_text()
    final = {line.split("|")[1].strip(): line for line in md.splitlines()
             if line.startswith("| threshold 0.5") or line.startswith("| tuned threshold")}
    for name, section in (("threshold 0.5", "val_at_0.5"),
                          ("tuned threshold (chosen on these rows)", "val"),
                          ("tuned threshold, cross-fit estimate", "val_crossfit")):
        for fig in ("precision", "recall", "micro_f1", "macro_f1", "samples_f1"):
            assert f"{s[section][fig]:.4f}" in final[name], (name, fig)
    best = next(r for r in rows if int(r["epoch"]) == s["best_epoch"])
    assert f"| {float(best['val_loss']):.4f} |" in final["threshold 0.5"]
    minutes = sum(float(r["seconds"]) for r in rows) / 60
    assert f"| {minutes:.1f} |" in final["threshold 0.5"]
    epoch_table = md.split("## Per epoch")[1].split("## Per class")[0].splitlines()
    for r in rows:
        epoch_line = next(line for line in epoch_table if line.startswith(f"| {r['epoch']} | "))
        assert f"{float(r['val_micro_f1']):.4f}" in epoch_line
        assert f"{float(r['val_loss']):.4f}" in epoch_line
    per_class = s["per_class"][0]
    assert f"| {per_class['label']} | {per_class['support']} | {per_class['predicted']} | " \
           f"0.3141 | 0.2718 | 0.1618 | {s['thresholds'][0]:.2f} |" in md
    for heading in ("## Data", "## Decision rule", "## Largest errors", "## Hardware and software",
                    "## Model card", "## Configuration"):
        assert heading in md
    assert (run / "report_files/thresholds.png").exists()
    assert s["machine"]["cpu"] in md and f"| torch | {s['machine']['torch']} |" in md


def test_a_run_report_html_parses_and_embeds_every_image(fabricated, demo):
    run, s, _ = fabricated
    _, html_path = write_report(run, data_dir=demo)
    page = _assert_self_contained(html_path, min_images=3)
    text = " ".join(page.text)
    assert f"{s['val_crossfit']['micro_f1']:.4f}" in text
    gallery = [p for p in (run / "report_files").glob("gallery_*.jpg")]
    assert gallery, "no error gallery"
    # every gallery thumbnail is in the page, with its caption
    assert len(page.images) == 2 + len(gallery)  # thresholds, curves, the gallery: nothing else
    captions = {r["ImageID"]: r["Caption"] for r in _csv_rows(demo / "train.csv")}
    some = gallery[0].stem.removeprefix("gallery_") + ".jpg"
    assert captions[some].strip() in html_path.read_text().replace("&#39;", "'")


def test_an_ablation_report_embeds_its_figures_and_tables(ablation):
    md_path, html_path = write_report(ablation)
    page = _assert_self_contained(html_path, min_images=3)
    assert "within seed noise" in " ".join(page.text) or "real difference" in " ".join(page.text)
    md = md_path.read_text()
    assert "## Paired differences to the baseline" in md and "report_files/final.png" in md


def test_report_of_a_folder_that_is_no_run_is_one_clear_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a finished run" in err[0]


def test_a_diverged_run_is_marked_and_the_others_go_on(demo, files, tmp_path, monkeypatch):
    from mmtag.training.engine import TrainingDivergedError

    base, grid = files
    real_train = ablation_mod.train

    def train(data, run_dir, *args, **kwargs):
        if "focal" in str(run_dir):
            raise TrainingDivergedError("loss is nan at epoch 1, step 3")
        return real_train(data, run_dir, *args, **kwargs)

    monkeypatch.setattr(ablation_mod, "train", train)
    abl = prepare_ablation(demo, str(base), load_grid(grid), 1, tmp_path / "abl")
    rows = run_ablation(abl, progress=False)
    assert [r["variant"] for r in rows] == ["base"]
    md = (tmp_path / "abl" / "results.md").read_text()
    assert "- focal, seed 0: loss is nan at epoch 1, step 3" in md
    monkeypatch.setattr(ablation_mod, "train", lambda *a, **k: pytest.fail("retrained"))
    assert len(run_ablation(abl)) == 1  # the rerun neither retrains nor retries


def test_ctrl_c_says_how_to_resume(demo, files, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ablation_mod, "run_ablation", interrupted)
    base, grid = files
    assert main(["ablate", "--data", str(demo), "--base", str(base), "--grid", str(grid),
                 "--out", str(tmp_path / "a")]) == 130
    assert capsys.readouterr().err.strip() == (
        "mmtag ablate: interrupted; run the same command again to resume")

    import mmtag.api

    monkeypatch.setattr(mmtag.api, "train", interrupted)
    assert main(["train", "--data", str(demo), "--out", str(tmp_path / "r")]) == 130
    assert capsys.readouterr().err.strip() == (
        f"mmtag train: interrupted; continue with mmtag train --resume {tmp_path / 'r'} "
        f"--data {demo}")


def test_report_refuses_an_ensemble_and_a_wrong_data_folder(ablation, tmp_path, capsys):
    assert main(["ensemble", str(ablation / "runs/base/seed0"), str(ablation / "runs/base/seed1"),
                 "--out", str(tmp_path / "ens")]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "ens")]) == 2
    assert "is an ensemble" in capsys.readouterr().err
    assert main(["report", str(ablation / "runs/base/seed0"), "--data", str(tmp_path)]) == 3
    assert "train.csv not found" in capsys.readouterr().err


def test_a_variant_that_would_validate_on_other_rows_is_refused(demo, files, tmp_path):
    base, _ = files
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"variants": {"base": [], "more": ["data.train_prop=0.9"]}}))
    with pytest.raises(ConfigError, match="variant more changes data.train_prop"):
        prepare_ablation(demo, str(base), load_grid(grid), 1, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_run_folder_holding_another_config_is_not_mixed_in(ablation, demo, files, tmp_path):
    import shutil

    base, grid = files
    out = tmp_path / "abl"
    shutil.copytree(ablation, out)
    (out / "ablation.yaml").write_text((out / "ablation.yaml").read_text().replace(
        str(ablation), str(out)))
    cfg = out / "runs/focal/seed1/config.yaml"
    cfg.write_text(cfg.read_text().replace("lr: 0.001", "lr: 0.002"))
    abl = prepare_ablation(demo, str(base), load_grid(grid), 2, out)
    with pytest.raises(ValueError, match="runs/focal/seed1 holds a run with another config"):
        run_ablation(abl)


def test_user_text_cannot_inject_html_into_report_md():
    from mmtag.reporting.render import environment

    text = environment(False).from_string("{{ x | md }}").render(
        x="<img src=x onerror=alert(1)> a|b & c")
    assert text == "&lt;img src=x onerror=alert(1)&gt; a\\|b &amp; c"


def test_a_report_of_a_run_saved_with_fewer_figures_still_renders(fabricated, demo, tmp_path):
    import shutil

    run = tmp_path / "old"
    shutil.copytree(fabricated[0], run)
    s = json.loads((run / "summary.json").read_text())
    for key in ("wall_seconds", "machine", "data", "data_dir", "val_crossfit_other_rule"):
        s.pop(key, None)
    s["val_crossfit"] = {}  # too few validation rows to cross-fit
    (run / "summary.json").write_text(json.dumps(s))
    (run / "curves.png").unlink()
    md, html = write_report(run)
    text = md.read_text()
    assert "wall time" not in text and "No data folder" in text and "| CPU | not recorded" in text
    assert "Cross-fit: micro-F1\n**-**" in text or "micro-F1 **-**" in text.replace("\n", " ")
    _assert_self_contained(html, min_images=1)
