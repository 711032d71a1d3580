"""The cached-feature fast path: keys, resumable extraction, and agreement with raw images."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmtag.config import load_config
from mmtag.data.csv_io import read_csv
from mmtag.data.dataset import ImageRows
from mmtag.data.images import ImageTransformSpec
from mmtag.inference.predictor import Predictor, evaluate_run
from mmtag.models.image_encoders import build_image_encoder
from mmtag.training import loop
from mmtag.training.feature_cache import (
    CacheOptions,
    CacheSpec,
    FeatureStore,
    cache_image_features,
)


def _files(root):
    return sorted(p for p in root.rglob("*.npy"))


def test_cache_is_keyed_and_never_stale(demo, tmp_path):
    torch.manual_seed(0)
    enc = build_image_encoder("efficientnet_lite0", pretrained=False, freeze=3)
    rows = read_csv(demo / "train.csv")[:6]
    spec = ImageTransformSpec(size=32, normalisation="tf")
    feats = cache_image_features(enc, 3, ImageRows(rows, demo / "data"), spec,
                         CacheOptions(root=tmp_path, flip=True))
    assert feats.shape[:2] == (6, 2) and feats.dtype == np.float16
    ref = enc.eval().run_stages(torch.zeros(1, 3, 32, 32), 0, 3)
    assert feats.shape[2:] == ref.shape[1:]
    files = _files(tmp_path)
    stamps = [p.stat().st_mtime_ns for p in files]
    again = cache_image_features(enc, 3, ImageRows(rows, demo / "data"), spec,
                         CacheOptions(root=tmp_path, flip=True))
    np.testing.assert_array_equal(again, feats)
    assert [p.stat().st_mtime_ns for p in _files(tmp_path)] == stamps  # nothing re-extracted

    # an edited image gets a new entry; the others are reused
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for r in rows:
        (img_dir / r.image_id).write_bytes((demo / "data" / r.image_id).read_bytes())
    Image.new("RGB", (40, 40), (255, 0, 0)).save(img_dir / rows[0].image_id)
    edited = cache_image_features(enc, 3, ImageRows(rows, img_dir), spec,
                         CacheOptions(root=tmp_path, flip=True))
    assert not np.array_equal(edited[0], feats[0])
    np.testing.assert_array_equal(edited[1:], feats[1:])

    # another resolution, stage or backbone weights: another folder
    cache_image_features(enc, 3, ImageRows(rows, demo / "data"), ImageTransformSpec(size=64, normalisation="tf"),
                         CacheOptions(root=tmp_path, flip=True))
    enc2 = build_image_encoder("efficientnet_lite0", pretrained=False, freeze=3)
    cache_image_features(enc2, 3, ImageRows(rows, demo / "data"), spec,
                         CacheOptions(root=tmp_path, flip=True))
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("efficientnet")]) == 3
    # another precision (bf16 autocast, as a bf16 model predicts): another folder, close values
    bf = cache_image_features(enc, 3, ImageRows(rows, demo / "data"), spec,
                         CacheOptions(root=tmp_path, flip=True, dtype=torch.bfloat16))
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("efficientnet")]) == 4
    assert not np.array_equal(bf, feats)
    rel = np.linalg.norm(bf.astype(np.float32) - feats) / np.linalg.norm(feats.astype(np.float32))
    assert rel < 0.1


def test_fp32_cache_folders_keep_their_names():
    # caches written before the precision and engine fields existed must still be found
    spec = CacheSpec("image", "efficientnet_lite2", "abc", 8, 288, "tf", True)
    fields = {k: v for k, v in dataclasses.asdict(spec).items()
              if k not in ("precision", "engine")}
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    assert spec.folder_name() == f"efficientnet_lite2-stage8-288px-flip-{digest}"
    assert dataclasses.replace(spec, precision="bf16").folder_name() != spec.folder_name()
    # another engine's features differ in the last bits: they never share a folder
    assert dataclasses.replace(spec, engine="openvino").folder_name() != spec.folder_name()


def test_killed_extraction_resumes_without_corrupt_entries(demo, tmp_path, monkeypatch):
    enc = build_image_encoder("efficientnet_lite0", pretrained=False, freeze=2)
    rows = read_csv(demo / "train.csv")[:8]
    spec = ImageTransformSpec(size=32, normalisation="tf")
    real_put, calls = FeatureStore.put, {"n": 0}

    def dying_put(self, key, array):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed mid-write
        real_put(self, key, array)

    monkeypatch.setattr(FeatureStore, "put", dying_put)
    with pytest.raises(KeyboardInterrupt):
        cache_image_features(enc, 2, ImageRows(rows, demo / "data"), spec,
                         CacheOptions(root=tmp_path, batch_size=4))
    assert len(_files(tmp_path)) == 3 and not list(tmp_path.rglob(".tmp-*"))
    monkeypatch.setattr(FeatureStore, "put", real_put)
    feats = cache_image_features(enc, 2, ImageRows(rows, demo / "data"), spec,
                         CacheOptions(root=tmp_path, batch_size=4))
    assert len(_files(tmp_path)) == 8
    fresh = cache_image_features(enc, 2, ImageRows(rows, demo / "data"), spec,
                         CacheOptions(root=tmp_path / "new", batch_size=8))
    np.testing.assert_array_equal(feats, fresh)
    # a corrupt entry is detected, deleted and re-extracted
    victim = _files(tmp_path)[0]
    victim.write_bytes(b"garbage")
    again = cache_image_features(enc, 2, ImageRows(rows, demo / "data"), spec,
                         CacheOptions(root=tmp_path, batch_size=8))
    np.testing.assert_array_equal(again, feats)


@pytest.mark.parametrize("freeze, extra", [
    ("5", []), ("all", []),
    # the cpu recipe's pieces: class-attention image head (on the cached last map when all is
    # frozen), bf16 autocast for caching, training and prediction alike, EMA weights
    ("all", ["model.aux_heads=ensemble", "model.image_head=attention"]),
    pytest.param("5", ["model.aux_heads=ensemble", "model.image_head=attention", "amp=bf16",
                       "optim.ema=0.9", "optim.epochs=1"],
                 marks=pytest.mark.slow),  # 20 s where the CPU emulates bf16
    # label queries over the cached 2x2 map
    ("5", ["model.fusion=query", "model.query_dim=16", "model.query_heads=2"]),
    # label queries with the attention image head and the per-modality heads averaged in
    ("5", ["model.fusion=query", "model.query_dim=16", "model.query_heads=2",
           "model.aux_heads=ensemble", "model.image_head=attention"]),
])
def test_cached_training_is_an_ordinary_run(demo, tmp_path, freeze, extra):
    cfg = load_config(None, [
        "data.image_size=32", "data.num_workers=0", "model.pretrained=false",
        f"model.freeze_image={freeze}", "model.lstm_hidden=8", "model.hidden=16",
        "optim.batch_size=8", "optim.epochs=2", f"cache.dir={tmp_path / 'cache'}",
        "data.len_quantile=1.0", "tta_flip=true", *extra])
    run = tmp_path / "run"
    summary = loop.fit(cfg, demo, run, progress=False)
    assert any((tmp_path / "cache").rglob("*.npy"))
    assert summary["tta"] == {"flip": True, "sizes": [32]}
    assert any("-32px-" in p.name for p in (tmp_path / "cache").iterdir())
    # evaluate from raw images (the saved model is the whole network) agrees with the cached path
    m = evaluate_run(run, data_dir=demo)
    for k in ("micro_f1", "samples_f1"):
        assert m[k] == pytest.approx(summary["val"][k], abs=1e-6), k
    pred = Predictor.load(run)
    assert pred.model.image_input_stage == 0
    if "optim.ema=0.9" in extra:  # best.pt holds the averaged weights, last.pt the raw ones
        best, last = (torch.load(run / f, weights_only=True) for f in ("best.pt", "last.pt"))
        assert best["epoch"] == last["epoch"] == 1
        k = "head.2.weight"
        torch.testing.assert_close(best["model"][k].float(), last["ema"]["shadow"][k].float(),
                                   rtol=1e-3, atol=1e-3)
        assert not torch.allclose(best["model"][k].float(), last["model"][k].float())
    assert json.loads((run / "summary.json").read_text())["val_rows"] == 8


@pytest.mark.parametrize("image, freeze_text, extra", [
    ("none", "4", []), ("efficientnet_lite0", "all", []),
    # label queries read the image's last feature map and the caption's token states: cached
    # token states after the last layer (frozen whole) or after layer 4 (top layers train)
    ("efficientnet_lite0", "all", ["model.fusion=query", "model.query_dim=16",
                                   "model.query_heads=2", "model.aux_heads=ensemble",
                                   "model.image_head=attention"]),
    ("efficientnet_lite0", "4", ["model.fusion=query", "model.query_dim=16",
                                 "model.query_heads=2", "model.aux_heads=ensemble"]),
])
def test_cached_caption_encoder_layers(demo, tmp_path, image, freeze_text, extra):
    cfg = load_config(None, [
        "data.image_size=32", "data.num_workers=0", f"model.image_encoder={image}",
        "model.freeze_image=all", "model.text_encoder=minilm", f"model.freeze_text={freeze_text}",
        "model.hidden=16", "optim.batch_size=8", "optim.epochs=1", "model.fp16_storage=true",
        f"cache.dir={tmp_path / 'cache'}", "data.max_len=12", *extra])
    run = tmp_path / "run"
    summary = loop.fit(cfg, demo, run, progress=False)
    assert any(p.name.startswith("MiniLMEncoder") for p in (tmp_path / "cache").iterdir())
    m = evaluate_run(run, data_dir=demo)  # from raw captions through the whole encoder
    assert m["micro_f1"] == pytest.approx(summary["val"]["micro_f1"], abs=1e-6)


@pytest.mark.parametrize("size", [32, 40])  # 40: TF "same" padding differs from 32's
def test_openvino_caches_what_torch_caches(demo, tmp_path, size):
    pytest.importorskip("openvino")
    enc = build_image_encoder("efficientnet_lite0", pretrained=True, freeze=4).eval()
    rows = read_csv(demo / "train.csv")[:12]
    spec = ImageTransformSpec(size=size, normalisation="tf")
    kw = dict(flip=True, batch_size=5)  # 12 rows: batches of 5, 5 and 2
    ref = cache_image_features(enc, 4, ImageRows(rows, demo / "data"), spec,
                         CacheOptions(root=tmp_path / "t", engine="torch", **kw)).astype(np.float32)
    got = cache_image_features(enc, 4, ImageRows(rows, demo / "data"), spec,
                         CacheOptions(root=tmp_path / "o", engine="openvino", **kw)).astype(np.float32)
    assert got.shape == ref.shape
    # fp32 both, rounded to fp16 in the cache: equal up to a few fp16 steps
    assert np.abs(got - ref).max() <= 2e-3 * max(1.0, np.abs(ref).max())
    assert [p.name for p in (tmp_path / "o").iterdir()] != [p.name for p in (tmp_path / "t").iterdir()]
    again = cache_image_features(enc, 4, ImageRows(rows, demo / "data"), spec,
                         CacheOptions(root=tmp_path / "o2", engine="openvino", **kw))
    assert np.array_equal(again.astype(np.float32), got)  # reruns are byte-identical


def test_the_cache_engine_is_chosen_by_what_is_installed(monkeypatch):
    import importlib.util

    from mmtag.training import feature_cache

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    assert feature_cache.resolve_engine("auto") == "torch"
    with pytest.raises(ValueError, match="pip install openvino"):
        feature_cache.resolve_engine("openvino")
    assert feature_cache.resolve_engine("torch") == "torch"
