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

import asyncio
import io
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

import mmtag
from mmtag.data.images import (
    DECODE_BUDGET_MB,
    ImageReadError,
    decode_cost,
    to_rgb,
    upright,
    within_budget,
)
from mmtag.serving.batcher import MicroBatcher, QueueFull
from mmtag.serving.body_limit import BodyLimit
from mmtag.serving.security import ApiKeyCheck, allowed_hosts

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
    max_queue: int = 256  # samples waiting for the model; more are answered 503
    max_decode_mb: float = DECODE_BUDGET_MB  # memory one photo's decoding may take
    allow_hosts: tuple[str, ...] = ()  # Host header names answered besides this machine's
    api_key: str | None = field(default=None, repr=False)  # None: no key asked (see security)

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_pixels", "max_caption_chars", "max_batch_items",
                     "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got "
                                 f"{getattr(self, name)}")
        if not self.max_decode_mb > 0:
            raise ValueError(f"--max-decode-mb must be more than 0, got {self.max_decode_mb}")
        if self.max_wait_ms < 0 or not self.max_image_mb > 0:
            raise ValueError("--max-wait-ms must be 0 or more and --max-image-mb more than 0")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be between 1 and 65535, got {self.port}")


class BadInput(Exception):
    """A client's mistake: answered with `status` and `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# a photo whose decoding may take more than this is decoded in the one heavy lane, one at a
# time: a client sending many huge images waits for itself, not everyone else (a 12 MP phone
# JPEG is about 120 MB)
HEAVY_DECODE_MB = 128


def decode_image(data: bytes, name: str, opts: ServeOptions,
                 size: int | None = None) -> Image.Image:
    """An uploaded file as an RGB image, upright (EXIF orientation applied) and resized to
    size x size (the model's own first step, so that a large photo is not held at full size),
    or BadInput saying what is wrong."""
    return finish_decode(open_upload(data, name, opts, size), name, size)


def open_upload(data: bytes, name: str, opts: ServeOptions,
                size: int | None = None) -> Image.Image:
    """An uploaded file opened (its header read, no pixel decoded yet) and its decoding cost
    bounded (`mmtag.data.images.within_budget`), or BadInput saying what is wrong."""
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
        within_budget(img, name, size, opts.max_decode_mb)
    except ImageReadError as e:
        raise BadInput(413, str(e)) from None
    return img


def finish_decode(img: Image.Image, name: str, size: int | None) -> Image.Image:
    """The pixels of an opened upload, upright, RGB, at size x size."""
    try:
        img.load()
        img = to_rgb(upright(img))
        # the same resize as the preprocessing's, which then leaves the image as it is
        return img.resize((size, size), Image.BILINEAR) if size else img
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
    labels, names = pred.label_map.labels, pred.label_map.display
    if pred.rule == "expected_f1":
        cut = float(probs[chosen.astype(bool)].min()) if chosen.any() else 1.0
        thresholds = np.full(len(labels), cut)
    else:
        thresholds = pred.thresholds
    scores = [{"label": lab, "name": name, "probability": round(float(p), 6),
               "threshold": round(float(t), 6), "chosen": bool(c)}
              for lab, name, p, t, c in zip(labels, names, probs, thresholds, chosen, strict=True)]
    scores.sort(key=lambda s: -s["probability"])
    return {"labels": [lab for lab, c in zip(labels, chosen, strict=True) if c],
            "names": [name for name, c in zip(names, chosen, strict=True) if c],
            "scores": scores}


def page_html() -> str:
    return resources.files("mmtag.serving").joinpath("page.html").read_text()


def add_error_handlers(app: FastAPI) -> None:
    """Every error answers JSON with a one-line "detail"."""

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


def add_body_limit(app: FastAPI, opts: ServeOptions) -> None:
    """413 for a body over the limit: the multipart body holds the image(s), the captions and
    the form's own bytes."""
    single = opts.max_image_mb * 2**20 + 2**20
    batch = opts.max_image_mb * 2**20 * opts.max_batch_items + 2**20
    app.add_middleware(BodyLimit, limit_for=lambda path: batch if path.endswith("/batch")
                       else single)


def add_docs(app: FastAPI) -> None:
    """GET /docs: the OpenAPI page (Swagger UI) from the files of the swagger-ui-bundle
    package, so that it loads nothing from a CDN (works offline, tells no third party)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import FileResponse
    from swagger_ui_bundle import swagger_ui_path

    files = {"swagger-ui-bundle.js": "swagger-ui-bundle.js", "swagger-ui.css": "swagger-ui.css",
             "favicon.png": "favicon-32x32.png"}

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="mmtag API",
                                   swagger_js_url="/docs/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/swagger-ui.css",
                                   swagger_favicon_url="/docs/favicon.png")

    @app.get("/docs/{name}", include_in_schema=False)
    async def docs_file(name: str):
        if name not in files:
            return JSONResponse({"detail": f"no file {name}"}, 404)
        return FileResponse(str(swagger_ui_path / files[name]))


def batch_size(pred, opts: ServeOptions, n_images: int, n_captions: int) -> int:
    """The samples in a /v1/tag/batch request, or BadInput: none, too many, or counts that
    differ where the model reads both."""
    n = max(n_images, n_captions)
    if n == 0:
        raise BadInput(422, "no samples: send the photos as repeated multipart file fields "
                            "'images', with one 'captions' field each")
    if n > opts.max_batch_items:
        raise BadInput(413, f"{n} samples in one request, over the limit of "
                            f"{opts.max_batch_items}; split the batch")
    if pred.reads_images and n_images != n or pred.reads_captions and n_captions != n:
        raise BadInput(422, f"{n_images} images but {n_captions} captions: send one "
                            f"'captions' field per image, in the same order")
    return n


def create_app(pred, opts: ServeOptions, label_names: dict[str, str] | None = None) -> FastAPI:
    """The service around a loaded, warmed-up predictor (any engine); `label_names` maps labels
    to names shown on the page, over the names the run was trained with."""
    label_names = {**dict(zip(pred.label_map.labels, pred.label_map.display, strict=True)),
                   **(label_names or {})}
    batcher = MicroBatcher(pred.predict_probs, opts.max_batch, opts.max_wait_ms,
                           max_queue=opts.max_queue)
    page = page_html()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="mmtag", version=mmtag.__version__, lifespan=lifespan,
                  description="Tags a photo and its caption with a set of labels.",
                  docs_url=None, redoc_url=None)  # /docs from local files: add_docs
    add_body_limit(app, opts)
    if opts.api_key:
        app.add_middleware(ApiKeyCheck, key=opts.api_key)
    # outermost: a request for another host name is answered 400 before anything else
    app.add_middleware(TrustedHostMiddleware,
                       allowed_hosts=allowed_hosts(opts.host, opts.allow_hosts))
    add_docs(app)
    add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/healthz")
    async def healthz():
        if not batcher.running:
            return JSONResponse({"status": "the model worker has stopped"}, 503)
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model() -> dict:
        limits = {k: v for k, v in asdict(opts).items() if k != "api_key"}  # never the secret
        return {**pred.describe(), "label_names": label_names, "limits": limits,
                "batching": batcher.stats.as_dict()}

    add_tag_routes(app, pred, opts, batcher)
    return app


def add_tag_routes(app: FastAPI, pred, opts: ServeOptions, batcher: MicroBatcher) -> None:
    """POST /v1/tag and /v1/tag/batch: uploads decoded (bounded, in worker threads), batched
    with other requests' samples, answered with labels and probabilities."""
    size = pred.image_size
    # at most this many photos are decoded at once, and of them one heavy one (HEAVY_DECODE_MB)
    decoding = asyncio.Semaphore(2 * (os.cpu_count() or 1))
    heavy_lane = asyncio.Semaphore(1)

    async def read_image(f: UploadFile, where: str) -> Image.Image:
        data = await f.read(int(opts.max_image_mb * 2**20) + 1)
        img = await run_in_threadpool(open_upload, data, where, opts, size)
        # decoded in a worker thread (the event loop keeps serving); a heavy photo waits in its
        # own lane, so that huge uploads queue behind each other, not before everyone's
        heavy = decode_cost(img) > HEAVY_DECODE_MB * 2**20
        async with heavy_lane if heavy else decoding:
            return await run_in_threadpool(finish_decode, img, where, size)

    async def tag_many(files: list[UploadFile | None], captions: list[str | None]) -> list[dict]:
        many = len(files) > 1
        images = []
        for i, f in enumerate(files):
            name = f.filename if f is not None and f.filename else "image"
            images.append(await read_image(f, f"sample {i} ({name})" if many else name)
                          if f is not None else None)
        captions = [check_caption(c, f"sample {i}" if many else "caption",
                                  pred.reads_captions, opts) for i, c in enumerate(captions)]
        t = time.perf_counter()
        try:
            probs = await batcher.submit(images, captions)
        except QueueFull:
            raise BadInput(503, "the server is at capacity; retry in a moment") from None
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
        images, captions = images or [], captions or []
        n = batch_size(pred, opts, len(images), len(captions))
        return {"results": await tag_many(images or [None] * n, captions or [None] * n)}
