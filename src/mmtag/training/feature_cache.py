"""Cached outputs of the frozen part of the network, so a CPU trains only what is not frozen.

The frozen prefix of the image encoder (stages [0, k)), or a fully frozen caption encoder, is run
once over the data and its outputs are stored on disk, one `.npy` file per image (or caption):

    <root>/<spec folder>/<2 hex>/<sha1 of the image file's bytes>.npy

* Keys are content hashes, and the spec folder's name hashes everything else that changes the
  output (encoder, fingerprint of the frozen weights, stage, input size, normalisation, flip, format
  version): an edited image, another backbone, resolution or preprocessing is never served stale.
* Each file is written through mmtag.atomic (temporary name, fsync, rename), so a run killed
  while caching, or one that ran out of disk, leaves only complete entries behind and the next
  run extracts just what is missing; runs sharing the store write identical entries.
* With `flip`, each entry also holds the features of the horizontally flipped image: flip
  augmentation for training and flip test-time augmentation come from the cache too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from mmtag.atomic import atomic_write
from mmtag.data.csv_io import Record
from mmtag.data.dataset import ImageRows
from mmtag.data.images import (
    ImageReadError,
    ImageTransformSpec,
    build_transform,
    exif_orientation,
    load_image,
)
from mmtag.outputs import is_regular_file
from mmtag.runtime import autocast

log = logging.getLogger("mmtag.cache")

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """$MMTAG_CACHE_DIR, else ~/.cache/mmtag/features."""
    env = os.environ.get("MMTAG_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "mmtag" / "features"


def image_key(path: Path) -> str:
    """The cache key of an image file: the sha1 of its bytes; for a photo with an EXIF
    orientation, of its bytes and that fact (it is decoded turned upright since that was
    added, so entries made from its pixels as stored are never read for it)."""
    data = Path(path).read_bytes()
    h = hashlib.sha1(data)
    # JPEG's APP1 "Exif", PNG's "eXIf", WebP's "EXIF" come early; most photos have none
    if b"exif" in data[:1 << 16].lower():
        try:
            with Image.open(io.BytesIO(data)) as im:
                turned = exif_orientation(im) != 1
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            turned = False  # the image's own error comes when it is decoded
        if turned:
            h.update(b"\0exif-orientation-applied")
    return h.hexdigest()


def module_fingerprint(module: nn.Module) -> str:
    """sha1 over a module's state dict (names, dtypes, shapes and values)."""
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        if name.endswith("num_batches_tracked"):  # a counter; does not change outputs
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class CacheSpec:
    """Everything besides the input that determines a cached output."""

    kind: str            # 'image' or 'text'
    encoder: str         # encoder name
    weights: str         # fingerprint of the frozen weights that produce the output
    stage: int           # image: output of stages [0, stage); stage == num_stages + 1: pooled
    size: int = 0        # image input size
    normalisation: str = ""
    flip: bool = False
    max_len: int = 0     # text: token length
    format: int = CACHE_FORMAT
    precision: str = "fp32"  # autocast dtype of the extraction ('fp32': none)
    engine: str = "torch"    # what ran the frozen layers: 'torch' or 'openvino'

    def folder_name(self) -> str:
        fields = asdict(self)
        # defaults left out keep the names of caches written before the field existed
        if fields["precision"] == "fp32":
            del fields["precision"]
        if fields["engine"] == "torch":
            del fields["engine"]
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
        if self.kind == "image":
            return f"{self.encoder}-stage{self.stage}-{self.size}px{'-flip' if self.flip else ''}-{digest}"
        return f"{self.encoder}-text{self.max_len}-{digest}"


class FeatureStore:
    """A folder of `<key>.npy` arrays written atomically."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        """The stored array, or None when absent (or unreadable, which is then deleted)."""
        p = self.path(key)
        if not p.exists():
            return None
        try:
            return np.load(p)
        except (ValueError, OSError, EOFError):
            p.unlink(missing_ok=True)
            return None

    def put(self, key: str, array: np.ndarray) -> None:
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        # atomic and synced: another run reading this store, or a run resumed after a crash or
        # a full disk, sees the whole entry or none
        buf = io.BytesIO()  # serialised first: numpy reports a short write without its errno
        np.save(buf, array)
        atomic_write(p, buf.getbuffer())


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], where: Sequence[str], transform):
        self.paths, self.where, self.transform = list(paths), list(where), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(load_image(self.paths[i], self.where[i])), i


def _report(done: int, total: int, t0: float, what: str) -> None:
    rate = done / max(time.time() - t0, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("inf")
    log.info("caching %s: %d/%d (%.1f/s, ETA %.0f s)", what, done, total, rate, eta)


def image_digests(records: Sequence[Record], image_dir: Path, source: str) -> list[str]:
    """Content hash of every row's image; a missing image is an error naming its row."""
    out = []
    for r in records:
        p = image_dir / r.image_id
        if p.exists() and not is_regular_file(p):  # a FIFO would block the read forever
            raise ImageReadError(f"image {p} ({source} line {r.line}) is not a regular file (a "
                                 f"folder, FIFO, device or socket); it was not opened: put the "
                                 f"photo itself there")
        try:
            out.append(image_key(p))
        except FileNotFoundError:
            raise ImageReadError(f"image {p} ({source} line {r.line}, {r.image_id}) does not exist") from None
    return out


@dataclass(frozen=True)
class CacheOptions:
    """How the frozen image stages run over the photos. `dtype` (e.g. torch.bfloat16) runs
    them under CPU autocast, as the trained model's predictor will (its `amp` setting), so
    cached and raw-image paths compute the same thing; `engine` 'openvino' runs them through
    OpenVINO (resolve_engine), at the same precision."""

    root: Path | None = None    # the cache's folder (None: default_cache_dir())
    flip: bool = True           # the mirror image's features too
    batch_size: int = 32
    num_workers: int = 0        # decoding processes
    progress: bool = False
    dtype: torch.dtype | None = None
    engine: str = "torch"


@dataclass(frozen=True)
class _FrozenStages:
    """Stages [0, end) of an inference-ready encoder, as one function of an image batch."""

    fast: nn.Module             # the encoder, BatchNorm folded
    run: object                 # stage_runner's function
    pooled: bool                # then pooled (stage num_stages + 1)


@torch.inference_mode()
def cache_image_features(encoder: nn.Module, stage: int, rows: ImageRows,
                         transform_spec: ImageTransformSpec,
                         opts: CacheOptions = CacheOptions()) -> np.ndarray:
    """(N, V, ...) float16 outputs of `encoder` stages [0, stage) (pooled when stage is
    `num_stages + 1`) for every row, V = 2 with `opts.flip` (original, flipped) else 1."""
    if opts.engine == "openvino":
        # fp32 under OpenVINO: faster than its bf16 (51 against 38 images/s for Lite2's
        # stages 0-6 at 448 px, docs/performance.md) and equal to torch's fp32 after the
        # cache's fp16 rounding, where bf16 moves the features by 6 %
        opts = dataclasses.replace(opts, dtype=None)
    rows = ImageRows(rows.records, Path(rows.image_dir), rows.source)
    end = min(stage, encoder.num_stages)
    spec = CacheSpec("image", encoder.name, module_fingerprint(nn.ModuleList(encoder.stages[:end])),
                     stage, transform_spec.size, transform_spec.normalisation, opts.flip,
                     precision=_precision(opts.dtype), engine=opts.engine)
    store = FeatureStore(Path(opts.root or default_cache_dir()) / spec.folder_name())
    digests = image_digests(rows.records, rows.image_dir, rows.source)
    for attempt in range(2):
        todo = _missing(store, digests)
        if todo:
            log.info("caching %s features (stage %d%s, %d px) of %d images into %s",
                     encoder.name, stage, " pooled" if stage > end else "", transform_spec.size,
                     len(todo), store.folder)
            fast = encoder.for_inference(channels_last=True)
            stages = _FrozenStages(fast, stage_runner(fast, end, opts.engine, opts.dtype,
                                                      transform_spec.size), stage > end)
            _extract_images(stages, store, rows.subset(todo), [digests[i] for i in todo],
                            transform_spec, opts)
        try:
            return _load_all(store, digests, rows.records)
        except _CorruptEntry:
            if attempt:  # the bad entry was deleted and extracted again, and is bad again
                raise
    raise AssertionError("unreachable")


def _missing(store: FeatureStore, keys: Sequence[str]) -> list[int]:
    """The index of the first row of each key the store lacks."""
    todo: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k not in todo and not store.path(k).exists():
            todo[k] = i
    return list(todo.values())


def _extract_images(stages: _FrozenStages, store: FeatureStore, rows: ImageRows,
                    keys: Sequence[str], transform_spec: ImageTransformSpec,
                    opts: CacheOptions) -> None:
    """Run the frozen stages over the rows' images, original and with `opts.flip` mirrored,
    and store each row's (V, ...) float16 output under its key."""
    fast, run, pooled = stages.fast, stages.run, stages.pooled
    dev = next(fast.parameters()).device
    ds = _Images([rows.image_dir / r.image_id for r in rows.records],
                 [f"{rows.source} line {r.line}, {r.image_id}" for r in rows.records],
                 build_transform(transform_spec, train=False))
    loader = torch.utils.data.DataLoader(ds, batch_size=opts.batch_size,
                                         num_workers=opts.num_workers)
    t0, last, done = time.time(), time.time(), 0
    bar = None
    if opts.progress:
        from tqdm import tqdm
        bar = tqdm(total=len(ds), desc="caching image features", unit="img", leave=False)
    for x, pos in loader:
        outs = []
        for v in [x, x.flip(-1)] if opts.flip else [x]:
            y = run(v.to(dev)).float()
            outs.append((fast.pool(y) if pooled else y).cpu())
        feats = torch.stack(outs, 1).to(torch.float16).contiguous().numpy()  # (B, V, ...)
        for j, p in enumerate(pos.tolist()):
            store.put(keys[p], feats[j])
        done += len(pos)
        if bar is not None:
            bar.update(len(pos))
        elif time.time() - last > 30:
            _report(done, len(ds), t0, "image features")
            last = time.time()
    if bar is not None:
        bar.close()
    log.info("cached %d images in %.0f s (%.1f images/s)", len(ds), time.time() - t0,
             len(ds) / max(time.time() - t0, 1e-9))


ENGINES = ("torch", "openvino")


def resolve_engine(name: str) -> str:
    """cache.engine resolved: 'auto' is OpenVINO where it is installed (it ran the frozen
    stages of Lite2 faster than PyTorch here, docs/performance.md), else PyTorch."""
    if name != "auto":
        if name == "openvino" and importlib.util.find_spec("openvino") is None:
            raise ValueError("cache.engine=openvino needs the openvino package: pip install "
                             "openvino (or set cache.engine=torch)")
        return name
    return "openvino" if importlib.util.find_spec("openvino") is not None else "torch"


def stage_runner(fast: nn.Module, end: int, engine: str, dtype: torch.dtype | None,
                 size: int):
    """A function of an image batch (B, 3, size, size) -> the output of stages [0, end) of
    the inference-ready encoder `fast`, under the autocast `dtype`, run by `engine`."""
    if engine == "torch":
        dev = next(fast.parameters()).device

        def run_torch(x: torch.Tensor) -> torch.Tensor:
            with autocast(dev, dtype):
                return fast.run_stages(x.contiguous(memory_format=torch.channels_last), 0, end)
        return run_torch
    if engine != "openvino":
        raise ValueError(f"unknown cache engine {engine!r}; choose from {list(ENGINES)}")
    return _openvino_runner(fast, end, dtype, size)


class _Prefix(nn.Module):
    """Stages [0, end) as one module, for export."""

    def __init__(self, encoder: nn.Module, end: int) -> None:
        super().__init__()
        self.encoder, self.end = encoder, end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.run_stages(x, 0, self.end)


def _openvino_runner(fast: nn.Module, end: int, dtype: torch.dtype | None, size: int):
    """The frozen stages exported to ONNX (a temporary file) and compiled by OpenVINO for this
    CPU, at the precision `dtype` names (fp32 when None), with torch's thread count. The ONNX
    file is made afresh each time (about a second): no file of it can go stale."""
    import openvino as ov

    module = _Prefix(fast.cpu(), end).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stages.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python-level shape checks
            # traced at the cache's size: TF "same" padding depends on it (a dynamic size
            # would keep the traced size's padding)
            torch.onnx.export(module, (torch.zeros(2, 3, size, size),), str(path),
                              input_names=["images"], output_names=["features"],
                              opset_version=17, dynamo=False,
                              dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
        hint = {None: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
        compiled = ov.Core().compile_model(str(path), "CPU", {
            "INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": hint})
    request = compiled.create_infer_request()
    out = compiled.outputs[0]

    def run_openvino(x: torch.Tensor) -> torch.Tensor:
        result = request.infer({"images": np.ascontiguousarray(x.float().cpu().numpy())})
        return torch.from_numpy(np.array(result[out], copy=True))
    return run_openvino


def _precision(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


class _CorruptEntry(RuntimeError):
    pass


def _load_all(store: FeatureStore, keys: Sequence[str], records: Sequence) -> np.ndarray:
    out = None
    for i, k in enumerate(keys):
        arr = store.get(k)  # deletes an unreadable entry
        if arr is not None and out is None:
            out = np.empty((len(keys), *arr.shape), dtype=arr.dtype)
        if arr is None or arr.shape != out.shape[1:]:
            store.path(k).unlink(missing_ok=True)
            name = getattr(records[i], "image_id", records[i])
            raise _CorruptEntry(f"feature cache entry for {name} in {store.folder} was missing "
                                f"or corrupt (deleted); rerun to extract it again")
        out[i] = arr
    return out


@torch.inference_mode()
def cache_text_features(encoder: nn.Module, stage: int, ds, *, root: Path | None = None,
                        dtype: torch.dtype | None = None) -> np.ndarray:
    """Float16 outputs of the frozen part of a caption encoder for the captions of `ds` (a
    TaggingDataset: token ids (N, T), lengths (N,), its records' captions): token states
    (N, T, D) after `stage` layers, or pooled features (N, D) when `stage` is
    `num_layers + 1`; stored once per distinct caption text (and token length T)."""
    ids, lengths = ds.tokens, ds.lengths
    captions = [r.caption for r in ds.records]
    batch_size = 128
    pooled = stage > encoder.num_layers
    spec = CacheSpec("text", type(encoder).__name__, module_fingerprint(encoder), stage,
                     max_len=int(ids.shape[1]), precision=_precision(dtype))
    store = FeatureStore(Path(root or default_cache_dir()) / spec.folder_name())
    keys = [hashlib.sha1(c.encode("utf-8")).hexdigest() for c in captions]
    idx = _missing(store, keys)
    if idx:
        encoder = encoder.eval()
        dev = next(encoder.parameters()).device
        log.info("caching caption features of %d captions into %s", len(idx), store.folder)
        t0, last = time.time(), time.time()
        for s in range(0, len(idx), batch_size):
            chunk = torch.as_tensor(idx[s: s + batch_size])
            x, n = ids[chunk].to(dev), lengths[chunk].to(dev)
            with autocast(dev, dtype):
                out = encoder(x, n) if pooled else encoder.run_layers(x, n, 0, stage)
            feats = out.float().to(torch.float16).cpu().numpy()
            for j, i in enumerate(chunk.tolist()):
                store.put(keys[i], feats[j])
            if time.time() - last > 30:
                _report(s + len(chunk), len(idx), t0, "caption features")
                last = time.time()
    return _load_all(store, keys, [str(k) for k in keys])
