"""`mmtag bench train|predict`: the three rates, the bound, the table and the JSON."""

import json

import pytest

from conftest import TINY as BASE_TINY
from mmtag.cli import main
from mmtag.config import load_config
from mmtag.training import loop
from mmtag.training.bench import bound_by, format_bench

TINY = [*BASE_TINY]


def _sets(items):
    return [a for kv in items for a in ("--set", kv)]


@pytest.mark.parametrize("pipeline", ["device", "loader"])
def test_bench_train_measures_every_part(demo, pipeline, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MMTAG_CACHE_DIR", str(tmp_path))
    assert main(["bench", "train", "--data", str(demo), "--steps", "2", "--warmup", "1",
                 "--json", *_sets([*TINY, f"data.pipeline={pipeline}"])]) == 0
    res = json.loads(capsys.readouterr().out)
    rates = res["images_per_second"]
    assert set(rates) == {"data", "step", "whole"} and min(rates.values()) > 0
    assert res["pipeline"] == pipeline and res["batch_size"] == 8 and res["device"] == "cpu"
    assert res["whole_over_step"] == pytest.approx(rates["whole"] / rates["step"], rel=1e-2)
    assert res["bound_by"] in {"model", "data", "overhead"}
    assert res["first_step_seconds"] > 0 and res["peak_memory_mb"] > 0
    assert res["host_syncs"] is None  # counted on CUDA only
    assert not list(demo.glob("split.json"))  # nothing is written into the data folder


def test_benchmark_parts_measures_every_part(demo, tmp_path, capsys):
    run = tmp_path / "run"
    loop.fit(load_config(None, [*TINY, "optim.epochs=1"]), demo, run, progress=False)
    argv = ["benchmark", str(run), "--csv", str(demo / "test.csv"), "--images",
            str(demo / "data"), "--n", "8", "--batch-size", "4", "--single", "2", "--parts"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "samples/s" in table  # the engines' table, then the parts
    assert "decoding + resizing alone" in table and "whole pipeline" in table
    assert main([*argv, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["parts"]
    assert res["rows"] == 8 and res["pipeline"] == "PIL" and res["image_size"] == 32
    assert min(res["images_per_second"].values()) > 0


def test_the_bound_is_the_slower_part():
    assert bound_by({"data": 100, "step": 50, "whole": 45}) == "model"
    assert bound_by({"data": 30, "step": 50, "whole": 28}) == "data"
    assert bound_by({"data": 100, "step": 50, "whole": 30}) == "overhead"


def test_the_table_names_each_part():
    res = {"images_per_second": {"data": 5000.0, "step": 1000.0, "whole": 900.0},
           "machine": {"gpu": "NVIDIA H100"}, "image_size": 256, "batch_size": 64,
           "device": "cuda", "pipeline": "device", "amp": "bfloat16", "whole_over_step": 0.9,
           "bound_by": "model", "peak_memory_mb": 1234.0, "setup_seconds": 3.0,
           "first_step_seconds": 9.5, "host_syncs": 3, "steps": 30}
    table = format_bench(res, "train")
    assert "5,000.0" in table and "90%" in table and "NVIDIA H100" in table
    assert "first step 9.5 s" in table and "3 times in 30 steps" in table
