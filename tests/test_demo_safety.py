"""`mmtag demo --out X` deletes nothing it did not write."""

import pytest

from mmtag.demo import claim_demo_folder, clear_demo_run, run_demo


def test_a_users_file_in_the_run_folder_stops_the_demo_before_anything_is_deleted(tmp_path):
    out = tmp_path / "demo"
    claim_demo_folder(out)
    (out / "run").mkdir()
    (out / "run" / "best.pt").write_bytes(b"an earlier demo's model")
    (out / "run" / "my-notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="my-notes.txt.*nothing was deleted"):
        run_demo(out, n=20, progress=False)
    assert (out / "run" / "my-notes.txt").read_text() == "mine"
    assert (out / "run" / "best.pt").exists()


def test_a_folder_the_demo_did_not_make_is_refused_untouched(tmp_path):
    mine = tmp_path / "mine"
    (mine / "run").mkdir(parents=True)
    (mine / "run" / "best.pt").write_bytes(b"someone's model")
    with pytest.raises(FileExistsError, match="not made by mmtag demo"):
        run_demo(mine, n=20, progress=False)
    assert (mine / "run" / "best.pt").read_bytes() == b"someone's model"
    assert sorted(p.name for p in mine.iterdir()) == ["run"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        claim_demo_folder(tmp_path / "afile")


def test_an_earlier_demo_run_is_replaced(tmp_path):
    out = tmp_path / "demo"
    claim_demo_folder(out)
    run = out / "run"
    run.mkdir()
    for name in ("best.pt", "last.pt", "metrics.csv", ".lock", ".best.pt.abc123.tmp"):
        (run / name).write_bytes(b"x")
    clear_demo_run(run)
    assert [p.name for p in run.iterdir()] == [".lock"]
    claim_demo_folder(out)  # its own folder is accepted again
