"""Predict with an exported model (`mmtag export`): ONNX Runtime or OpenVINO, numpy and PIL;
the `--engine onnx`, `onnx-int8` and `openvino` of predict, evaluate, benchmark and serve.
OpenVINO (an optional package: pip install openvino) reads the same model.onnx.

The preprocessing here is written from model.json alone (`resized_image`, `normalized`), not
borrowed from the training code: the parity test then checks the file's description as well as
the graph.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmtag.data.dataset import make_loader
from mmtag.data.images import to_rgb, upright
from mmtag.data.labels import LabelMap
from mmtag.data.tokenizers import tokenizer_from_dict
from mmtag.inference.export import (
    FORMAT,
    FORMAT_VERSION,
    MODEL_JSON,
    PARITY_TOLERANCE,
    TOKENIZER_DIR,
    ExportError,
    checkpoint_digest,
)
from mmtag.inference.predictor import PredictorBase

ENGINES = {"onnx": "fp32", "onnx-int8": "int8", "openvino": "fp32"}  # engine -> model.json file
REQUIRED_KEYS = ("labels", "decision", "inputs", "outputs", "image", "caption", "tta_flip",
                 "files", "model", "recipe", "versions", "created")
BLANK = Image.new("RGB", (32, 32))  # what stands in for a missing photo, as in Predictor
# captions of different lengths for the load-time check of an engine (a batch of 8: OpenVINO's
# fault shows from a batch of 4)
CHECK_CAPTIONS = ("A man riding a bike down a city street.", "Two dogs.",
                  "A plate with a sandwich, some chips and a pickle on a wooden table.", "A cat.",
                  "People waiting for a train at the station.", "A red bus.",
                  "A kitchen with a stove, a sink and a refrigerator.", "Sheep in a field.")


def export_folder(path: Path | str) -> Path:
    """The export folder for `path`: itself when it holds model.json, else its export/ (where
    `mmtag export RUN` writes by default)."""
    path = Path(path)
    for folder in (path, path / "export"):
        if (folder / MODEL_JSON).is_file():
            return folder
    raise ExportError(f"no exported model in {path} (no {MODEL_JSON} there or in "
                      f"{path / 'export'}): run mmtag export {path} first")


def read_model_json(folder: Path) -> dict:
    """model.json, checked: a file of another format or version is an error naming it."""
    path = folder / MODEL_JSON
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} cannot be read ({e}); export the run again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportError(f"{path} is not an mmtag export (format {FORMAT!r} expected)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path} is export format version {meta.get('format_version')}; this "
                          f"mmtag reads version {FORMAT_VERSION}: export the run again")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ExportError(f"{path} lacks {', '.join(missing)}; export the run again")
    problem = model_json_problem(meta, folder)
    if problem:
        raise ExportError(f"{path}: {problem}; it was not loaded: export the run again")
    return meta


# the inputs an export may have, in their order: images alone, a caption alone, or both
_INPUT_SETS = (["images"], ["ids", "lengths"], ["images", "ids", "lengths"])
_OUTPUT_SETS = (["probs"], ["probs", "caption_probs"])
MAX_CAPTION_TOKENS = 4096
MAX_IMAGE_SIZE = 2048  # as config.yaml's data.image_size


def model_json_problem(meta: dict, folder: Path) -> str:
    """What is wrong with model.json's contents (checked as strictly as config.yaml: types,
    ranges, the files it names staying inside the export folder), or ""."""
    labels = meta["labels"]
    if not isinstance(labels, list) or not labels or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in labels):
        return "labels must be a non-empty list of label ids"
    d = meta["decision"]
    if not isinstance(d, dict) or d.get("rule") not in ("threshold", "expected_f1"):
        return "decision.rule must be 'threshold' or 'expected_f1'"
    thr = d.get("thresholds")
    if not isinstance(thr, list) or len(thr) != len(labels) or not all(
            _is_number(t) and 0 < t < 1 for t in thr):
        return (f"decision.thresholds must be {len(labels)} numbers strictly between 0 and 1 "
                f"(one per label)")
    if not isinstance(d.get("at_least_one"), bool):
        return "decision.at_least_one must be true or false"
    if meta["inputs"] not in _INPUT_SETS:
        return f"inputs must be one of {_INPUT_SETS}, not {meta['inputs']!r}"
    if meta["outputs"] not in _OUTPUT_SETS:
        return f"outputs must be one of {_OUTPUT_SETS}, not {meta['outputs']!r}"
    return (_image_problem(meta) or _caption_problem(meta) or _files_problem(meta, folder)
            or _checkpoint_problem(meta))


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def _image_problem(meta: dict) -> str:
    image = meta["image"]
    if ("images" in meta["inputs"]) != isinstance(image, dict):
        return "image must be an object exactly when 'images' is an input"
    if image is None:
        return ""
    size = image.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= MAX_IMAGE_SIZE:
        return f"image.size must be a whole number of pixels in [8, {MAX_IMAGE_SIZE}]"
    for key in ("mean", "std"):
        v = image.get(key)
        if not isinstance(v, list) or len(v) != 3 or not all(_is_number(x) for x in v):
            return f"image.{key} must be 3 finite numbers (R, G, B)"
    if not all(x > 0 for x in image["std"]):
        return "image.std must be positive"
    if not isinstance(meta["tta_flip"], bool):
        return "tta_flip must be true or false"
    return ""


def _caption_problem(meta: dict) -> str:
    caption = meta["caption"]
    if ("ids" in meta["inputs"]) != isinstance(caption, dict):
        return "caption must be an object exactly when 'ids' is an input"
    if caption is None:
        return ""
    n = caption.get("max_len")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CAPTION_TOKENS:
        return f"caption.max_len must be a whole number in [1, {MAX_CAPTION_TOKENS}]"
    if caption.get("kind") == "minilm" and not _plain_name(caption.get("source", TOKENIZER_DIR)):
        return "caption.source must name a folder inside the export folder"
    return ""


def _plain_name(name) -> bool:
    """A name of a file in the export folder itself: no folder part, not absolute."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def _files_problem(meta: dict, folder: Path) -> str:
    files = meta["files"]
    if not isinstance(files, dict) or not isinstance(files.get("fp32"), str) or not set(
            files) <= {"fp32", "int8"}:
        return "files must name the fp32 model (and optionally the int8 one)"
    for kind, name in files.items():
        if not _plain_name(name):
            return (f"files.{kind} {name!r} is not a file name inside the export folder "
                    f"(a path elsewhere is never loaded)")
        if not (folder / name).is_file():
            return f"files.{kind} names {name}, which is not in {folder}"
    return ""


def _checkpoint_problem(meta: dict) -> str:
    ck = meta.get("checkpoint")
    if not isinstance(ck, dict) or not _plain_name(ck.get("file")) or not isinstance(
            ck.get("sha256"), str):
        return ("checkpoint (the best.pt it was made from, to notice a stale export) is "
                "missing or damaged")
    return ""


def check_not_stale(path: Path, meta: dict) -> None:
    """Refuse an export made from an earlier best.pt of the run beside it (retrained or
    resumed since): it would predict with the old weights."""
    run = path if (path / "best.pt").is_file() else Path(meta.get("run", ""))
    ckpt = run / meta.get("checkpoint", {}).get("file", "best.pt")
    digest = meta.get("checkpoint", {}).get("sha256")
    if digest and ckpt.is_file() and checkpoint_digest(ckpt)["sha256"] != digest:
        raise ExportError(f"the export in {export_folder(path)} was made from an earlier {ckpt}: "
                          f"run mmtag export {run} again")


def resized_image(img: Image.Image, spec: dict) -> np.ndarray:
    """(3, S, S) uint8 pixels of a PIL image at model.json's "image" size (upright, RGB)."""
    size = int(spec["size"])
    a = np.asarray(to_rgb(upright(img)).resize((size, size), Image.BILINEAR), dtype=np.uint8)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def normalized(pixels: np.ndarray | torch.Tensor, spec: dict) -> np.ndarray:
    """(N, 3, S, S) float32 model inputs from (N, 3, S, S) uint8 pixels, as model.json's
    "image" section says. Once per batch and in place: image by image, with a new array per
    operation, this cost a quarter of prediction's time on a 2-core CPU (2026-12-07); numpy
    rather than torch, whose idle threads then slowed ONNX Runtime's next call."""
    x = np.asarray(pixels).astype(np.float32)
    x /= np.float32(255.0)
    x -= np.asarray(spec["mean"], np.float32).reshape(1, -1, 1, 1)
    x /= np.asarray(spec["std"], np.float32).reshape(1, -1, 1, 1)
    return x


def preprocess_image(img: Image.Image, spec: dict) -> np.ndarray:
    """(3, S, S) float32 input from a PIL image, as model.json's "image" section says."""
    return normalized(resized_image(img, spec)[None], spec)[0]


def feeds_for(names: Sequence[str], images, ids, lengths) -> dict[str, np.ndarray]:
    """The session inputs named in `names` (model.json "inputs")."""
    arrays = {"images": images, "ids": ids, "lengths": lengths}
    dtypes = {"images": np.float32, "ids": np.int64, "lengths": np.int64}
    return {n: np.ascontiguousarray(np.asarray(arrays[n]), dtype=dtypes[n]) for n in names}


def ort_session(path: Path, threads: int):
    """An ONNX Runtime session of the file at `path` on the CPU with `threads` threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for unreadable files
        raise ExportError(f"{path} cannot be loaded by ONNX Runtime "
                          f"({str(e).splitlines()[0]}); export the run again") from None


class OpenVinoSession:
    """An ONNX file compiled by OpenVINO for this CPU, called as ONNX Runtime's session is
    (`run(None, feeds)` -> the outputs in the graph's order). fp32 throughout
    (INFERENCE_PRECISION_HINT f32): OpenVINO's default on a CPU with native bf16 is bf16,
    which moved the cached features by 6 % (relative L2, docs/performance.md); fp32 agrees
    with ONNX Runtime to rounding. One infer request per thread: a request is not
    thread-safe, the compiled model is."""

    def __init__(self, path: Path, threads: int) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise ExportError("--engine openvino needs the openvino package: pip install "
                              "openvino (or choose --engine onnx)") from None
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32"}
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError with its own long messages
            raise ExportError(f"{path} cannot be loaded by OpenVINO "
                              f"({str(e).strip().splitlines()[0]}); export the run again") from None
        self.outputs = list(self.compiled.outputs)
        self._local = threading.local()

    def run(self, names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        result = request.infer(feeds)
        # the request's output buffers are reused by its next call: copy them out
        return [np.array(result[o], copy=True) for o in self.outputs]


@dataclass
class OnnxPredictor(PredictorBase):
    """An exported model under ONNX Runtime or OpenVINO; the same methods as `Predictor`."""

    session: object = None
    meta: dict | None = None
    folder: Path | None = None
    engine: str = "onnx"

    @classmethod
    def load(cls, path: Path | str, engine: str = "onnx",
             threads: int | None = None) -> OnnxPredictor:
        """From an export folder (or a run folder with export/ inside)."""
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose from torch, {', '.join(ENGINES)}")
        folder = export_folder(path)
        meta = read_model_json(folder)
        check_not_stale(Path(path), meta)
        file = meta["files"].get(ENGINES[engine])
        if file is None:
            raise ExportError(f"{folder} has no int8 model: export with mmtag export RUN --int8")
        # as many threads as torch uses (one per physical core), so that engines compare fairly
        threads = threads or torch.get_num_threads()
        if engine == "openvino":
            session = OpenVinoSession(folder / file, threads)
        else:
            session = ort_session(folder / file, threads)
        caption = meta["caption"]
        if caption is not None and caption.get("kind") == "minilm":
            caption = {**caption, "source": str(folder / caption.get("source", TOKENIZER_DIR))}
        tok = tokenizer_from_dict(caption or {"kind": "none"})
        d = meta["decision"]
        pred = cls(label_map=LabelMap(tuple(int(x) for x in meta["labels"])), caption_enc=tok,
                   thresholds=np.asarray(d["thresholds"], dtype=float),
                   at_least_one=bool(d["at_least_one"]), rule=d["rule"],
                   reads_images="images" in meta["inputs"], reads_captions="ids" in meta["inputs"],
                   has_caption_head="caption_probs" in meta["outputs"],
                   limit_val=int(meta.get("limit_val") or 0), session=session, meta=meta, folder=folder, engine=engine)
        if engine == "openvino":
            pred.check_against_onnx_runtime(folder / file, threads)
        return pred

    def check_against_onnx_runtime(self, path: Path, threads: int) -> None:
        """Refuse an engine whose probabilities differ from ONNX Runtime's (the reference for
        the export): OpenVINO 2026.4 computes the query-fusion model exactly at a batch of 1
        but wrongly at 4 or more (by 3.8e-4 on an AVX2 EPYC, by 0.25 on an AVX-512 Xeon).
        Checked at load, on this CPU, at a batch of 8 (random photos, real captions)."""
        reference = ort_session(path, threads)
        images, ids, lengths = self.inputs_for([None] * len(CHECK_CAPTIONS), CHECK_CAPTIONS)
        if self.meta["image"]:
            images = np.random.default_rng(0).standard_normal(images.shape).astype(np.float32)
        feeds = feeds_for(self.meta["inputs"], images, ids, lengths)
        want, got = reference.run(None, feeds), self.session.run(None, feeds)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(got, want, strict=True))
        if not diff <= PARITY_TOLERANCE:
            raise ExportError(f"--engine {self.engine}: its probabilities for this model differ "
                              f"from ONNX Runtime's by {diff:.2g} on this CPU (at most "
                              f"{PARITY_TOLERANCE:g} is accepted); use --engine onnx")

    @property
    def tta_flip(self) -> bool:
        return bool(self.meta["tta_flip"])

    @property
    def image_sizes(self) -> list[int | None]:
        return [int(self.meta["image"]["size"])] if self.meta["image"] else [None]

    def transform(self, size: int | None = None):
        spec = self.meta["image"]
        if size is not None and size != spec["size"]:
            raise ValueError(f"this export reads images at {spec['size']} px only")
        # uint8 pixels: batches are normalised whole, in `probabilities`
        return lambda img: torch.from_numpy(resized_image(img, spec))

    def run(self, images, ids, lengths) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, the caption head's probabilities or None) for a batch of inputs."""
        out = self.session.run(None, feeds_for(self.meta["inputs"], images, ids, lengths))
        return out[0], (out[1] if len(out) > 1 else None)

    def probabilities(self, dataset, batch_size: int = 64, num_workers: int = 0) -> np.ndarray:
        loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers)
        parts = [self.run(self._inputs(images), ids.numpy(), lengths.numpy())[0]
                 for images, ids, lengths, _ in loader]
        return np.concatenate(parts) if parts else np.zeros((0, self.label_map.num_classes))

    def caption_probabilities(self, dataset, batch_size: int = 64) -> np.ndarray:
        """The caption head's output, with a blank image fed where the graph takes one (the
        caption head does not read it)."""
        if not self.has_caption_head:
            raise ValueError("this export has no caption head of its own")
        out = []
        for s in range(0, len(dataset), batch_size):
            ids = dataset.tokens[s:s + batch_size].numpy()
            blank = self.image_batch([None] * len(ids))
            out.append(self.run(blank, ids, dataset.lengths[s:s + batch_size].numpy())[1])
        return np.concatenate(out) if out else np.zeros((0, self.label_map.num_classes))

    def image_batch(self, images: Sequence[Image.Image | None]) -> np.ndarray:
        """(N, 3, S, S) inputs for PIL images (None: a blank one); (N, 1) zeros for a model
        that reads no images."""
        spec = self.meta["image"]
        if not spec:
            return np.zeros((len(images), 1), np.float32)
        return normalized(np.stack([resized_image(BLANK if img is None else img, spec)
                                    for img in images]), spec)

    def _inputs(self, images: torch.Tensor) -> np.ndarray:
        """A loader's image batch as model inputs: uint8 pixels normalised (a model that
        reads no images gets the loader's zeros)."""
        if images.dtype != torch.uint8:
            return images.numpy()
        return normalized(images, self.meta["image"])

    def inputs_for(self, images: Sequence[Image.Image | None],
                   captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images, ids, lengths) arrays for PIL images (None: blank) and captions."""
        arr = self.image_batch(images)
        tokens = [self.caption_enc(c) for c in captions]
        ids = np.stack([t[0] for t in tokens])
        return arr, ids, np.asarray([t[1] for t in tokens], dtype=np.int64)

    def predict_probs(self, images: Sequence[Image.Image | None],
                      captions: Sequence[str]) -> np.ndarray:
        """(N, C) probabilities for decoded images (None: a blank one) and their captions."""
        return self.run(*self.inputs_for(images, captions))[0]

    def describe(self) -> dict:
        files = self.meta["files"]
        return {**super().describe(), "file": files[ENGINES[self.engine]],
                "size_mb": self.meta.get("files_mb", {}).get(ENGINES[self.engine]),
                "image": self.meta["image"], "model": self.meta["model"],
                "recipe": self.meta["recipe"],
                "versions": self.meta["versions"], "exported": self.meta["created"]}
