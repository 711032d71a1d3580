"""Outputs that never destroy, runs that say when they are unfinished, images read as a viewer
shows them and within a memory budget (docs/reliability.md)."""

import hashlib
import json
import os
import re
import shutil
import stat
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import TINY as BASE_TINY
from mmtag.cli import main
from mmtag.config import load_config
from mmtag.data.csv_io import read_csv
from mmtag.data.images import ImageReadError, load_image, to_rgb
from mmtag.inference import ensemble
from mmtag.inference.ensemble import build_ensemble
from mmtag.inference.export import export_run
from mmtag.inference.predictor import Predictor, evaluate_run, predict_csv
from mmtag.outputs import OutputPathError, check_output
from mmtag.prediction.checkpoint import atomic_save, load_checkpoint
from mmtag.reporting import report
from mmtag.reporting.report import write_report
from mmtag.serving.app import BadInput, ServeOptions, create_app, decode_image
from mmtag.serving.security import require_key
from mmtag.training import loop
from mmtag.training.feature_cache import image_key

TINY = [*BASE_TINY, "optim.epochs=1"]
RUN_FILE_NAMES = ["split.json", "config.yaml", "labels.json", "vocab.json", "last.pt",
                  "summary.json", "val_probs.csv", "best.pt", "metrics.csv"]


@pytest.fixture(scope="module")
def run(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    loop.fit(load_config(None, TINY), demo, out, progress=False)
    export_run(out, out / "export")
    return out


def snapshot(*folders):
    """Every file under `folders`: path -> (kind, bytes or link target)."""
    seen = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_symlink():
                seen[p] = ("link", os.readlink(p))
            elif p.is_file():
                seen[p] = ("file", p.read_bytes())
            elif not p.is_dir():
                seen[p] = ("special", stat.S_IFMT(os.lstat(p).st_mode))
    return seen


def cli(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.err.strip()


# ---- 1. predict --out never destroys what it lands on -----------------------------------


@pytest.fixture
def victims(run, demo, tmp_path):
    """A copy of the run and of the test CSV, a FIFO, links: the places an --out may land on."""
    r = tmp_path / "run"
    shutil.copytree(run, r, symlinks=True)
    test = tmp_path / "test.csv"
    shutil.copy(demo / "test.csv", test)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "to-test.csv").symlink_to(test)
    (tmp_path / "to-new.csv").symlink_to(tmp_path / "new.csv")
    return r, test


def out_cases(tmp_path, r, demo):
    photo = sorted((demo / "data").iterdir())[0]
    return ([r / n for n in RUN_FILE_NAMES] + [r / "export" / "model.json",
            r / "export" / "model.onnx", photo, tmp_path / "test.csv", tmp_path / "fifo",
            tmp_path / "to-test.csv", r, tmp_path / "run" / "export"])


def test_predict_out_is_refused_on_inputs_run_files_special_files_and_links_to_them(
        victims, demo, tmp_path, capsys):
    r, test = victims
    before = snapshot(tmp_path, demo)
    for out in out_cases(tmp_path, r, demo):
        code, err = cli(["predict", str(r), "--csv", str(test), "--images", str(demo / "data"),
                         "--out", str(out)], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and str(out) in err, (out, err)
    assert snapshot(tmp_path, demo) == before


def test_a_link_is_followed_never_replaced(victims, demo, tmp_path, capsys):
    r, test = victims
    link = tmp_path / "to-new.csv"
    code, _ = cli(["predict", str(r), "--csv", str(test), "--images", str(demo / "data"),
                   "--out", str(link)], capsys)
    assert code == 0 and link.is_symlink() and (tmp_path / "new.csv").read_text().startswith(
        "ImageID,Labels")


def test_a_device_node_is_never_replaced(tmp_path):
    # a character device needs root to make; /dev/null is there for everyone
    with pytest.raises(OutputPathError, match="special file"):
        check_output("/dev/null", "--out")
    if os.geteuid() == 0:
        os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        with pytest.raises(OutputPathError, match="a device"):
            check_output(tmp_path / "null", "--out")


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(choice=st.integers(0, 30), via_link=st.booleans())
def test_property_no_out_path_changes_an_input(run, demo, tmp_path_factory, choice, via_link):
    """Any --out among inputs, run files, links and special files: predict refuses it or
    writes a new file; the inputs and the run are byte-identical afterwards."""
    tmp = tmp_path_factory.mktemp("prop")
    r = tmp / "run"
    shutil.copytree(run, r, symlinks=True)
    test = tmp / "test.csv"
    shutil.copy(demo / "test.csv", test)
    os.mkfifo(tmp / "fifo")
    cases = [*out_cases(tmp, r, demo), tmp / "fresh.csv"]
    out = cases[choice % len(cases)]
    if via_link:
        (tmp / "link").symlink_to(out)
        out = tmp / "link"
    before = snapshot(r, demo)
    before_test = test.read_bytes()
    code = main(["predict", str(r), "--csv", str(test), "--images", str(demo / "data"),
                 "--out", str(out)])
    assert snapshot(r, demo) == before and test.read_bytes() == before_test
    assert code in (0, 2)
    assert stat.S_ISFIFO(os.lstat(tmp / "fifo").st_mode)


# ---- 2. an unfinished run says so --------------------------------------------------------


@pytest.fixture
def unfinished(run, tmp_path):
    """A copy of the run as it is when killed after its first epoch: best.pt not finalized
    (untuned 0.5 thresholds), no summary.json, no val_probs.csv."""
    r = tmp_path / "unfinished"
    shutil.copytree(run, r)
    shutil.rmtree(r / "export")
    ckpt = load_checkpoint(r / "best.pt")
    ckpt.update(finished=False, thresholds=[0.5] * len(ckpt["thresholds"]))
    atomic_save(ckpt, r / "best.pt")
    for name in ("summary.json", "val_probs.csv"):
        (r / name).unlink()
    return r


def test_an_unfinished_run_is_said_to_be_one_and_never_called_tuned(unfinished, demo, tmp_path,
                                                                     capsys, caplog):
    m = evaluate_run(unfinished, data_dir=demo)
    assert not m["tuned_on_these_rows"] and "--resume" in m["unfinished"]
    assert "untuned" in m["decision"] and "crossfit" not in m
    code, _ = cli(["evaluate", str(unfinished), "--data", str(demo)], capsys)
    assert code == 0
    res = predict_csv(unfinished, demo / "test.csv", demo / "data", tmp_path / "sub.csv")
    assert "untuned" in res["decision"]
    assert any("unfinished" in r.getMessage() and "--resume" in r.getMessage()
               for r in caplog.records)
    for argv in (["export", str(unfinished)], ["report", str(unfinished)],
                 ["ensemble", str(unfinished), str(unfinished), "--out", str(tmp_path / "e")]):
        code, err = cli(argv, capsys)
        assert code == 4 and ("unfinished" in err or "summary.json" in err), (argv, err)
    assert not (unfinished / "export").exists() and not (tmp_path / "e").exists()


def test_a_finished_runs_best_pt_says_so(run, tmp_path):
    assert load_checkpoint(run / "best.pt")["finished"] is True
    # a best.pt written before the key, copied out on its own: taken as finished
    old = load_checkpoint(run / "best.pt")
    del old["finished"]
    atomic_save(old, tmp_path / "best.pt")
    assert Predictor.load(tmp_path / "best.pt").unfinished is None


def test_an_output_beside_the_photos_that_is_not_a_photo_may_be_rewritten(run, demo, tmp_path):
    images = tmp_path / "data"
    shutil.copytree(demo / "data", images)
    for _ in range(2):  # e.g. --images . with the default --out, twice
        predict_csv(run, demo / "test.csv", images, images / "Predicted_labels.csv")


# ---- 3, 4, 9. images: upright, within a budget, regular files only ----------------------


def _photo(demo):
    return sorted((demo / "data").iterdir())[0]


def test_exif_orientation_is_applied_everywhere_an_image_is_read(run, demo, tmp_path):
    upright_png, turned_png = tmp_path / "upright.png", tmp_path / "turned.png"
    with Image.open(_photo(demo)) as im:
        im = im.convert("RGB").resize((40, 24))
    im.save(upright_png)
    exif = Image.Exif()
    exif[0x0112] = 8  # "turn 90 degrees counter-clockwise to show": stored turned clockwise
    im.transpose(Image.Transpose.ROTATE_270).save(turned_png, exif=exif)
    assert np.array_equal(np.asarray(load_image(turned_png)), np.asarray(load_image(upright_png)))
    opts = ServeOptions()
    assert np.array_equal(np.asarray(decode_image(turned_png.read_bytes(), "t", opts, 32)),
                          np.asarray(decode_image(upright_png.read_bytes(), "u", opts, 32)))
    pred = Predictor.load(run)
    a = pred.predict_probs([Image.open(turned_png)], ["a photo"])
    b = pred.predict_probs([Image.open(upright_png)], ["a photo"])
    assert np.allclose(a, b, atol=1e-6)
    # the feature cache never reads an entry made from the pixels as stored
    assert image_key(turned_png) != hashlib.sha1(turned_png.read_bytes()).hexdigest()
    assert image_key(upright_png) == hashlib.sha1(upright_png.read_bytes()).hexdigest()


def test_decoding_is_bounded_before_it_starts(tmp_path):
    png, jpg = tmp_path / "big.png", tmp_path / "big.jpg"
    Image.new("I;16", (1200, 1000)).save(png)
    Image.new("RGB", (1600, 1200), (90, 20, 200)).save(jpg, quality=80)
    with pytest.raises(ImageReadError, match=r"1200 x 1000 pixels .* over the 2 MB budget"):
        load_image(png, budget_mb=2)
    # a JPEG is decoded at a reduced scale instead (never below the size the model reads)
    small = load_image(jpg, budget_mb=8, min_side=100)
    assert small.size[0] < 1600 and min(small.size) >= 100
    assert load_image(jpg, budget_mb=1.5).size == (400, 300)  # 1/4: draft takes effect once
    assert load_image(jpg).size == (1600, 1200)  # within the default budget: as before
    with pytest.raises(BadInput) as e:
        decode_image(png.read_bytes(), "big.png", ServeOptions(max_decode_mb=2), 32)
    assert e.value.status == 413 and "budget" in e.value.message
    # 16-bit pixels are scaled without a float64 copy of the whole photo, to the same values
    a = np.arange(0, 65536, 7, dtype=np.uint16)[:9000].reshape(90, 100)
    old = np.round(np.clip(a.astype(np.float64), 0, 65535) * (255.0 / 65535)).astype(np.uint8)
    im16 = Image.fromarray(a)
    assert im16.mode.startswith("I;16")
    got = np.asarray(to_rgb(im16))[..., 0]
    assert np.array_equal(got, old)


def test_a_fifo_among_the_photos_is_named_never_opened(run, demo, tmp_path, capsys):
    images = tmp_path / "data"
    shutil.copytree(demo / "data", images)
    ids = [r.image_id for r in read_csv(demo / "test.csv")]
    (images / ids[0]).unlink()
    os.mkfifo(images / ids[0])
    done = {}
    t = threading.Thread(target=lambda: done.update(r=cli(
        ["predict", str(run), "--csv", str(demo / "test.csv"), "--images", str(images),
         "--out", str(tmp_path / "sub.csv")], capsys)))
    t.start()
    t.join(60)
    if t.is_alive():  # unblock the reader so the test fails instead of hanging
        with open(images / ids[0], "wb"):
            pass
        t.join()
        pytest.fail("predict blocked on a FIFO")
    code, err = done["r"]
    assert code == 3 and "not a regular file" in err and ids[0] in err


# ---- 5. model.json is validated as strictly as config.yaml -------------------------------


@pytest.mark.parametrize("edit", [
    lambda m: m["image"].update(size=4096), lambda m: m.update(files=None),
    lambda m: m.update(image=None), lambda m: m["inputs"].append("extra"),
    lambda m: m["caption"].update(max_len=10**7),
    lambda m: m["decision"].update(thresholds=[float("nan")] * len(m["labels"])),
    lambda m: m["decision"].update(thresholds=[-1] * len(m["labels"])),
    lambda m: m["files"].update(fp32="/tmp/elsewhere.onnx"),
    lambda m: m["files"].update(fp32="../model.onnx"),
    lambda m: m.pop("checkpoint"),
], ids=["size4096", "files-null", "image-null", "extra-input", "max_len", "nan", "minus1",
        "absolute", "dotdot", "no-checkpoint"])
def test_a_tampered_model_json_is_refused_with_one_line(run, demo, tmp_path, capsys, edit):
    r = tmp_path / "run"
    shutil.copytree(run, r)
    meta = json.loads((r / "export" / "model.json").read_text())
    edit(meta)
    (r / "export" / "model.json").write_text(json.dumps(meta))
    code, err = cli(["predict", str(r), "--engine", "onnx", "--csv", str(demo / "test.csv"),
                     "--images", str(demo / "data"), "--out", str(tmp_path / "s.csv")], capsys)
    assert code == 4 and "model.json" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "s.csv").exists()


# ---- 6. the report describes the model predict uses --------------------------------------


@pytest.mark.parametrize("edit, file", [
    (lambda r: (r / "config.yaml").write_text((r / "config.yaml").read_text().replace(
        "image_size: 32", "image_size: 64")), "config.yaml"),
    (lambda r: (r / "summary.json").write_text(json.dumps({**(s := json.loads(
        (r / "summary.json").read_text())), "thresholds": [0.01] * len(s["thresholds"])})),
     "summary.json"),
], ids=["config", "thresholds"])
def test_the_report_refuses_metadata_that_disagrees_with_best_pt(run, tmp_path, capsys, edit,
                                                                 file):
    r = tmp_path / "run"
    shutil.copytree(run, r)
    edit(r)
    code, err = cli(["report", str(r)], capsys)
    assert code == 4 and file in err and "best.pt" in err, err
    assert not (r / "report.md").exists()


# ---- 7, 8. multi-file outputs appear whole or not at all; foreign folders are kept --------


def test_a_failed_ensemble_leaves_no_folder_and_a_rerun_recovers(run, tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(run, a)
    shutil.copytree(run, b)
    out = tmp_path / "ens"
    stale = tmp_path / ".ens.stage-999999999-x"  # what a killed ensemble left
    stale.mkdir()
    (stale / "best.pt").write_bytes(b"half")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ensemble, "write_val_probs", disk_full)
    with pytest.raises(OSError):
        build_ensemble([a, b], out)
    assert not out.exists() and not stale.exists()
    assert not list(tmp_path.glob(".ens.stage-*"))
    monkeypatch.undo()
    build_ensemble([a, b], out)
    assert {"best.pt", "summary.json", "val_probs.csv"} <= {p.name for p in out.iterdir()}


def test_export_cleans_what_a_killed_export_left_and_keeps_the_umask(run, tmp_path):
    out = tmp_path / "exp"
    stale = tmp_path / ".exp.stage-999999999-old"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"x" * 1000)
    export_run(run, out)
    assert not stale.exists()
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((out / "model.onnx").stat().st_mode) == 0o666 & ~mask
    export_run(run, out)  # over an earlier export: swapped in whole
    assert {p.name for p in out.iterdir()} >= {"model.json", "model.onnx"}
    assert not list(tmp_path.glob(".exp.stage-*"))


def test_a_report_is_both_pages_or_neither_and_never_links_a_deleted_file(run, tmp_path,
                                                                          monkeypatch, demo):
    r = tmp_path / "run"
    shutil.copytree(run, r)
    write_report(r, data_dir=demo)
    md_before = (r / "report.md").read_bytes()
    html_before = (r / "report.html").read_bytes()
    calls = {"n": 0}
    real = report.render

    def fail_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(report, "render", fail_second)
    with pytest.raises(OSError):
        write_report(r, data_dir=demo)
    assert (r / "report.md").read_bytes() == md_before
    assert (r / "report.html").read_bytes() == html_before
    monkeypatch.undo()
    write_report(r, data_dir=demo)
    md = (r / "report.md").read_text()
    for link in re.findall(r"\]\((report_files/[^)]+)\)", md):
        assert (r / link).exists(), link


def test_a_report_never_replaces_a_users_own_report_md(run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("# my notes\n")
    code, err = cli(["report", str(run), "--out", str(out)], capsys)
    assert code == 2 and "did not write" in err
    assert (out / "report.md").read_text() == "# my notes\n"


def test_compare_never_draws_over_a_runs_own_curves(run, tmp_path, capsys):
    r = tmp_path / "run"
    shutil.copytree(run, r)
    before = (r / "curves.png").read_bytes()
    code, err = cli(["compare", str(r), "--out", str(r)], capsys)
    assert code == 2 and "curves.png" in err and (r / "curves.png").read_bytes() == before


# ---- 9, 10. the service: the Host header, the docs page, the key --------------------------


@pytest.fixture(scope="module")
def pred(run):
    return Predictor.load(run)


def test_the_service_answers_only_its_own_host_names(pred):
    with TestClient(create_app(pred, ServeOptions()), base_url="http://127.0.0.1") as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/healthz", headers={"host": "localhost:8000"}).status_code == 200
        assert c.get("/v1/model", headers={"host": "evil.example"}).status_code == 400


def test_the_docs_page_loads_nothing_from_elsewhere(pred):
    with TestClient(create_app(pred, ServeOptions()), base_url="http://127.0.0.1") as c:
        html = c.get("/docs").text
        srcs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", html)
        assert srcs and all(s.startswith("/") for s in srcs), srcs
        assert "cdn" not in html.lower()
        for s in srcs:
            assert c.get(s).status_code == 200, s


def test_beyond_this_machine_the_service_needs_a_key(pred, run, capsys):
    with pytest.raises(ValueError, match="--api-key"):
        require_key("0.0.0.0", None, no_auth=False)
    assert require_key("0.0.0.0", None, no_auth=True) is None
    assert require_key("127.0.0.1", None, no_auth=False) is None
    code, err = cli(["serve", str(run), "--host", "0.0.0.0"], capsys)
    assert code == 2 and "--no-auth" in err
    opts = ServeOptions(host="0.0.0.0", api_key="s3cret")
    with TestClient(create_app(pred, opts), base_url="http://10.0.0.5") as c:
        assert c.get("/v1/model").status_code == 401
        assert c.get("/v1/model", headers={"x-api-key": "wrong"}).status_code == 401
        assert c.get("/v1/model", headers={"authorization": "Bearer s3cret"}).status_code == 200
        model = c.get("/v1/model", headers={"x-api-key": "s3cret"}).json()
        assert "s3cret" not in json.dumps(model)
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200
