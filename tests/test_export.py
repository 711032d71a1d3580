"""`mmtag export` and the onnx engines: ONNX Runtime's probabilities equal PyTorch's, the files
describe themselves, and predict / evaluate / benchmark run on them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mmtag.cli import main
from mmtag.config import load_config
from mmtag.data.csv_io import read_csv
from mmtag.inference.export import MODEL_JSON, ExportError, export_run
from mmtag.inference.onnx_engine import OnnxPredictor, preprocess_image
from mmtag.inference.predictor import Predictor, load_predictor
from mmtag.models.text_encoders import GloveLSTMEncoder, LstmShape
from mmtag.training import loop

# one worker builds this module's runs (make test runs with --dist loadgroup)
pytestmark = pytest.mark.xdist_group("export")

BASE = ["data.image_size=64", "data.num_workers=0", "model.pretrained=false",
        "model.image_encoder=efficientnet_lite0", "model.freeze_image=3", "optim.batch_size=8",
        "data.len_quantile=1.0", "optim.epochs=1", "data.lemmatizer=none", "amp=none"]
# the report's pipeline: GloVe BiLSTM, concatenation, an MLP head
GLOVE = [*BASE, "model.lstm_hidden=8", "model.lstm_layers=2", "model.hidden=16"]
# the cpu recipe's shape: MiniLM tokens and the image map read by label queries, an attention
# image head, per-modality heads averaged in, flip TTA, expected-F1 sets, fp16 storage
QUERY = [*BASE, "model.text_encoder=minilm", "model.freeze_text=5", "model.fusion=query",
         "model.query_dim=32", "model.query_pre_head=true", "model.aux_heads=ensemble",
         "model.image_head=attention", "model.head_weights=[1.0,1.0,0.5]", "tta_flip=true",
         "decision=expected_f1", "model.fp16_storage=true"]


@pytest.fixture(scope="module")
def runs(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for name, overrides in (("glove", GLOVE), ("query", QUERY)):
        cfg = load_config(None, [*overrides, f"cache.dir={root / 'cache'}"])
        loop.fit(cfg, demo, root / name, progress=False)
        export_run(root / name, root / name / "export", int8=True)
    return root


@pytest.mark.parametrize("layers,bidirectional", [(1, True), (2, True), (1, False)])
def test_the_unpacked_lstm_equals_the_packed_one(layers, bidirectional):
    torch.manual_seed(0)
    shape = LstmShape(embed_dim=8, hidden=6, layers=layers, bidirectional=bidirectional)
    enc = GloveLSTMEncoder(30, shape).eval()
    lengths = torch.tensor([7, 1, 3, 5, 2])
    ids = torch.randint(1, 30, (5, 7))
    for i, n in enumerate(lengths):
        ids[i, n:] = 0
    with torch.no_grad():
        packed, unpacked = enc(ids, lengths), enc.for_export()(ids, lengths)
    assert packed.shape == unpacked.shape == (5, enc.out_dim)
    assert torch.allclose(packed, unpacked, atol=1e-6)


@pytest.mark.parametrize("name", ["glove", "query"])
def test_onnx_probabilities_equal_pytorch_on_real_images(runs, demo, name):
    rows = read_csv(demo / "train.csv")
    torch_pred = Predictor.load(runs / name, "cpu")
    onnx_pred = OnnxPredictor.load(runs / name, "onnx")
    expected = torch_pred.probabilities(torch_pred.dataset(rows, demo / "data"), 16)
    got = onnx_pred.probabilities(onnx_pred.dataset(rows, demo / "data"), 16)
    assert got.shape == expected.shape == (40, torch_pred.label_map.num_classes)
    assert np.abs(got - expected).max() < 1e-4
    # int8 is close, not equal
    int8 = OnnxPredictor.load(runs / name, "onnx-int8")
    assert np.abs(int8.probabilities(int8.dataset(rows, demo / "data"), 16) - expected).max() < 0.1


def test_batches_of_pixels_are_normalised_as_single_images_are(runs, demo):
    # the loader hands uint8 pixels, normalised a batch at a time; predict_probs normalises
    # the images it is given: the two paths feed the graph the same numbers
    rows = read_csv(demo / "train.csv")[:5]
    pred = OnnxPredictor.load(runs / "query", "onnx")
    ds = pred.dataset(rows, demo / "data")
    assert ds[0][0].dtype == torch.uint8
    batch = pred._inputs(torch.stack([ds[i][0] for i in range(len(rows))]))
    one_by_one = np.stack([preprocess_image(Image.open(demo / "data" / r.image_id),
                                            pred.meta["image"]) for r in rows])
    assert batch.dtype == np.float32 and np.array_equal(batch, one_by_one)
    images = [Image.open(demo / "data" / r.image_id) for r in rows]
    assert np.abs(pred.predict_probs(images, [r.caption for r in rows])
                  - pred.probabilities(ds, 2)).max() < 1e-6


@pytest.mark.parametrize("name", ["glove", "query"])
def test_openvino_runs_the_export_as_onnx_runtime_does(runs, demo, name):
    pytest.importorskip("openvino")
    rows = read_csv(demo / "train.csv")
    onnx_pred = OnnxPredictor.load(runs / name, "onnx")
    expected = onnx_pred.probabilities(onnx_pred.dataset(rows, demo / "data"), 16)
    try:
        ov_pred = OnnxPredictor.load(runs / name, "openvino")
    except ExportError as e:
        # refused at load, where the check found OpenVINO (2026.4) off from ONNX Runtime at a
        # batch beyond 4 on the query-fusion model; the GloVe model, which it computes
        # exactly, must never be refused
        assert name == "query" and "use --engine onnx" in str(e)
        return
    got = ov_pred.probabilities(ov_pred.dataset(rows, demo / "data"), 16)
    assert np.abs(got - expected).max() < 1e-4  # fp32 both: the same sums, other kernels
    again = ov_pred.probabilities(ov_pred.dataset(rows, demo / "data"), 16)
    assert np.array_equal(got, again)  # a rerun is byte-identical
    # single samples (another batch shape) and the caption head
    one = ov_pred.predict_probs([None], [rows[0].caption])
    assert one.shape == (1, onnx_pred.label_map.num_classes)
    assert np.abs(one - onnx_pred.predict_probs([None], [rows[0].caption])).max() < 1e-4
    assert ov_pred.describe()["file"] == "model.onnx"


def test_an_engine_that_computes_the_model_wrongly_is_refused_at_load(runs, monkeypatch):
    pytest.importorskip("openvino")
    from mmtag.inference import onnx_engine

    right = onnx_engine.OpenVinoSession.run
    monkeypatch.setattr(onnx_engine.OpenVinoSession, "run",  # as OpenVINO's fault did: batch > 4
                        lambda self, names, feeds: [o + (len(o) > 4) * 0.01
                                                    for o in right(self, names, feeds)])
    with pytest.raises(onnx_engine.ExportError, match="use --engine onnx"):
        OnnxPredictor.load(runs / "query", "openvino")


def test_the_caption_head_is_exported_for_rows_without_an_image(runs, demo):
    rows = read_csv(demo / "train.csv")[:6]
    torch_pred = Predictor.load(runs / "query", "cpu")
    onnx_pred = OnnxPredictor.load(runs / "query", "onnx")
    assert onnx_pred.has_caption_head and torch_pred.has_caption_head
    expected = torch_pred.caption_probabilities(torch_pred.dataset(rows, demo / "data"))
    got = onnx_pred.caption_probabilities(onnx_pred.dataset(rows, demo / "data"))
    assert np.abs(got - expected).max() < 1e-4


def test_model_json_describes_the_preprocessing_that_torch_applies(runs, demo):
    meta = json.loads((runs / "query" / "export" / MODEL_JSON).read_text())
    assert meta["labels"] == list(Predictor.load(runs / "query", "cpu").label_map.labels)
    assert meta["decision"]["rule"] == "expected_f1"
    assert meta["tta_flip"] is True
    assert meta["inputs"] == ["images", "ids", "lengths"]
    assert meta["outputs"] == ["probs", "caption_probs"]
    assert meta["caption"]["kind"] == "minilm" and meta["caption"]["source"] == "tokenizer"
    assert (runs / "query" / "export" / "tokenizer").is_dir()
    assert meta["files_mb"]["int8"] < meta["files_mb"]["fp32"]
    img = Image.open(demo / "data" / "0.jpg")
    torch_tf = Predictor.load(runs / "query", "cpu").transform()
    assert np.abs(preprocess_image(img, meta["image"]) - torch_tf(img.convert("RGB")).numpy()
                  ).max() < 1e-5


def test_an_export_moved_elsewhere_still_predicts(runs, demo, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(runs / "query" / "export", moved)
    pred = OnnxPredictor.load(moved, "onnx")
    row = read_csv(demo / "train.csv")[0]
    labels = pred.predict([(demo / "data" / row.image_id, row.caption)])
    assert labels == Predictor.load(runs / "query", "cpu").predict(
        [(demo / "data" / row.image_id, row.caption)])


def test_predict_and_evaluate_give_the_same_answers_with_each_engine(runs, demo, tmp_path, capsys):
    subs = {}
    for engine in ("torch", "onnx"):
        out = tmp_path / f"{engine}.csv"
        assert main(["predict", str(runs / "query"), "--csv", str(demo / "test.csv"),
                     "--images", str(demo / "data"), "--out", str(out),
                     "--engine", engine]) == 0
        subs[engine] = out.read_text()
    assert subs["torch"] == subs["onnx"]
    capsys.readouterr()
    figures = {}
    for engine in ("torch", "onnx", "onnx-int8"):
        assert main(["evaluate", str(runs / "glove"), "--data", str(demo), "--json",
                     "--engine", engine]) == 0
        figures[engine] = json.loads(capsys.readouterr().out)
    assert figures["onnx"]["engine"] == "onnx"
    assert figures["onnx"]["rows"] == figures["torch"]["rows"] > 0
    assert figures["onnx"]["micro_f1"] == pytest.approx(figures["torch"]["micro_f1"])
    assert 0 <= figures["onnx-int8"]["micro_f1"] <= 1


def test_benchmark_compares_the_engines_side_by_side(runs, demo, capsys):
    assert main(["benchmark", str(runs / "glove"), "--csv", str(demo / "test.csv"),
                 "--images", str(demo / "data"), "--n", "8", "--batch-size", "4",
                 "--single", "3", "--engine", "torch,onnx,onnx-int8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [e["engine"] for e in res["engines"]] == ["torch", "onnx", "onnx-int8"]
    for e in res["engines"]:
        assert e["samples_per_second"] > 0 and e["single_latency_ms_median"] > 0
    assert main(["benchmark", str(runs / "glove"), "--csv", str(demo / "test.csv"),
                 "--images", str(demo / "data"), "--n", "4", "--single", "2",
                 "--engine", "torch,onnx"]) == 0
    table = capsys.readouterr().out
    assert "samples/s" in table and "\n  onnx " in table


def test_benchmark_reports_a_refused_engine_beside_the_others(runs, demo, capsys, monkeypatch):
    from mmtag.inference import onnx_engine

    def refuse(self, path, threads):
        raise ExportError("--engine openvino: its probabilities differ; use --engine onnx")
    monkeypatch.setattr(onnx_engine.OnnxPredictor, "check_against_onnx_runtime", refuse)
    args = ["benchmark", str(runs / "glove"), "--csv", str(demo / "test.csv"), "--images",
            str(demo / "data"), "--n", "4", "--single", "2"]
    assert main([*args, "--engine", "onnx,openvino"]) == 0
    table = capsys.readouterr().out
    assert "\n  onnx " in table and "openvino   refused: --engine openvino" in table
    assert main([*args, "--engine", "openvino"]) != 0  # asked for alone, it is an error
    assert "use --engine onnx" in capsys.readouterr().err


def test_the_cli_export_writes_its_files(runs, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["export", str(runs / "glove"), "--out", str(out)]) == 0
    assert "ONNX Runtime agrees with PyTorch" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.onnx"]
    assert json.loads((out / MODEL_JSON).read_text())["files"] == {"fp32": "model.onnx"}


@pytest.mark.parametrize("argv,message", [
    (["--engine", "onnx"], "no exported model in"),
    (["--engine", "onnx-int8"], "no exported model in"),
])
def test_engine_mistakes_get_one_line(runs, demo, tmp_path, capsys, argv, message):
    bare = tmp_path / "bare"
    shutil.copytree(runs / "glove", bare, ignore=shutil.ignore_patterns("export"))
    assert main(["predict", str(bare), "--csv", str(demo / "test.csv"), "--images",
                 str(demo / "data"), "--out", str(tmp_path / "p.csv"), *argv]) == 4  # no run
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_missing_int8_file_or_a_damaged_model_json_is_named(runs, tmp_path, capsys):
    out = tmp_path / "exp"
    shutil.copytree(runs / "glove" / "export", out)
    meta = json.loads((out / MODEL_JSON).read_text())
    meta["files"].pop("int8")
    (out / MODEL_JSON).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="has no int8 model"):
        load_predictor(out, "onnx-int8")
    (out / MODEL_JSON).write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        load_predictor(out, "onnx")
    (out / MODEL_JSON).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        load_predictor(out, "onnx")


def test_a_program_without_mmtag_gets_the_same_answer_from_model_json(runs, demo):
    """tools/onnx_standalone.py reads only model.json, the graph and the tokenizer files."""
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).parents[1] / "tools" / "onnx_standalone.py"
    row = read_csv(demo / "train.csv")[3]
    image = demo / "data" / row.image_id
    out = subprocess.run([sys.executable, str(tool), str(runs / "query" / "export"), str(image),
                          row.caption], capture_output=True, text=True, check=True).stdout
    answer = json.loads(out)
    pred = OnnxPredictor.load(runs / "query", "onnx")
    probs = pred.predict_probs([Image.open(image)], [row.caption])
    got = np.array([answer["probabilities"][str(lab)] for lab in pred.label_map.labels])
    assert np.abs(got - probs[0]).max() < 1e-5
    assert answer["labels"] == list(pred.predict([(image, row.caption)])[0])


def test_a_failed_export_leaves_the_earlier_one_whole(runs, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    export_run(runs / "glove", out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def broken(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr("mmtag.inference.quantize.quantize_model", broken)
    with pytest.raises(OSError, match=r"could not write the export .*exp \(while making "
                                      r".*model-int8.onnx\): No space left on device"):
        export_run(runs / "glove", out, int8=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]  # no staging folder left


def test_export_never_replaces_a_folder_of_other_files(runs, tmp_path):
    with pytest.raises(ValueError, match="input folder"):
        export_run(runs / "glove", runs / "glove")  # the run folder itself
    foreign = tmp_path / "other-tool"  # another tool's files, even named as an export's
    foreign.mkdir()
    (foreign / "model.json").write_text('{"name": "theirs"}')
    (foreign / "model.onnx").write_bytes(b"their graph")
    with pytest.raises(ValueError, match="no mmtag export"):
        export_run(runs / "glove", foreign)
    assert (foreign / "model.onnx").read_bytes() == b"their graph"
    assert (runs / "glove" / "best.pt").exists()


def test_an_export_older_than_the_runs_best_pt_is_refused(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "glove", run)
    load_predictor(run, "onnx")  # fresh: loads
    torch.save({**torch.load(run / "best.pt", weights_only=False), "retrained": True},
               run / "best.pt")
    with pytest.raises(ValueError, match="made from an earlier"):
        load_predictor(run, "onnx")
