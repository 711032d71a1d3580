"""Bad input gets a one-line error naming the file, line or key and the fix; no silent wrong
result, no traceback, no file written outside the folders given (docs/reliability.md)."""

import csv
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY as BASE_TINY
from mmtag.atomic import WriteError, atomic_write, atomic_write_many
from mmtag.cli import main
from mmtag.config import ConfigError, load_config
from mmtag.data.check import check_data, format_report
from mmtag.data.csv_io import CSVFormatError, read_csv
from mmtag.data.demo import make_demo_data
from mmtag.data.images import load_image
from mmtag.inference.ensemble import build_ensemble
from mmtag.inference.predictor import PredictOptions, evaluate_run, predict_csv
from mmtag.prediction.checkpoint import CheckpointError, load_checkpoint
from mmtag.training import loop

TINY = [*BASE_TINY, "optim.epochs=1"]


@pytest.fixture(scope="module")
def run(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    loop.fit(load_config(None, TINY), demo, out, progress=False)
    return out


def cli_error(argv, capsys, expect=None):
    """Run the CLI; it must exit with an error code (`expect`, else any of usage 2, data 3,
    run 4) with one line on stderr and no traceback."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert (code == expect if expect else code in (2, 3, 4)), (code, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ---- ImageIDs: one rule, in the reader, for every command ---------------------------------

@pytest.mark.parametrize("image_id", ["../../outside.jpg", "/tmp/abs.jpg", "sub/0.jpg",
                                      "..\\x.jpg"])
def test_an_image_id_that_is_a_path_is_refused_by_every_command(demo, run, tmp_path, capsys,
                                                                 image_id):
    (tmp_path / "data").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.jpg")
    test = tmp_path / "test.csv"
    test.write_text(f'ImageID,Caption\n0.jpg,"a cat"\n{image_id},"a dog"\n')
    with pytest.raises(CSVFormatError, match=r"line 3: image id .* is not a plain file name"):
        read_csv(test)
    out = tmp_path / "sub.csv"
    err = cli_error(["predict", str(run), "--csv", str(test), "--images", str(tmp_path / "data"),
                     "--out", str(out)], capsys)
    assert f"{test}, line 3" in err and "not a plain file name" in err and not out.exists()
    labelled = tmp_path / "train.csv"
    labelled.write_text(f'ImageID,Labels,Caption\n0.jpg,1,"a cat"\n{image_id},2,"a dog"\n')
    for argv in (["evaluate", str(run), "--csv", str(labelled)], ["check-data", str(tmp_path)],
                 ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--config",
                  "demo"]):
        assert "line 3" in cli_error(argv, capsys)
    assert not (tmp_path / "r").exists()


# ---- silent wrong output ------------------------------------------------------------------

@pytest.mark.parametrize("value", ["nan", "5", "-1", "0", "1", "inf"])
def test_a_global_threshold_outside_0_1_is_refused(run, demo, value, capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", str(run), "--data", str(demo), "--threshold", value])
    assert "strictly between 0 and 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        evaluate_run(run, data_dir=demo, options=PredictOptions(threshold=float(value)))


def test_predict_never_writes_over_its_input_or_one_output_over_the_other(run, demo, tmp_path,
                                                                          capsys):
    test = tmp_path / "test.csv"
    test.write_bytes((demo / "test.csv").read_bytes())
    before = test.read_bytes()
    base = ["predict", str(run), "--images", str(demo / "data")]
    err = cli_error([*base, "--csv", str(test), "--out", str(test)], capsys)
    assert "--out" in err and "--csv" in err and test.read_bytes() == before
    out = tmp_path / "sub.csv"
    err = cli_error([*base, "--csv", str(test), "--out", str(out), "--probs", str(out)], capsys)
    assert "--probs" in err and not out.exists()
    err = cli_error([*base, "--csv", str(test), "--out", str(out), "--probs",
                     str(run / "best.pt")], capsys)
    assert "run" in err and not out.exists()


def test_the_submission_and_probabilities_are_written_together_or_not_at_all(run, demo,
                                                                             tmp_path):
    out, probs = tmp_path / "sub.csv", tmp_path / "missing-folder" / "probs.csv"
    with pytest.raises(WriteError, match="could not write"):
        predict_csv(run, demo / "test.csv", demo / "data", out, probs_out=probs)
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))
    res = predict_csv(run, demo / "test.csv", demo / "data", out, probs_out=tmp_path / "p.csv")
    with open(tmp_path / "p.csv", newline="") as f:
        assert res["rows"] == len(read_csv(out)) == len(list(csv.reader(f))) - 1


@pytest.mark.parametrize("override, message", [
    ("data.limit_train=-5", "data.limit_train must be >= 1"),
    ("data.limit_val=0", "data.limit_val must be >= 1"),
    ("optim.lr=inf", "optim.lr: expected a finite number"),
    ("optim.lr=.nan", "optim.lr: expected a finite number"),
    ("optim.weight_decay=-1", "optim.weight_decay"),
    ("data.hflip=7", "data.hflip is a probability"),
    ("loss.gamma=nan", "loss.gamma: expected a finite number"),
    ("data.image_size=100000", "data.image_size must be in [16, 2048]"),
    ("min_support=-1", "min_support must be >= 0"),
    ("seed=-3", "seed must be >= 0"),
    ("optim.plateau_factor=2", "optim.plateau_factor must be in (0, 1)"),
    ("tta_sizes=[384]", "tta_sizes=[384] was removed"),
])
def test_out_of_range_config_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        load_config(None, [override])


def test_a_16_bit_image_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 256).reshape(64, 256).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    x = np.asarray(load_image(tmp_path / "g16.png"))[..., 0].astype(int)
    assert x.min() == 0 and x.max() == 255 and (x == 255).mean() < 0.01
    np.testing.assert_allclose(x, np.round(ramp / 257.0), atol=1)


def test_predict_ignores_a_labels_column_and_evaluate_names_an_unknown_label(run, demo, tmp_path,
                                                                          capsys):
    rows = read_csv(demo / "train.csv")[:4]
    labelled = tmp_path / "labelled.csv"
    lines = [f'{r.image_id},{"99" if i == 1 else " ".join(map(str, r.labels))},"{r.caption}"'
             for i, r in enumerate(rows)]
    labelled.write_text("ImageID,Labels,Caption\n" + "\n".join(lines) + "\n")
    res = predict_csv(run, labelled, demo / "data", tmp_path / "sub.csv")
    assert res["rows"] == 4
    err = cli_error(["evaluate", str(run), "--csv", str(labelled), "--images",
                     str(demo / "data")], capsys)
    assert "label 99" in err and f"{labelled} line 3" in err and "not one this run predicts" in err


def test_check_data_reports_labels_it_did_not_expect_beside_the_label_table(tmp_path):
    demo = tmp_path / "demo"
    make_demo_data(demo, n=400, seed=4, n_test=2)  # every demo label on many rows
    (tmp_path / "data").symlink_to(demo / "data")
    text = (demo / "train.csv").read_text().splitlines()
    first = text[1].split(",", 2)
    text[1] = f"{first[0]},190,{first[2]}"  # a typo for 19
    (tmp_path / "train.csv").write_text("\n".join(text) + "\n")
    report = check_data(tmp_path, workers=1, progress=False)
    assert [u["label"] for u in report["labels"]["unexpected"]] == [190]
    assert report["labels"]["unexpected"][0]["rows"][0]["line"] == 2
    out = format_report(report)
    table = out[out.index("Labels:"):out.index("labels per image")]
    assert "unexpected label 190: only 1 row(s) carry it (line 2 (0.jpg))" in table


# ---- tracebacks instead of errors ---------------------------------------------------------

class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "truncated", "tampered",
                                     "code"])
def test_a_damaged_or_hostile_checkpoint_is_refused_with_one_line(run, demo, tmp_path, capsys,
                                                                  content):
    bad = tmp_path / "best.pt"
    if content == "tampered":  # a real checkpoint with bytes flipped in the middle
        raw = bytearray((run / "best.pt").read_bytes())
        raw[len(raw) // 2: len(raw) // 2 + 64] = b"\xff" * 64  # in the weights
        content = bytes(raw)
    elif content == "truncated":
        content = (run / "best.pt").read_bytes()[:100_000]
    elif content == "code":
        content = pickle.dumps({"format": 1, "x": _RunsCode()})
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match="was not loaded") as e:
        load_checkpoint(bad)
    assert "weights_only=False" not in str(e.value)
    err = cli_error(["predict", str(bad), "--csv", str(demo / "test.csv"), "--images",
                     str(demo / "data"), "--out", str(tmp_path / "sub.csv")], capsys)
    assert str(bad) in err and "weights_only" not in err


def test_a_damaged_resume_checkpoint_is_refused(run, demo, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "last.pt").write_bytes(b"")
    err = cli_error(["train", "--resume", str(copy), "--data", str(demo)], capsys)
    assert f"resume checkpoint {copy / 'last.pt'}" in err


@pytest.mark.parametrize("yaml_text, message", [
    ("optim:\n  lr: [1\n", "line 3: not valid YAML"),
    ("optim: !!python/object/apply:os.system ['echo pwned']\n", "line 1: not valid YAML"),
    ("- a\n- b\n", "the top level must be a mapping"),
])
def test_malformed_or_hostile_yaml_is_a_config_error(tmp_path, capsys, yaml_text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    err = cli_error(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--config",
                     str(cfg)], capsys)
    assert str(cfg) in err and message in err


@pytest.mark.parametrize("item", ["optim.lr=[1", "seed=!!python/object:os.system x"])
def test_a_set_value_that_is_not_yaml_is_a_config_error(tmp_path, capsys, item):
    err = cli_error(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--set",
                     item], capsys)
    assert f"--set {item}" in err and "not valid YAML" in err


@pytest.mark.parametrize("content", ["", "ImageID,Labels,1\n", "ImageID,Labels,1\n0.jpg,1,x\n"])
def test_an_ensemble_member_with_an_empty_or_damaged_val_probs_is_named(run, demo, tmp_path,
                                                                        capsys, content):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(run, copy)
    (copy / "val_probs.csv").write_text(content)
    err = cli_error(["ensemble", str(run), str(copy), "--out", str(tmp_path / "ens")], capsys)
    assert str(copy / "val_probs.csv") in err and "--resume" in err
    with pytest.raises(ValueError):
        build_ensemble([run, copy], tmp_path / "ens2")


# ---- durability ---------------------------------------------------------------------------

def test_a_failed_atomic_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write(target, "old")

    def fails(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match=r"could not write .*summary.json: No space left.*free"):
        atomic_write(target, fails)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [target.name]
    # several files: all staged before any is replaced
    other = tmp_path / "other.csv"
    with pytest.raises(WriteError):
        atomic_write_many([(other, "new"), (target, fails)])
    assert not other.exists() and target.read_text() == "old"
    atomic_write_many([(other, b"new"), (target, lambda f: torch.save({"a": 1}, f))])
    assert other.read_bytes() == b"new" and torch.load(target, weights_only=True) == {"a": 1}


def test_a_damaged_run_file_is_named(run, demo, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "split.json").write_text('{"train_prop": 0.8, "se')  # cut short
    err = cli_error(["evaluate", str(copy), "--data", str(demo)], capsys)
    assert f"{copy / 'split.json'} is damaged" in err


def test_checkpoints_written_before_digests_still_load_for_predict_and_resume(run, demo,
                                                                              tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(run, copy)
    for name in ("best.pt", "last.pt"):  # as written before checkpoints carried a digest
        ck = torch.load(copy / name, weights_only=True)
        del ck["digest"]
        torch.save(ck, copy / name)
    n_test = len(read_csv(demo / "test.csv"))
    assert predict_csv(copy, demo / "test.csv", demo / "data", tmp_path / "s.csv")["rows"] == n_test
    loop.fit(load_config(copy / "config.yaml"), demo, copy, resume=True, progress=False)
    assert "digest" in torch.load(copy / "best.pt", weights_only=True)  # rewritten with one


def test_a_checkpoint_missing_its_parts_and_a_bad_saved_config_are_named(run, demo, tmp_path,
                                                                        capsys):
    from mmtag.prediction.checkpoint import atomic_save

    ck = load_checkpoint(run / "best.pt")
    atomic_save({k: v for k, v in ck.items() if k != "labels"}, tmp_path / "nolabels.pt")
    err = cli_error(["evaluate", str(tmp_path / "nolabels.pt"), "--data", str(demo)], capsys)
    assert "lacks labels" in err
    ck["config"]["data"]["hue"] = 0.9
    atomic_save(ck, tmp_path / "badcfg.pt")
    err = cli_error(["evaluate", str(tmp_path / "badcfg.pt"), "--data", str(demo)], capsys)
    assert f"the config saved in {tmp_path / 'badcfg.pt'}: data.hue" in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  hue: 0.9\n")
    with pytest.raises(ConfigError, match=f"{cfg}: data.hue must be in"):
        load_config(cfg)
    cfg.write_bytes(b"data:\n  hue: \xff\n")
    with pytest.raises(ConfigError, match="is not UTF-8"):
        load_config(cfg)
