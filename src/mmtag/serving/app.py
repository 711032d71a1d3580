"""The tagging service's HTTP API (FastAPI): `create_app(predictor, options)`.

    GET  /             a page to try the model (no external files: it works offline)
    GET  /healthz      {"status": "ok"} once the model is loaded and warmed up
    GET  /v1/model     labels, decision rule and thresholds, inputs, limits, versions
    POST /v1/tag       multipart: image (a file), caption (text) -> labels with probabilities
    POST /v1/tag/batch multipart: images (files), captions (texts, same order and count)
    GET  /docs         the OpenAPI documentation

Bad input gets a 4xx answer whose "detail" names the problem; nothing a client sends stops
the server.
"""

from __future__ import annotations

import io
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError

import mmtag
from mmtag.data.images import to_rgb
from mmtag.serving.batcher import MicroBatcher

log = logging.getLogger("mmtag.serve")


@dataclass(frozen=True)
class ServeOptions:
    """How the service batches and what it accepts."""

    engine: str | None = None  # None: the fastest the export offers (serve's choice)
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16  # samples in one model call
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    max_image_mb: float = 10.0  # largest upload per image
    max_pixels: int = 40_000_000  # width x height; above: a possible decompression bomb
    max_caption_chars: int = 1000
    max_batch_items: int = 64  # samples in one /v1/tag/batch request


class BadInput(Exception):
    """A client's mistake: answered with `status` and `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def decode_image(data: bytes, name: str, opts: ServeOptions) -> Image.Image:
    """An uploaded file as an RGB image, or BadInput saying what is wrong with it."""
    if len(data) > opts.max_image_mb * 2**20:
        raise BadInput(413, f"{name}: {len(data) / 2**20:.1f} MB is over the limit of "
                            f"{opts.max_image_mb:g} MB per image")
    if not data:
        raise BadInput(400, f"{name}: the file is empty")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise BadInput(413, f"{name}: the image is too large in pixels (a possible "
                            f"decompression bomb); limit {opts.max_pixels:,} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise BadInput(415, f"{name}: not an image that can be read (send a JPEG, PNG, WebP, "
                            f"GIF, BMP or TIFF file)") from None
    w, h = img.size
    if w * h > opts.max_pixels:  # checked on the header, before any pixel is decoded
        raise BadInput(413, f"{name}: {w} x {h} pixels is over the limit of "
                            f"{opts.max_pixels:,} pixels (a possible decompression bomb); "
                            f"resize it first")
    try:
        img.load()
        return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadInput(400, f"{name}: the image is truncated or corrupt ({e})") from None


def check_caption(caption: str | None, where: str, needs_caption: bool,
                  opts: ServeOptions) -> str:
    caption = (caption or "").strip()
    if needs_caption and not caption:
        raise BadInput(422, f"{where}: no caption; this model reads one (send the form field "
                            f"'caption' with a line of text about the photo)")
    if len(caption) > opts.max_caption_chars:
        raise BadInput(422, f"{where}: the caption has {len(caption)} characters, over the limit "
                            f"of {opts.max_caption_chars}")
    return caption


def sample_result(pred, probs: np.ndarray, chosen: np.ndarray) -> dict:
    """One sample's answer: the chosen labels and every label's probability with the threshold
    it was held against (expected-F1 sets: the lowest chosen probability, this image's cut)."""
    labels = pred.label_map.labels
    if pred.rule == "expected_f1":
        cut = float(probs[chosen.astype(bool)].min()) if chosen.any() else 1.0
        thresholds = np.full(len(labels), cut)
    else:
        thresholds = pred.thresholds
    scores = [{"label": int(lab), "probability": round(float(p), 6),
               "threshold": round(float(t), 6), "chosen": bool(c)}
              for lab, p, t, c in zip(labels, probs, thresholds, chosen, strict=True)]
    scores.sort(key=lambda s: -s["probability"])
    return {"labels": [int(lab) for lab, c in zip(labels, chosen, strict=True) if c],
            "scores": scores}


def page_html() -> str:
    return resources.files("mmtag.serving").joinpath("page.html").read_text()


def create_app(pred, opts: ServeOptions, label_names: dict[str, str] | None = None) -> FastAPI:
    """The service around a loaded, warmed-up predictor (any engine); `label_names` maps label
    ids (as text) to names shown on the page."""
    batcher = MicroBatcher(pred.predict_probs, opts.max_batch, opts.max_wait_ms)
    page = page_html()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="mmtag", version=mmtag.__version__, lifespan=lifespan,
                  description="Tags a photo and its caption with a set of labels.")
    limit_single = opts.max_image_mb * 2**20 + 2**20
    limit_batch = opts.max_image_mb * 2**20 * opts.max_batch_items + 2**20

    @app.middleware("http")
    async def refuse_large_bodies(request: Request, call_next):
        # before the multipart parser spools the body: a stated size over the limit is refused
        size = request.headers.get("content-length")
        limit = limit_batch if request.url.path.endswith("/batch") else limit_single
        if size and size.isdigit() and int(size) > limit:
            return JSONResponse({"detail": f"the request has {int(size) / 2**20:.1f} MB, over "
                                           f"the limit of {limit / 2**20:.0f} MB"}, 413)
        return await call_next(request)

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, e: BadInput):
        return JSONResponse({"detail": e.message}, e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        msgs = [f"{'.'.join(str(x) for x in err['loc'][1:]) or 'request'}: {err['msg']}"
                for err in e.errors()]
        return JSONResponse({"detail": "; ".join(msgs)}, 422)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.exception("request %s failed", request.url.path)
        return JSONResponse({"detail": f"the server failed on this request: {e}"}, 500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model() -> dict:
        return {**pred.describe(), "label_names": label_names or {}, "limits": asdict(opts),
                "batching": batcher.stats.as_dict()}

    async def tag_many(files: list[UploadFile], captions: list[str | None]) -> list[dict]:
        images = []
        for i, f in enumerate(files):
            if f is None:  # a caption-only model
                images.append(None)
                continue
            where = f"sample {i} ({f.filename or 'image'})" if len(files) > 1 else \
                (f.filename or "image")
            data = await f.read()
            images.append(decode_image(data, where, opts) if pred.reads_images else None)
        captions = [check_caption(c, f"sample {i}" if len(files) > 1 else "caption",
                                  pred.reads_captions, opts) for i, c in enumerate(captions)]
        t = time.perf_counter()
        probs = await batcher.submit(images, captions)
        chosen = pred.decide(probs)
        ms = round(1000 * (time.perf_counter() - t), 1)
        return [{**sample_result(pred, p, c), "model_ms": ms}
                for p, c in zip(probs, chosen, strict=True)]

    @app.post("/v1/tag")
    async def tag(image: Annotated[UploadFile | None, File(description="the photo")] = None,
                  caption: Annotated[str | None, Form(description="one line about it")] = None
                  ) -> dict:
        if image is None and pred.reads_images:
            raise BadInput(422, "no image: send the photo as the multipart file field 'image'")
        return (await tag_many([image], [caption]))[0]

    @app.post("/v1/tag/batch")
    async def tag_batch(
            images: Annotated[list[UploadFile] | None, File(description="photos")] = None,
            captions: Annotated[list[str] | None, Form(description="one per photo")] = None
    ) -> dict:
        images = images or []
        if not images and pred.reads_images:
            raise BadInput(422, "no images: send the photos as repeated multipart file fields "
                                "'images', with one 'captions' field each")
        if len(images) > opts.max_batch_items:
            raise BadInput(413, f"{len(images)} images in one request, over the limit of "
                                f"{opts.max_batch_items}; split the batch")
        captions = captions or []
        images = images or [None] * len(captions)  # a caption-only model
        if pred.reads_captions and len(captions) != len(images):
            raise BadInput(422, f"{len(images)} images but {len(captions)} captions: send one "
                                f"'captions' field per image, in the same order")
        return {"results": await tag_many(images, captions or [None] * len(images))}

    return app
