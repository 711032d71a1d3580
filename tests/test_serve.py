"""`mmtag serve`: the API answers with the model's probabilities, refuses bad input with a 4xx
that names the problem and keeps serving, batches concurrent requests, serves its page, and
runs as a real HTTP server bound to 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import TINY as BASE_TINY
from mmtag.config import load_config
from mmtag.data.csv_io import read_csv
from mmtag.data.labels import read_label_names
from mmtag.inference.export import export_run
from mmtag.inference.onnx_engine import OnnxPredictor
from mmtag.serving.app import ServeOptions, create_app
from mmtag.serving.batcher import MicroBatcher, QueueFull
from mmtag.serving.server import choose_engine, warm_up
from mmtag.training import loop

# one worker builds this module's runs (make test runs with --dist loadgroup)
pytestmark = pytest.mark.xdist_group("serve")

TINY = [*BASE_TINY, "model.freeze_image=3", "optim.epochs=1", "data.lemmatizer=none", "amp=none",
        "model.aux_heads=loss"]


@pytest.fixture(scope="module")
def run(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    loop.fit(load_config(None, [*TINY, f"cache.dir={root / 'cache'}"]), demo, root / "run",
             progress=False)
    export_run(root / "run", root / "run" / "export", int8=True)
    return root / "run"


@pytest.fixture(scope="module")
def pred(run):
    p = OnnxPredictor.load(run, "onnx")
    warm_up(p, 4)
    return p


OPTS = ServeOptions(max_batch=4, max_wait_ms=2, max_image_mb=0.5, max_pixels=1_000_000,
                    max_caption_chars=200, max_batch_items=3)


@pytest.fixture(scope="module")
def client(pred):
    with TestClient(create_app(pred, OPTS, {"1": "circle"}), base_url="http://127.0.0.1") as c:
        yield c


def _jpeg(size=(48, 40), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def test_tag_returns_the_models_probabilities_and_decision(client, pred, demo):
    row = read_csv(demo / "train.csv")[0]
    data = (demo / "data" / row.image_id).read_bytes()
    r = client.post("/v1/tag", files={"image": (row.image_id, data, "image/jpeg")},
                    data={"caption": row.caption})
    assert r.status_code == 200, r.text
    answer = r.json()
    expected = pred.predict_probs([Image.open(io.BytesIO(data))], [row.caption])[0]
    got = {s["label"]: s["probability"] for s in answer["scores"]}
    assert np.allclose([got[lab] for lab in pred.label_map.labels], expected, atol=1e-5)
    chosen = pred.decide(expected[None])[0]
    assert answer["labels"] == [lab for lab, c in zip(pred.label_map.labels, chosen, strict=True) if c]
    assert [s["probability"] for s in answer["scores"]] == sorted(got.values(), reverse=True)
    assert all(s["chosen"] == (s["label"] in answer["labels"]) for s in answer["scores"])


def test_batch_answers_each_sample_in_order(client, pred):
    imgs = [_jpeg(color=c) for c in ((250, 0, 0), (0, 250, 0))]
    r = client.post("/v1/tag/batch", files=[("images", (f"{i}.jpg", b, "image/jpeg"))
                                            for i, b in enumerate(imgs)],
                    data={"captions": ["a red thing", "a green thing"]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2
    expected = pred.predict_probs([Image.open(io.BytesIO(b)) for b in imgs],
                                  ["a red thing", "a green thing"])
    for res, exp in zip(results, expected, strict=True):
        got = {s["label"]: s["probability"] for s in res["scores"]}
        assert np.allclose([got[lab] for lab in pred.label_map.labels], exp, atol=1e-5)


def test_model_health_and_docs(client, pred):
    assert client.get("/healthz").json() == {"status": "ok"}
    m = client.get("/v1/model").json()
    assert m["labels"] == list(pred.label_map.labels)
    assert m["engine"] == "onnx" and m["label_names"]["1"] == "circle"
    assert m["limits"]["max_batch_items"] == 3
    assert m["recipe"]["data"]["image_size"] == 32 and m["size_mb"] > 0
    assert "/v1/tag" in client.get("/openapi.json").json()["paths"]


def _noisy_jpeg() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("files,data,status,message", [
    ({"image": ("a.txt", b"hello, not an image", "text/plain")}, {"caption": "x"}, 415,
     "not an image"),
    ({"image": ("t.jpg", _noisy_jpeg()[:5000], "image/jpeg")}, {"caption": "x"}, 400, "truncated"),
    ({"image": ("e.jpg", b"", "image/jpeg")}, {"caption": "x"}, 400, "empty"),
    ({"image": ("big.png", _png_header_only(2000, 1000), "image/png")}, {"caption": "x"}, 413,
     "decompression bomb"),
    ({"image": ("noise.bmp", b"BM" + os.urandom(600_000), "image/bmp")}, {"caption": "x"},
     413, "over the limit"),
    ({"image": ("a.jpg", _jpeg(), "image/jpeg")}, {}, 422, "no caption"),
    ({"image": ("a.jpg", _jpeg(), "image/jpeg")}, {"caption": "   "}, 422, "no caption"),
    ({"image": ("a.jpg", _jpeg(), "image/jpeg")}, {"caption": "word " * 100}, 422,
     "over the limit of 200"),
    ({}, {"caption": "x"}, 422, "no image"),
])
def test_bad_input_gets_a_4xx_naming_the_problem(client, files, data, status, message):
    r = client.post("/v1/tag", files=files or None, data=data)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    # and the server goes on
    ok = client.post("/v1/tag", files={"image": ("a.jpg", _jpeg(), "image/jpeg")},
                     data={"caption": "a red square"})
    assert ok.status_code == 200


def test_batch_limits(client):
    files = [("images", (f"{i}.jpg", _jpeg(), "image/jpeg")) for i in range(4)]
    r = client.post("/v1/tag/batch", files=files, data={"captions": ["x"] * 4})
    assert r.status_code == 413 and "over the limit of 3" in r.json()["detail"]
    r = client.post("/v1/tag/batch", files=files[:2], data={"captions": ["x"]})
    assert r.status_code == 422 and "2 images but 1 captions" in r.json()["detail"]
    r = client.post("/v1/tag/batch", files=[files[0], ("images", ("b.txt", b"no", "text/plain"))],
                    data={"captions": ["x", "y"]})
    assert r.status_code == 415 and "sample 1 (b.txt)" in r.json()["detail"]


def test_a_stated_body_over_the_limit_is_refused_before_it_is_read(client):
    r = client.post("/v1/tag", content=b"x" * 10, headers={
        "content-type": "multipart/form-data; boundary=b", "content-length": str(3 * 2**20)})
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]


def test_a_streamed_body_over_the_limit_is_cut_off_with_413(client):
    def chunks():  # no Content-Length: the body arrives in pieces
        yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.jpg\"\r\n\r\n"
        for _ in range(40):
            yield b"x" * 65536
    r = client.post("/v1/tag", content=chunks(),
                    headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]
    assert client.get("/healthz").json() == {"status": "ok"}


def test_an_empty_batch_is_refused(client):
    r = client.post("/v1/tag/batch", data={"other": "x"})
    assert r.status_code == 422 and "no samples" in r.json()["detail"]


def test_the_page_works_offline_and_calls_the_api(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert 'type="file"' in html and 'id="caption"' in html
    assert 'apiFetch("/v1/tag"' in html and 'apiFetch("/v1/model")' in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "external resource"
    assert "@import" not in html and "cdn" not in html.lower()


def test_concurrent_requests_are_batched_and_answered_in_order():
    calls = []

    def predict(images, captions):
        calls.append(len(images))
        time.sleep(0.01)
        return np.array([[float(c)] for c in captions])

    async def go():
        b = MicroBatcher(predict, max_batch=4, max_wait_ms=50)
        b.start()
        out = await asyncio.gather(*(b.submit([None], [str(i)]) for i in range(10)))
        await b.stop()
        return out

    out = asyncio.run(go())
    assert [float(o[0, 0]) for o in out] == list(range(10))
    assert sum(calls) == 10 and max(calls) == 4 and len(calls) <= 4


def test_a_failing_batch_fails_its_requests_and_the_next_batch_runs():
    state = {"n": 0}

    def predict(images, captions):
        state["n"] += 1
        if state["n"] == 1:
            raise RuntimeError("boom")
        return np.zeros((len(images), 1))

    async def go():
        b = MicroBatcher(predict, max_batch=2, max_wait_ms=1)
        b.start()
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit([None], ["a"])
        out = await b.submit([None], ["b"])
        await b.stop()
        return out

    assert asyncio.run(go()).shape == (1, 1)


def test_one_bad_sample_fails_only_its_own_request():
    def predict(images, captions):
        if "bad" in captions:
            raise ValueError("cannot read this one")
        return np.ones((len(images), 1))

    async def go():
        b = MicroBatcher(predict, max_batch=8, max_wait_ms=50)
        b.start()
        out = await asyncio.gather(*(b.submit([None], [c]) for c in ("a", "bad", "c")),
                                   return_exceptions=True)
        await b.stop()
        return out

    good1, bad, good2 = asyncio.run(go())
    assert isinstance(bad, ValueError)
    assert good1.shape == good2.shape == (1, 1)


def test_a_full_queue_is_refused_not_grown():
    async def overfill():
        b = MicroBatcher(lambda i, c: np.ones((len(i), 1)), max_queue=2)
        b._queue = asyncio.Queue()  # not started: nothing drains it
        b._queue.put_nowait(object())
        await b.submit([None, None], ["a", "b"])

    with pytest.raises(QueueFull):
        asyncio.run(overfill())


def test_serve_options_are_checked():
    with pytest.raises(ValueError, match="--max-batch must be at least 1"):
        ServeOptions(max_batch=0)
    with pytest.raises(ValueError, match="--port"):
        ServeOptions(port=70000)


def test_engine_choice_and_label_names(run, tmp_path):
    assert choose_engine(run, None) == "onnx-int8"
    assert choose_engine(run, "torch") == "torch"
    assert choose_engine(tmp_path, None) == "torch"
    f = tmp_path / "labels.txt"
    f.write_text("# id name\n1 person\n3 traffic light\n")
    assert read_label_names(f) == {"1": "person", "3": "traffic light"}
    f.write_text("person\n")
    with pytest.raises(ValueError, match="line 1"):
        read_label_names(f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mmtag_serve_is_a_real_http_server_on_localhost(run, demo):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mmtag", "serve", str(run), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 60
        while True:  # the port opens only once the model is loaded and warmed up
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline, "the server did not open its port in 60 s"
                time.sleep(0.2)
        assert health.json() == {"status": "ok"}
        row = read_csv(demo / "train.csv")[0]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/tag", files={
            "image": (row.image_id, (demo / "data" / row.image_id).read_bytes(), "image/jpeg")},
            data={"caption": row.caption}, timeout=30)
        assert r.status_code == 200 and r.json()["labels"]
        model = httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=5).json()
        assert model["engine"] == "onnx-int8" and model["limits"]["host"] == "127.0.0.1"
        assert model["label_names"]["1"] == "circle"  # the demo data's labels.txt
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "warmed up" in out and f"http://127.0.0.1:{port}" in out
    assert out.index("warmed up") < out.index("Uvicorn running")
