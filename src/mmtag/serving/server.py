"""`mmtag serve`: load a model, warm it up, then open the port (uvicorn)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

from PIL import Image

from mmtag.atomic import read_json
from mmtag.data.labels import NAMES_FILE, read_label_names
from mmtag.inference.base import PredictorBase
from mmtag.inference.predictor import load_predictor
from mmtag.prediction.export_format import ExportError, export_folder, read_model_json
from mmtag.run_files import SUMMARY_FILE, RunInvalidError
from mmtag.serving.app import ServeOptions, create_app
from mmtag.serving.security import KEY_ENV, allowed_hosts, is_loopback, require_key

log = logging.getLogger("mmtag.serve")


def choose_engine(path: Path, engine: str | None) -> str:
    """`engine`, or the fastest that `path` offers: the int8 export, the fp32 export, the
    run's best.pt."""
    if engine:
        return engine
    try:
        files = read_model_json(export_folder(path))["files"]
    except ExportError:
        return "torch"
    return "onnx-int8" if "int8" in files else "onnx"


def default_label_names(path: Path) -> Path | None:
    """labels.txt of the data folder the run was trained on, when there is one."""
    for folder in (path, path.parent, path / ".."):
        summary = folder / SUMMARY_FILE
        if summary.is_file():
            data_dir = read_json(summary).get("data_dir")
            if data_dir and (Path(data_dir) / NAMES_FILE).is_file():
                return Path(data_dir) / NAMES_FILE
    return None


def warm_up(pred: PredictorBase, max_batch: int) -> float:
    """Run the model once on one sample and once on a full batch, so that the first request
    does not pay for lazy initialisation; the seconds it took."""
    t = time.perf_counter()
    size = pred.image_size or 32
    img = Image.new("RGB", (size, size), (128, 128, 128))
    for n in (1, max_batch):
        pred.predict_probs([img] * n, ["a photo"] * n)
    return time.perf_counter() - t


def serve(path: Path | str, opts: ServeOptions, label_names: Path | str | None = None,
          no_auth: bool = False) -> None:
    """Load, warm up and serve `path`. Bound beyond this machine the service needs a key
    (opts.api_key, else $MMTAG_API_KEY) unless `no_auth`: checked before the model loads."""
    import uvicorn

    key = opts.api_key if opts.api_key is not None else os.environ.get(KEY_ENV)
    opts = dataclasses.replace(opts, api_key=require_key(opts.host, key, no_auth))
    path = Path(path)
    names_file = Path(label_names) if label_names else default_label_names(path)
    names = read_label_names(names_file) if names_file else {}
    engine = choose_engine(path, opts.engine)
    t = time.perf_counter()
    pred = load_predictor(path, engine, "cpu" if engine != "torch" else "auto")
    if pred.unfinished:
        raise RunInvalidError(f"{pred.unfinished}; then serve it")
    log.info("loaded %s with the %s engine in %.1f s", path, engine, time.perf_counter() - t)
    log.info("warmed up in %.1f s", warm_up(pred, opts.max_batch))
    app = create_app(pred, opts, names)
    hosts = allowed_hosts(opts.host, opts.allow_hosts)
    log.info("answering requests addressed to %s (--allow-host adds names)",
             "any host name" if hosts == ["*"] else ", ".join(hosts))
    if opts.api_key:
        log.info("an API key is required (Authorization: Bearer KEY or X-API-Key: KEY)")
    elif not is_loopback(opts.host):
        log.warning("binding %s with --no-auth: every machine that reaches it can use this "
                    "service, with no key", opts.host)
    log.info("serving on http://%s:%d (the page at /, the API docs at /docs)", opts.host,
             opts.port)
    uvicorn.run(app, host=opts.host, port=opts.port, log_level="info")
