"""Several processes (torchrun, gloo on the CPU) training and predicting as one; the device data
pipeline, which they use here, on the CPU."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import TINY as BASE_TINY
from mmtag.config import load_config
from mmtag.data.batching import Pass, shard_indices
from mmtag.data.dataset import ImageRows, TaggingDataset
from mmtag.data.demo import make_demo_data
from mmtag.data.device_batches import (
    DecodedBatches,
    DeviceBatches,
    PixelDataset,
    as_tensor,
)
from mmtag.data.images import build_transform, transform_spec
from mmtag.data.labels import LabelMap
from mmtag.data.pixel_cache import pixel_cache
from mmtag.distributed import SINGLE, gather_rows
from mmtag.inference.predictor import PredictOptions, predict_csv
from mmtag.training import loop

pytestmark = pytest.mark.xdist_group("distributed")  # one worker builds the runs once

TINY = [*BASE_TINY, "model.hidden=512", "optim.batch_size=32", "optim.lr=1e-3", "optim.epochs=2",
        "data.pipeline=device"]
# nothing random differs between one process and two: no dropout, no augmentation, no
# BatchNorm that trains (the encoder is frozen; label queries use LayerNorm)
EXACT = [*TINY, "model.freeze_image=all", "cache.enabled=off", "model.fusion=query",
         "model.query_dim=16", "model.query_heads=2", "model.dropout=0", "model.query_dropout=0",
         "data.hflip=0", "data.jitter=0", "data.hue=0", "data.degrees=0", "data.translate=0",
         "data.scale_min=1", "data.scale_max=1",
         "amp=none"]  # fp32: bf16 (amp: auto on a CPU with it) rounds the two sums differently


@pytest.fixture(scope="session")  # kept while the worker runs other modules between these tests
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    make_demo_data(d, n=40, seed=1, n_test=8)
    return d


@pytest.fixture(scope="session")  # kept while the worker runs other modules between these tests
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def torchrun(args: list[str], cache_dir, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MMTAG_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "mmtag", *args], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=300)


@pytest.fixture(scope="session")  # kept while the worker runs other modules between these tests
def runs(demo, cache_dir, tmp_path_factory):
    """The same training as one process with batch 8 and as two with batch 4 each."""
    base = tmp_path_factory.mktemp("runs")
    os.environ["MMTAG_CACHE_DIR"] = str(cache_dir)
    try:
        loop.fit(load_config(None, [*EXACT, "optim.batch_size=8"]), demo, base / "one",
                 progress=False)
    finally:
        del os.environ["MMTAG_CACHE_DIR"]
    sets = [a for kv in [*EXACT, "optim.batch_size=4"] for a in ("--set", kv)]
    res = torchrun(["train", "--data", str(demo), "--out", str(base / "two"), *sets], cache_dir,
                   base)
    assert res.returncode == 0, res.stderr[-3000:]
    return base / "one", base / "two", res


def _metrics(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_two_processes_equal_one_with_their_global_batch(runs):
    one, two, _ = runs
    for a, b in zip(_metrics(one), _metrics(two), strict=True):
        for key in ("train_loss", "val_loss", "val_micro_f1", "lr"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-4), key
    wa = torch.load(one / "best.pt", weights_only=True)["model"]
    wb = torch.load(two / "best.pt", weights_only=True)["model"]
    # Adam moves a weight by up to lr (1e-3) per step whatever the gradient's size, so where a
    # gradient is ~0, float summation order alone can flip a step: within one step's size
    for k in wa:
        torch.testing.assert_close(wa[k].float(), wb[k].float(), atol=1e-3, rtol=1e-3)


def test_rank_zero_alone_writes_and_speaks(runs):
    _, two, res = runs
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["val_rows"] == 8
    assert torch.load(two / "last.pt", weights_only=True)["world_size"] == 2
    assert len(_metrics(two)) == 2  # one row per epoch, not one per rank
    assert res.stdout.count("best epoch") == 1  # the summary is printed once
    assert summary["first_step_seconds"] > 0


def test_resume_with_another_world_size_is_refused(runs, demo):
    _, two, _ = runs
    with pytest.raises(ValueError, match=r"trained by 2 process\(es\).*nproc_per_node=2"):
        loop.fit(load_config(two / "config.yaml"), demo, two, resume=True, progress=False)


@pytest.mark.slow  # 14 s of torchrun processes; make test-slow runs it
def test_sharded_prediction_equals_one_process(runs, demo, cache_dir, tmp_path):
    one, _, _ = runs
    single = predict_csv(one, demo / "test.csv", demo / "data", tmp_path / "a.csv",
                         probs_out=tmp_path / "a_probs.csv",
                         options=PredictOptions(device="cpu"))
    assert single["rows"] == 8
    res = torchrun(["predict", str(one), "--csv", str(demo / "test.csv"), "--images",
                    str(demo / "data"), "--out", str(tmp_path / "b.csv"), "--probs",
                    str(tmp_path / "b_probs.csv")], cache_dir, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote 8 rows") == 1
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    rows_a = list(csv.reader((tmp_path / "a_probs.csv").read_text().splitlines()))[1:]
    rows_b = list(csv.reader((tmp_path / "b_probs.csv").read_text().splitlines()))[1:]
    assert [r[0] for r in rows_a] == [r[0] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert [float(x) for x in ra[1:]] == pytest.approx([float(x) for x in rb[1:]], abs=1e-5)


def test_shards_cover_every_row_once():
    for n, world in [(10, 3), (9, 3), (1, 2), (7, 4)]:
        pad = [shard_indices(n, r, world, equal="pad") for r in range(world)]
        assert len({len(p) for p in pad}) == 1
        drop = [shard_indices(n, r, world, equal="drop") for r in range(world)]
        assert sorted(torch.cat(drop).tolist()) == sorted(set(torch.cat(drop).tolist()))
        assert len(torch.cat(drop)) == n - n % world
        # gather_rows' interleaving puts every rank's rows back in order (simulated here)
        rows = torch.stack([torch.as_tensor(p) for p in pad], dim=1).flatten()[:n]
        assert rows.tolist() == list(range(n))
    assert gather_rows(torch.arange(5), 3, SINGLE).tolist() == [0, 1, 2]


def test_device_batches_equal_the_loaders_preprocessing(demo, tmp_path):
    """Validation batches made on the device hold exactly what the DataLoader path feeds the
    model: the same resize, the same normalisation, the same rows."""
    from mmtag.data.csv_io import read_csv

    rows = read_csv(demo / "train.csv")[:10]
    labels = LabelMap.from_records(rows)
    spec = transform_spec(load_config(None, TINY).data, "tf")
    ds = TaggingDataset(ImageRows(rows, demo / "data"), lambda c: (torch.zeros(3, dtype=torch.long), 3),
                        labels, build_transform(spec, train=False))
    pixels = as_tensor(pixel_cache([demo / "data" / r.image_id for r in rows],
                                   [r.image_id for r in rows], spec.size, tmp_path))
    batches = DeviceBatches(PixelDataset(pixels, ds.tokens, ds.lengths, ds.targets, spec, False),
                            torch.device("cpu"), Pass(4))
    got = torch.cat([b[0] for b in batches])
    want = torch.stack([ds[i][0] for i in range(len(ds))])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert torch.equal(torch.cat([b[3] for b in batches]), ds.targets)
    # prediction's batches decoded on the device (PIL on a CPU, nvJPEG on a GPU) likewise
    decoded = list(DecodedBatches(ds, spec, 4, torch.device("cpu")))
    assert len(decoded) == 3 and [len(b[0]) for b in decoded] == [4, 4, 2]
    torch.testing.assert_close(torch.cat([b[0] for b in decoded]), want, atol=1e-6, rtol=0)
    assert torch.equal(torch.cat([b[1] for b in decoded]), ds.tokens)


@pytest.mark.slow  # two more processes: about 15 s
def test_a_folder_refused_on_rank_zero_stops_every_rank(demo, cache_dir, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("the user's file")
    res = torchrun(["train", "--data", str(demo), "--out", str(taken),
                    *[a for kv in TINY for a in ("--set", kv)]], cache_dir, tmp_path)
    assert res.returncode != 0
    assert res.stderr.count("mmtag train: error:") == 2  # both ranks say it, neither hangs
    assert (taken / "notes.txt").read_text() == "the user's file"
