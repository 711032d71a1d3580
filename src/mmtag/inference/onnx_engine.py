"""Predict with an exported model (`mmtag export`): ONNX Runtime or OpenVINO, numpy and PIL;
the `--engine onnx`, `onnx-int8` and `openvino` of predict, evaluate, benchmark and serve.
OpenVINO (an optional package: pip install openvino) reads the same model.onnx.

The preprocessing here is written from model.json alone (`resized_image`, `normalized`), not
borrowed from the training code: the parity test then checks the file's description as well as
the graph.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmtag.data.batching import Pass
from mmtag.data.dataset import make_loader
from mmtag.data.images import to_rgb, upright
from mmtag.data.labels import LabelMap
from mmtag.data.tokenizers import tokenizer_from_dict
from mmtag.inference.base import PredictorBase
from mmtag.prediction.export_format import (
    PARITY_TOLERANCE,
    TOKENIZER_DIR,
    ExportError,
    check_not_stale,
    export_folder,
    read_model_json,
)
from mmtag.progress import progress

ENGINES = {"onnx": "fp32", "onnx-int8": "int8", "openvino": "fp32"}  # engine -> model.json file
BLANK = Image.new("RGB", (32, 32))  # what stands in for a missing photo, as in Predictor
# captions of different lengths for the load-time check of an engine (a batch of 8: OpenVINO's
# fault shows from a batch of 4)
CHECK_CAPTIONS = ("A man riding a bike down a city street.", "Two dogs.",
                  "A plate with a sandwich, some chips and a pickle on a wooden table.", "A cat.",
                  "People waiting for a train at the station.", "A red bus.",
                  "A kitchen with a stove, a sink and a refrigerator.", "Sheep in a field.")


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
        pred = cls(label_map=LabelMap.from_dict({"labels": meta["labels"],
                                                "names": meta.get("label_names")}), caption_enc=tok,
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
    def image_size(self) -> int | None:
        return int(self.meta["image"]["size"]) if self.meta["image"] else None

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

    def probabilities(self, dataset, batch_size: int = 64, num_workers: int = 0,
                      desc: str = "predict") -> np.ndarray:
        loader = make_loader(dataset, Pass(batch_size), num_workers=num_workers)
        parts = [self.run(self._inputs(images), ids.numpy(), lengths.numpy())[0]
                 for images, ids, lengths, _ in progress(loader, len(loader), desc)]
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
