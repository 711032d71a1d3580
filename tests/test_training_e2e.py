"""End to end on tiny synthetic data: train -> files -> evaluate -> predict -> resume."""

import csv
import json
import os

import pytest
import torch

from conftest import TINY as BASE_TINY
from mmtag import runtime
from mmtag.config import load_config
from mmtag.data.csv_io import read_csv
from mmtag.data.dataset import Split
from mmtag.evaluation.metrics import multilabel_metrics
from mmtag.evaluation.thresholds import expected_f1_sets
from mmtag.inference.predictor import PredictOptions, Predictor, evaluate_run, predict_csv
from mmtag.prediction import passes
from mmtag.prediction.checkpoint import ModelTooLargeError
from mmtag.runtime import choose_precision
from mmtag.training import loop, run_folder, setup

TINY = [*BASE_TINY, "optim.lr=1e-3"]
RUN_FILES = {"config.yaml", "labels.json", "vocab.json", "split.json", "metrics.csv", "best.pt", "val_probs.csv",
             "last.pt", "summary.json", "curves.png"}


@pytest.fixture(scope="module")
def run(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    loop.fit(load_config(None, [*TINY, "optim.epochs=2"]), demo, out, progress=False)
    return out


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_run_writes_every_file(run):
    assert {p.name for p in run.iterdir()} >= RUN_FILES
    rows = _rows(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for col in ("train_loss", "val_loss", "val_precision", "val_recall", "val_micro_f1",
                "val_macro_f1", "val_samples_f1", "lr", "seconds"):
        assert col in rows[0]
    best = torch.load(run / "best.pt", weights_only=True)
    assert len(best["thresholds"]) == len(best["labels"]["labels"])
    assert {"config", "caption", "model", "at_least_one"} <= set(best)
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and "optimizer" in last and "rng" in last
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_rows"] == 8 and 0.0 <= summary["val"]["micro_f1"] <= 1.0
    # amp: auto (the default) records what it chose on this machine and why
    assert summary["precision"]["amp"] == "auto"
    assert summary["precision"]["dtype"] == choose_precision("auto", torch.device("cpu")).name
    assert summary["precision"]["reason"].startswith("auto: ")
    # the run records what its timings depend on
    assert 0 < summary["wall_seconds"] < 3600
    machine = summary["machine"]
    assert machine["cpu"] and machine["logical_cpus"] == os.cpu_count()
    assert machine["device"] == "cpu" and machine["gpu"] is None
    assert machine["torch"] == torch.__version__


def test_evaluate_and_predict(run, demo, tmp_path):
    m = evaluate_run(run, data_dir=demo)
    assert m["rows"] == 8 and len(m["per_class"]) == len(json.loads((run / "labels.json").read_text())["labels"])
    out, probs = tmp_path / "Predicted_labels.csv", tmp_path / "probs.csv"
    predict_csv(run, demo / "test.csv", demo / "data", out, probs_out=probs)
    sub = read_csv(out)
    assert [r.image_id for r in sub] == [r.image_id for r in read_csv(demo / "test.csv")]
    assert out.read_text().startswith("ImageID,Labels\n")
    assert len(_rows(probs)) == 8
    # the Python API agrees with the CSV path
    pred = Predictor.load(run)
    rows = read_csv(demo / "test.csv")[:3]
    pairs = [(demo / "data" / r.image_id, r.caption) for r in rows]
    assert pred.predict(pairs) == [tuple(map(str, r.labels)) for r in sub[:3]]


def test_predict_names_a_missing_image_or_predicts_from_the_caption(run, demo, tmp_path):
    import shutil
    images = tmp_path / "img"
    shutil.copytree(demo / "data", images)
    victim = read_csv(demo / "test.csv")[2]
    (images / victim.image_id).unlink()
    with pytest.raises(OSError, match=rf"{victim.image_id}.*line {victim.line}"):
        predict_csv(run, demo / "test.csv", images, tmp_path / "p.csv")
    res = predict_csv(run, demo / "test.csv", images, tmp_path / "p.csv", options=PredictOptions(caption_only_missing=True))
    assert len(res["caption_only"]) == 1 and len(read_csv(tmp_path / "p.csv")) == 8
    # this model has no caption head of its own: a blank image stands in, and it says so
    assert res["caption_only_via"].startswith("a blank image")


def test_a_missing_image_is_predicted_by_the_caption_head_alone(demo, tmp_path):
    import shutil
    run = tmp_path / "aux"
    loop.fit(load_config(None, [*TINY, "optim.epochs=1", "model.aux_heads=ensemble"]), demo, run,
             progress=False)
    images = tmp_path / "img"
    shutil.copytree(demo / "data", images)
    rows = read_csv(demo / "test.csv")
    (images / rows[2].image_id).unlink()
    full, part = tmp_path / "full.csv", tmp_path / "part.csv"
    predict_csv(run, demo / "test.csv", demo / "data", tmp_path / "a.csv", probs_out=full)
    res = predict_csv(run, demo / "test.csv", images, tmp_path / "b.csv", probs_out=part,
                      options=PredictOptions(caption_only_missing=True))
    assert res["caption_only_via"] == "the caption head" and len(res["caption_only"]) == 1
    p_full, p_part = ([[float(v) for k, v in r.items() if k != "ImageID"] for r in _rows(f)]
                      for f in (full, part))
    # the other rows are predicted as with every image present
    for i in (0, 1, 3, 4, 5, 6, 7):
        assert p_part[i] == pytest.approx(p_full[i], abs=1e-5)
    # the missing one by the caption head: its probabilities, whatever the image would have said
    pred = Predictor.load(run)
    tok, n = pred.caption_enc(rows[2].caption)
    with torch.inference_mode(), runtime.autocast(pred.device, pred.precision.dtype):
        expected = torch.sigmoid(pred.model.caption_logits(torch.as_tensor(tok)[None],
                                                           torch.tensor([n])).float())[0]
    assert p_part[2] == pytest.approx(expected.tolist(), abs=1e-5)
    assert p_part[2] != pytest.approx(p_full[2], abs=1e-3)


# without EMA, and byte for byte with a pretrained cached encoder: tests/test_resume.py
@pytest.mark.parametrize("ema", ["optim.ema=0.9"])
def test_resume_after_interruption_ends_like_an_uninterrupted_run(demo, tmp_path, monkeypatch, ema):
    cfg = load_config(None, [*TINY, "optim.epochs=3", ema])
    loop.fit(cfg, demo, tmp_path / "full", progress=False)

    real = loop.train_one_epoch
    calls = {"n": 0}

    def crash_in_epoch_2(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # stands in for SIGKILL mid-epoch
        return real(*a, **k)

    monkeypatch.setattr(loop, "train_one_epoch", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        loop.fit(cfg, demo, tmp_path / "cut", progress=False)
    assert len(_rows(tmp_path / "cut" / "metrics.csv")) == 1
    monkeypatch.setattr(loop, "train_one_epoch", real)
    loop.fit(cfg, demo, tmp_path / "cut", resume=True, progress=False)
    full, cut = _rows(tmp_path / "full" / "metrics.csv"), _rows(tmp_path / "cut" / "metrics.csv")
    assert [r["epoch"] for r in cut] == ["1", "2", "3"]
    for a, b in zip(full, cut, strict=True):
        for k in ("train_loss", "val_loss", "val_micro_f1"):
            assert float(a[k]) == pytest.approx(float(b[k]), abs=1e-4), (a["epoch"], k)


def test_refuses_a_model_over_the_size_limit_up_front(demo, tmp_path):
    cfg = load_config(None, [*TINY, "model.max_size_mb=1"])
    with pytest.raises(ModelTooLargeError, match=r"would be \d+\.\d MB, over the 1 MB limit"):
        loop.fit(cfg, demo, tmp_path / "big", progress=False)
    assert not (tmp_path / "big" / "best.pt").exists()


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(demo, tmp_path, monkeypatch):
    cfg = load_config(None, [*TINY, "optim.epochs=2"])
    real = loop.train_one_epoch
    calls = {"n": 0}

    def nan_in_epoch_2(model, loader, loss_fn, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            loss_fn = lambda logits, t: logits.sum() * float("nan")  # noqa: E731
        return real(model, loader, loss_fn, *a, **k)

    monkeypatch.setattr(loop, "train_one_epoch", nan_in_epoch_2)
    with pytest.raises(loop.TrainingDivergedError, match="loss became nan.*last.pt"):
        loop.fit(cfg, demo, tmp_path / "nan", progress=False)
    assert torch.load(tmp_path / "nan" / "last.pt", weights_only=True)["epoch"] == 1


def test_refuses_to_overwrite_a_run(run, demo):
    with pytest.raises(FileExistsError, match="--resume"):
        loop.fit(load_config(None, TINY), demo, run, progress=False)


def test_a_run_stopped_before_its_first_epoch_starts_over(demo, tmp_path, monkeypatch):
    out = tmp_path / "early"
    # a wrong --data writes nothing
    with pytest.raises(FileNotFoundError, match="train.csv not found"):
        loop.fit(load_config(None, TINY), tmp_path / "nowhere", out, progress=False)
    assert not out.exists()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loop.fit(load_config(None, [*TINY, "optim.epochs=1"]), demo, out, progress=False)
    assert (out / "config.yaml").exists() and not (out / "last.pt").exists()
    hint = f"mmtag train --resume {out} --data {demo}"
    monkeypatch.undo()
    # without --restart the folder is left alone (it may be a run still in its first epoch)
    with pytest.raises(FileExistsError, match="holds no checkpoint") as e:
        loop.fit(load_config(out / "config.yaml"), demo, out, progress=False)
    assert hint in str(e.value) and (out / "config.yaml").exists()
    summary = loop.fit(load_config(out / "config.yaml"), demo, out, restart=True, progress=False)
    assert summary["best_epoch"] == 1 and len(_rows(out / "metrics.csv")) == 1
    # a folder with a checkpoint, or with anything else in it, is still refused
    with pytest.raises(FileExistsError, match="--resume"):
        loop.fit(load_config(out / "config.yaml"), demo, out, restart=True, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        loop.fit(load_config(None, TINY), demo, tmp_path / "other", restart=True, progress=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        loop.fit(load_config(None, TINY), demo, tmp_path / "afile", progress=False)


def test_resuming_a_run_stopped_before_its_first_checkpoint_starts_it_over(demo, tmp_path,
                                                                          monkeypatch):
    out = tmp_path / "early"
    monkeypatch.setattr(loop, "train_one_epoch", lambda *a, **k: (_ for _ in ()).throw(
        KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        loop.fit(load_config(None, [*TINY, "optim.epochs=1"]), demo, out, progress=False)
    monkeypatch.undo()
    summary = loop.fit(load_config(out / "config.yaml"), demo, out, resume=True, progress=False)
    assert summary["best_epoch"] == 1 and (out / "last.pt").exists()
    # a folder with anything else, or none at all, is no run to resume
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for folder in (tmp_path / "other", tmp_path / "absent"):
        with pytest.raises(FileNotFoundError, match="cannot resume"):
            loop.fit(load_config(None, TINY), demo, folder, resume=True, progress=False)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_a_second_process_cannot_train_in_a_run_folder_in_use(run, demo):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", (  # holds the lock as a training process
        "import os, sys, time; from pathlib import Path; from mmtag.training.run_folder import run_lock\n"
        f"with run_lock(Path({str(run)!r})):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(run_folder.RunInUseError, match="in use by another mmtag process"):
            loop.fit(load_config(run / "config.yaml"), demo, run, resume=True, progress=False)
    finally:
        holder.kill()
        holder.wait()
    with run_folder.run_lock(run):  # released when its process ended
        pass


def test_evaluate_on_the_validation_split_marks_tuned_thresholds_optimistic(run, demo):
    summary = json.loads((run / "summary.json").read_text())
    assert summary["decision"] == "threshold"
    m = evaluate_run(run, data_dir=demo)
    assert m["tuned_on_these_rows"] and m["source"].startswith("the run's validation split of")
    assert m["crossfit"]["micro_f1"] == summary["val_crossfit"]["micro_f1"]
    other = evaluate_run(run, data_dir=demo, options=PredictOptions(decision="expected_f1"))
    assert not other["tuned_on_these_rows"]
    assert other["crossfit"]["samples_f1"] == summary["val_crossfit_other_rule"]["samples_f1"]
    assert not evaluate_run(run, data_dir=demo, options=PredictOptions(threshold=0.5))["tuned_on_these_rows"]


def test_a_csv_without_captions_is_refused_by_a_model_that_reads_them(run, demo, tmp_path):
    rows = read_csv(demo / "test.csv")
    labels = tmp_path / "labels_only.csv"
    labels.write_text("ImageID,Labels\n" + "".join(f"{r.image_id},1\n" for r in rows))
    with pytest.raises(ValueError, match="no Caption column"):
        predict_csv(run, labels, demo / "data", tmp_path / "p.csv")
    with pytest.raises(ValueError, match="no Caption column"):
        evaluate_run(run, csv_path=labels, images=demo / "data")


def test_threshold_and_decision_options_exclude_each_other(run, demo, capsys):
    from mmtag.cli import main

    with pytest.raises(SystemExit):
        main(["predict", str(run), "--csv", str(demo / "test.csv"), "--images",
              str(demo / "data"), "--threshold", "0.4", "--decision", "expected_f1"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_benchmark_reports_throughput_and_latency(run, demo):
    from mmtag.inference.benchmark import benchmark, rows_with_images

    res = benchmark(run, rows_with_images(demo / "test.csv", demo / "data", 8), single=3,
                    options=PredictOptions(batch_size=4))
    (torch_res,) = res["engines"]
    assert res["rows"] == 8 and torch_res["engine"] == "torch"
    assert torch_res["samples_per_second"] > 0
    assert 0 < torch_res["single_latency_ms_median"] <= torch_res["single_latency_ms_p90"] + 1e-9
    assert res["machine"]["torch_threads"] == torch_res["threads"] and res["machine"]["cpu"]


def test_caption_only_and_image_only_models(demo, tmp_path):
    for name, override in (("txt", "model.image_encoder=none"), ("img", "model.text_encoder=none")):
        summary = loop.fit(load_config(None, [*TINY, override, "optim.epochs=1"]), demo,
                           tmp_path / name, progress=False)
        assert summary["val_rows"] == 8
        out = tmp_path / f"{name}.csv"
        res = predict_csv(tmp_path / name, demo / "test.csv", demo / "data", out)
        assert len(read_csv(out)) == 8 and res["decision"] == "the run's tuned thresholds"
    # an image-only model cannot predict a row without its image from the caption
    images = tmp_path / "imgs"
    import shutil
    shutil.copytree(demo / "data", images)
    (images / read_csv(demo / "test.csv")[0].image_id).unlink()
    with pytest.raises(OSError, match="reads no caption"):
        predict_csv(tmp_path / "img", demo / "test.csv", images, tmp_path / "x.csv",
                    options=PredictOptions(caption_only_missing=True))


def test_bf16_on_a_cpu_without_native_bf16_warns(demo, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)

    def stop(*a, **k):  # the warning comes before the data; emulated bf16 training is slow
        raise KeyboardInterrupt

    monkeypatch.setattr(setup, "prepare_data", stop)
    with caplog.at_level("INFO"), pytest.raises(KeyboardInterrupt):
        loop.fit(load_config(None, [*TINY, "optim.epochs=1", "amp=bf16", "device=cpu"]), demo,
                 tmp_path / "bf16", progress=False)
    assert "slower than fp32 here; use --set amp=auto" in caplog.text
    assert "precision: bf16 (amp=bf16 set by the recipe on a CPU without native bf16" in caplog.text


def test_evaluate_folds_batchnorm_on_a_copy_and_matches_the_model(run):
    pred = Predictor.load(run)  # any trained tagger; rebuild one with its BatchNorms unfolded
    from mmtag.models.build import build_tagger

    ckpt = torch.load(run / "best.pt", weights_only=True)
    model = build_tagger(pred.config.model, len(ckpt["thresholds"]), pred.caption_enc,
                         load_pretrained=False)
    model.load_state_dict({k: v.float() for k, v in ckpt["model"].items()})
    model.eval()
    torch.manual_seed(0)
    images = torch.randn(6, 3, 32, 32)
    ids = torch.randint(1, 5, (6, 4))
    lengths = torch.full((6,), 4)
    target = torch.zeros(6, len(ckpt["thresholds"]))
    with torch.no_grad():
        expected = torch.sigmoid(model(images, ids, lengths))
    encoder = model.image_encoder
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
    loader = [(images, ids, lengths, target)]
    copies = []
    encoder.for_inference = lambda **kw: copies.append(type(encoder).for_inference(encoder, **kw)) or copies[-1]
    _, probs, _ = passes.evaluate(model, loader, None, torch.device("cpu"))
    assert len(copies) == 1 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in copies[0].modules())
    torch.testing.assert_close(torch.from_numpy(probs), expected, rtol=1e-4, atol=1e-5)
    # the model keeps its own encoder, BatchNorms and all
    assert model.image_encoder is encoder
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules()) == n_bn > 0


def test_expected_f1_decision_is_saved_and_used_everywhere(demo, tmp_path):
    run = tmp_path / "ef1"
    summary = loop.fit(load_config(None, [*TINY, "optim.epochs=1", "decision=expected_f1",
                                          "at_least_one=true"]), demo, run, progress=False)
    assert summary["decision"] == "expected_f1"
    assert summary["val_crossfit_other_rule"]["decision"] == "threshold"
    assert 0 <= summary["val_crossfit_other_rule"]["micro_f1"] <= 1
    m = evaluate_run(run, data_dir=demo)
    assert m["decision"] == "expected-F1 label sets"
    assert m["samples_f1"] == pytest.approx(summary["val"]["samples_f1"], abs=1e-6)
    out = tmp_path / "pred.csv"
    predict_csv(run, demo / "test.csv", demo / "data", out)
    assert all(r.labels for r in read_csv(out))  # at_least_one holds under this rule too
    with pytest.raises(ValueError, match="decision must be one of"):
        load_config(None, ["decision=top3"])


def test_decision_rule_can_be_overridden_from_the_command_line(run, demo, tmp_path, capsys):
    from mmtag.cli import main

    assert main(["evaluate", str(run), "--data", str(demo), "--json",
                 "--decision", "expected_f1"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["decision"] == "expected-F1 label sets"
    pred = Predictor.load(run)
    ds = pred.dataset(Split.load(run / "split.json").apply(read_csv(demo / "train.csv"))[1],
                      demo / "data")
    probs = pred.probabilities(ds)
    want = multilabel_metrics(ds.targets.numpy().astype(int), expected_f1_sets(probs))
    assert m["samples_f1"] == pytest.approx(want["samples_f1"], abs=1e-9)
    out = tmp_path / "sub.csv"
    assert main(["predict", str(run), "--csv", str(demo / "test.csv"), "--images",
                 str(demo / "data"), "--out", str(out), "--decision", "expected_f1"]) == 0
    assert len(read_csv(out)) == 8
