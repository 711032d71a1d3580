"""The Python API (`import mmtag`): train, load a run, predict; what it refuses."""

import pytest

import mmtag
from conftest import TINY as BASE_TINY

TINY = [*BASE_TINY, "optim.epochs=1"]


def test_train_load_and_predict_through_the_api(demo, tmp_path):
    summary = mmtag.train(demo, tmp_path / "a", config="demo", overrides=TINY)
    assert summary["val_rows"] == 8
    rows = mmtag.read_csv(demo / "test.csv")
    tagger = mmtag.load_run(tmp_path / "a")
    labels = tagger.predict([(demo / "data" / r.image_id, r.caption) for r in rows])
    assert len(labels) == len(rows) and all(isinstance(s, tuple) for s in labels)
    # resuming keeps the run's own config: a new config or overrides are refused, not ignored
    with pytest.raises(ValueError, match="saved config"):
        mmtag.train(demo, tmp_path / "a", overrides=["optim.epochs=2"], resume=True)


def test_training_rows_without_labels_are_named(demo, tmp_path, caplog):
    lines = (demo / "train.csv").read_text().splitlines(keepends=True)
    head, first = lines[0], lines[1]
    image_id, _, caption = first.split(",", 2)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text(head + f"{image_id},,{caption}" + "".join(lines[2:]))
    (data / "data").symlink_to(demo / "data")
    with caplog.at_level("WARNING"):
        mmtag.train(data, tmp_path / "b", config="demo", overrides=TINY)
    assert f"1 row(s) without labels (line 2 ({image_id}))" in caplog.text
