"""The command line: help, exit codes, and errors printed as messages (not tracebacks)."""

import json

import pytest

from mmtag.cli import main
from mmtag.data.demo import make_demo_data


@pytest.mark.parametrize("cmd", [[], ["train"], ["evaluate"], ["predict"], ["check-data"], ["demo"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: mmtag" in capsys.readouterr().out


def test_check_data_exit_status_and_json(tmp_path, capsys):
    d = tmp_path / "demo"
    make_demo_data(d, n=12, seed=0, n_test=4)
    assert main(["check-data", str(d), "--json", "--workers", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["rows"]["train"] == 12
    (d / "data" / "3.jpg").write_bytes(b"broken")
    assert main(["check-data", str(d), "--workers", "1"]) == 1
    assert "3.jpg" in capsys.readouterr().out


def test_bad_config_is_a_message_with_exit_status_2(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                 "--set", "optim.lr=fast"])
    assert code == 2
    err = capsys.readouterr().err
    assert "optim.lr: expected a finite number, got 'fast'" in err and "Traceback" not in err


def test_train_needs_a_kaggle_folder(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 3  # data
    assert "train.csv not found" in capsys.readouterr().err
