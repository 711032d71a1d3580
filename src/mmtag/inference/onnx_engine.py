"""Predict with an exported model (`mmtag export`): ONNX Runtime, numpy and PIL; the
`--engine onnx` and `--engine onnx-int8` of predict, evaluate, benchmark and serve.

The preprocessing here is written from model.json alone (`preprocess_image`), not borrowed
from the training code: the parity test then checks the file's description as well as the
graph.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmtag.data.dataset import make_loader
from mmtag.data.images import to_rgb
from mmtag.data.labels import LabelMap
from mmtag.data.tokenizers import tokenizer_from_dict
from mmtag.inference.export import (
    FORMAT,
    FORMAT_VERSION,
    MODEL_JSON,
    TOKENIZER_DIR,
    ExportError,
    checkpoint_digest,
)
from mmtag.inference.predictor import PredictorBase

ENGINES = {"onnx": "fp32", "onnx-int8": "int8"}
REQUIRED_KEYS = ("labels", "decision", "inputs", "outputs", "image", "caption", "tta_flip",
                 "files", "model", "recipe", "versions", "created")
BLANK = Image.new("RGB", (32, 32))  # what stands in for a missing photo, as in Predictor


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
    return meta


def check_not_stale(path: Path, meta: dict) -> None:
    """Refuse an export made from an earlier best.pt of the run beside it (retrained or
    resumed since): it would predict with the old weights."""
    run = path if (path / "best.pt").is_file() else Path(meta.get("run", ""))
    ckpt = run / meta.get("checkpoint", {}).get("file", "best.pt")
    digest = meta.get("checkpoint", {}).get("sha256")
    if digest and ckpt.is_file() and checkpoint_digest(ckpt)["sha256"] != digest:
        raise ExportError(f"the export in {export_folder(path)} was made from an earlier {ckpt}: "
                          f"run mmtag export {run} again")


def preprocess_image(img: Image.Image, spec: dict) -> np.ndarray:
    """(3, S, S) float32 input from a PIL image, as model.json's "image" section says."""
    size = int(spec["size"])
    a = np.asarray(to_rgb(img).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    a = (a - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def feeds_for(names: Sequence[str], images, ids, lengths) -> dict[str, np.ndarray]:
    """The session inputs named in `names` (model.json "inputs")."""
    arrays = {"images": images, "ids": ids, "lengths": lengths}
    dtypes = {"images": np.float32, "ids": np.int64, "lengths": np.int64}
    return {n: np.ascontiguousarray(np.asarray(arrays[n]), dtype=dtypes[n]) for n in names}


@dataclass
class OnnxPredictor(PredictorBase):
    """An exported model under ONNX Runtime; the same methods as `Predictor`."""

    session: object = None
    meta: dict | None = None
    folder: Path | None = None
    engine: str = "onnx"

    @classmethod
    def load(cls, path: Path | str, engine: str = "onnx",
             threads: int | None = None) -> OnnxPredictor:
        """From an export folder (or a run folder with export/ inside)."""
        import onnxruntime as ort

        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose from torch, {', '.join(ENGINES)}")
        folder = export_folder(path)
        meta = read_model_json(folder)
        check_not_stale(Path(path), meta)
        file = meta["files"].get(ENGINES[engine])
        if file is None:
            raise ExportError(f"{folder} has no int8 model: export with mmtag export RUN --int8")
        opts = ort.SessionOptions()
        # as many threads as torch uses (one per physical core), so that engines compare fairly
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            session = ort.InferenceSession(str(folder / file), opts,
                                           providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for unreadable files
            raise ExportError(f"{folder / file} cannot be loaded by ONNX Runtime "
                              f"({str(e).splitlines()[0]}); export the run again") from None
        caption = meta["caption"]
        if caption is not None and caption.get("kind") == "minilm":
            caption = {**caption, "source": str(folder / caption.get("source", TOKENIZER_DIR))}
        tok = tokenizer_from_dict(caption or {"kind": "none"})
        d = meta["decision"]
        return cls(label_map=LabelMap(tuple(int(x) for x in meta["labels"])), caption_enc=tok,
                   thresholds=np.asarray(d["thresholds"], dtype=float),
                   at_least_one=bool(d["at_least_one"]), rule=d["rule"],
                   reads_images="images" in meta["inputs"], reads_captions="ids" in meta["inputs"],
                   has_caption_head="caption_probs" in meta["outputs"],
                   limit_val=int(meta.get("limit_val") or 0), session=session, meta=meta, folder=folder, engine=engine)

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
        return lambda img: torch.from_numpy(preprocess_image(img, spec))

    def run(self, images, ids, lengths) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, the caption head's probabilities or None) for a batch of inputs."""
        out = self.session.run(None, feeds_for(self.meta["inputs"], images, ids, lengths))
        return out[0], (out[1] if len(out) > 1 else None)

    def probabilities(self, dataset, batch_size: int = 64, num_workers: int = 0) -> np.ndarray:
        loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers)
        parts = [self.run(images.numpy(), ids.numpy(), lengths.numpy())[0]
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
        return np.stack([preprocess_image(BLANK if img is None else img, spec) for img in images])

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
