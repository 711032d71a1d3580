"""`mmtag export`: a trained run as ONNX files that predict without mmtag's PyTorch code.

An export folder holds:

    model.onnx       the network, fp32: images (B, 3, S, S), ids (B, T), lengths (B,) ->
                     probs (B, C) (flip TTA inside when the run uses it) and, for a model with a
                     caption head of its own, caption_probs (B, C) for samples without an image
    model-int8.onnx  the same network quantised to int8 (with --int8)
    model.json       what a program needs besides the graph: labels, the decision rule and its
                     thresholds, the image preprocessing, the caption tokenizer, the inputs
    tokenizer/       the MiniLM word-piece tokenizer's files (MiniLM models)

`mmtag.inference.onnx_engine.OnnxPredictor` reads such a folder; docs/deploy.md describes the
files for programs in other languages.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

import mmtag
from mmtag.atomic import (
    WriteError,
    atomic_write,
    new_file_mode,
    read_json,
    staging_folder,
    swap_in,
)
from mmtag.data.images import NORMALISATIONS
from mmtag.data.tokenizers import MiniLMTokenizer
from mmtag.evaluation.probs_csv import average_probs
from mmtag.inference.torch_engine import Predictor
from mmtag.outputs import check_output_folder
from mmtag.prediction.export_format import (
    FORMAT,
    FORMAT_VERSION,
    FP32_FILE,
    INT8_FILE,
    MODEL_JSON,
    PARITY_TOLERANCE,
    TOKENIZER_DIR,
    ExportError,
    checkpoint_digest,
    is_mmtag_export,
)
from mmtag.prediction.passes import flip_tta_logits
from mmtag.run_files import SUMMARY_FILE, best_checkpoint

log = logging.getLogger("mmtag.export")

OPSET = 17


class ExportGraph(nn.Module):
    """What the ONNX file computes: each member's sigmoid probabilities (the mean over the image
    and its mirror image when `tta`), averaged over members; plus the caption head's
    probabilities when every member has one."""

    def __init__(self, members: Sequence[nn.Module], tta: bool):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.tta = tta
        first = members[0]
        self.reads_images = first.image_encoder is not None
        self.reads_captions = first.text_encoder is not None
        self.caption_head = all(m.has_caption_head for m in members)

    @property
    def input_names(self) -> list[str]:
        return (["images"] if self.reads_images else []) + \
            (["ids", "lengths"] if self.reads_captions else [])

    @property
    def output_names(self) -> list[str]:
        return ["probs"] + (["caption_probs"] if self.caption_head else [])

    def _logits(self, model: nn.Module, images, ids, lengths) -> torch.Tensor:
        if self.tta and images is not None:
            # one pass over the image and its mirror image: one batch of 2B
            both = torch.cat([images, images.flip(-1)])
            ids2 = None if ids is None else torch.cat([ids, ids])
            lengths2 = None if lengths is None else torch.cat([lengths, lengths])
            logits = model(both, ids2, lengths2).float()
            return (logits[: images.shape[0]] + logits[images.shape[0]:]) / 2
        return model(images, ids, lengths).float()

    def forward(self, *inputs: torch.Tensor):
        named = dict(zip(self.input_names, inputs, strict=True))
        images, ids, lengths = named.get("images"), named.get("ids"), named.get("lengths")
        probs = sum(torch.sigmoid(self._logits(m, images, ids, lengths))
                    for m in self.members) / len(self.members)
        if not self.caption_head:
            return probs
        caption = sum(torch.sigmoid(m.caption_logits(ids, lengths).float())
                      for m in self.members) / len(self.members)
        return probs, caption


def export_members(pred: Predictor) -> list[nn.Module]:
    """Copies of the predictor's models in a traceable form: the GloVe LSTM without packed
    sequences (the image encoders are already BatchNorm-folded by `Predictor.load`)."""
    members = []
    for model in pred.models:
        m = copy.copy(model)  # shallow: the weights are shared, not duplicated...
        m._modules = dict(model._modules)  # ...but swapping an encoder leaves `model` as it was
        if hasattr(m.text_encoder, "for_export"):
            m.text_encoder = m.text_encoder.for_export()
        if m.image_encoder is not None:
            m.image_encoder = m.image_encoder.to(memory_format=torch.contiguous_format)
        members.append(m.eval())
    return members


EXAMPLE_CAPTIONS = ("A man riding a bike down a city street.", "Two dogs.")


def example_inputs(graph: ExportGraph, image_size: int, caption_enc,
                   batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Inputs of the graph's shapes for tracing: random images, real captions."""
    g = torch.Generator().manual_seed(0)
    tokens = [caption_enc(EXAMPLE_CAPTIONS[i % len(EXAMPLE_CAPTIONS)]) for i in range(batch)]
    named = {"images": torch.randn(batch, 3, image_size, image_size, generator=g),
             "ids": torch.as_tensor(np.stack([t[0] for t in tokens])),
             "lengths": torch.as_tensor([t[1] for t in tokens], dtype=torch.long)}
    return tuple(named[n] for n in graph.input_names)


def write_onnx(graph: ExportGraph, inputs: tuple[torch.Tensor, ...], path: Path) -> None:
    """Trace `graph` into `path` (batch size dynamic), atomically."""
    dynamic = {name: {0: "batch"} for name in graph.input_names + graph.output_names}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # the TorchScript exporter: as exact as the dynamo one here, and 6x faster. Gradients
        # stay on while tracing: without them attention takes a fused fast path that has no
        # ONNX form
        with warnings.catch_warnings():
            # the tracer warns of every Python-level shape check; the parity check below is
            # what tells whether the trace holds
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, inputs, tmp, input_names=graph.input_names,
                              output_names=graph.output_names, dynamic_axes=dynamic,
                              opset_version=OPSET, dynamo=False)
        os.chmod(tmp, new_file_mode())  # mkstemp's 0600 would hide the file from others
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def onnx_probs(path: Path, feeds: dict[str, np.ndarray]) -> list:
    """Every output of the ONNX file at `path` for `feeds` (onnxruntime on the CPU)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def reference_outputs(pred: Predictor, names: list[str],
                      inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    """What the run's own PyTorch models give for `inputs`, by the Predictor's path (packed
    LSTM, flip TTA as two passes): the reference the ONNX file is held to."""
    named = dict(zip(names, inputs, strict=True))
    images, ids, lengths = named.get("images"), named.get("ids"), named.get("lengths")
    with torch.no_grad():
        outs = [average_probs(torch.sigmoid(flip_tta_logits(m, images, ids, lengths,
                                                            pred.tta_flip)).numpy()
                              for m in pred.models)]
        if all(m.has_caption_head for m in pred.models):
            outs.append(average_probs(torch.sigmoid(m.caption_logits(ids, lengths).float())
                                      .numpy() for m in pred.models))
    return outs


def check_parity(reference: list[np.ndarray], names: list[str],
                 inputs: tuple[torch.Tensor, ...], path: Path) -> float:
    """Largest |ONNX - PyTorch| over the outputs; an error above PARITY_TOLERANCE (the file is
    then not to be trusted)."""
    out = onnx_probs(path, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})
    diff = max(float(np.abs(a - b).max()) for a, b in zip(out, reference, strict=True))
    if not diff <= PARITY_TOLERANCE:
        raise ExportError(f"{path.name}: ONNX Runtime's probabilities differ from PyTorch's by "
                          f"{diff:.2e} (more than {PARITY_TOLERANCE:g}); please report this with "
                          f"the run's config.yaml")
    return diff


def image_spec(pred: Predictor) -> dict | None:
    """The image preprocessing in words and numbers: what `Predictor.transform` does."""
    if not pred.reads_images:
        return None
    spec = pred.transform_spec()
    mean, std = NORMALISATIONS[spec.normalisation]
    return {"size": spec.size, "color": "RGB", "layout": "NCHW float32",
            "orientation": "EXIF orientation applied first (PIL ImageOps.exif_transpose)",
            "resize": "to size x size (aspect ratio not kept), bilinear with antialiasing "
                      "(PIL Image.resize(..., Image.BILINEAR))",
            "scale": 1 / 255, "mean": list(mean), "std": list(std),
            "formula": "((pixel / 255) - mean[c]) / std[c]"}


def caption_spec(pred: Predictor, out: Path) -> dict | None:
    """The tokenizer's settings (its to_dict); MiniLM's word-piece files are saved to
    out/tokenizer/ and named relative to the export folder."""
    if not pred.reads_captions:
        return None
    d = pred.caption_enc.to_dict()
    if isinstance(pred.caption_enc, MiniLMTokenizer):
        pred.caption_enc.tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
        d = {**d, "source": TOKENIZER_DIR}
    return d


def model_json(pred: Predictor, graph: ExportGraph, run: Path, out: Path, files: dict,
               parity: dict) -> dict:
    """The contents of model.json."""
    import onnxruntime as ort

    summary_path = run / SUMMARY_FILE
    summary = read_json(summary_path) if summary_path.exists() else {}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "labels": list(pred.label_map.labels),
        "label_names": list(pred.label_map.display),
        "decision": {"rule": pred.rule,
                     "thresholds": [float(t) for t in pred.thresholds],
                     "at_least_one": pred.at_least_one},
        "inputs": graph.input_names, "outputs": graph.output_names,
        "image": image_spec(pred), "caption": caption_spec(pred, out),
        "tta_flip": bool(graph.tta and graph.reads_images),
        "limit_val": pred.limit_val,
        "files": files, "parity_max_abs_diff": parity,
        "model": {"image_encoder": pred.config.model.image_encoder,
                  "text_encoder": pred.config.model.text_encoder,
                  "fusion": pred.config.model.fusion, "members": len(pred.models),
                  "best_epoch": summary.get("best_epoch"),
                  "val": summary.get("val"), "val_crossfit": summary.get("val_crossfit")},
        "recipe": pred.config.to_dict(),  # the run's resolved config
        "run": str(run.resolve()),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"mmtag": mmtag.__version__, "torch": torch.__version__,
                     "onnxruntime": ort.__version__, "opset": OPSET},
    }


EXPORT_NAMES = {MODEL_JSON, FP32_FILE, INT8_FILE, TOKENIZER_DIR}


def export_run(run: Path | str, out: Path | str, *, int8: bool = False) -> dict:
    """Export a run folder (or best.pt) to `out`; with `int8` also a quantised copy. The files
    are made in a staging folder beside `out`, which replaces an earlier export only once
    complete (`mmtag.atomic.swap_in`). Returns model.json's contents."""
    run_path, out = Path(run), Path(out)
    run_dir = run_path if run_path.is_dir() else run_path.parent
    out = check_out_folder(out, run_dir)  # a link to a folder: the folder it names
    pred = Predictor.load(run_path, "cpu", amp="none")
    if pred.unfinished:
        raise ExportError(f"{pred.unfinished}; then export it")
    stage = staging_folder(out)
    try:
        meta = write_export(pred, run_dir, stage, int8)
        meta["checkpoint"] = checkpoint_digest(best_checkpoint(run_path))
        atomic_write(stage / MODEL_JSON, json.dumps(meta, indent=2) + "\n")
        swap_in(stage, out)
    except OSError as e:
        if isinstance(e, WriteError):
            raise
        raise WriteError(f"could not write the export {out} (while making "
                         f"{getattr(e, 'filename', None) or stage}): {e.strerror or e}; free "
                         f"some disk space or choose another --out; the earlier export, if "
                         f"any, is unchanged") from None
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    return meta


def check_out_folder(out: Path, run_dir: Path) -> Path:
    """Refuse an `out` that is not new, empty or an earlier mmtag export: it is replaced
    whole, so a folder of another tool's files (even ones named model.json) is never
    deleted. Returns the folder to write (a link's target)."""
    out = check_output_folder(out, "--out", [run_dir])
    if out.is_dir() and any(out.iterdir()):
        names = sorted(p.name for p in out.iterdir())
        foreign = [n for n in names if n not in EXPORT_NAMES]
        if foreign:
            raise ExportError(f"--out {out} holds files that are not an export's "
                              f"({', '.join(foreign[:5])}); give an empty or new folder")
        if not is_mmtag_export(out / MODEL_JSON):
            raise ExportError(f"--out {out} holds {', '.join(names)} but no mmtag export "
                              f"(its {MODEL_JSON} is not one): it is not replaced; give an "
                              f"empty or new folder")
    return out


def write_export(pred: Predictor, run_dir: Path, stage: Path, int8: bool) -> dict:
    """The ONNX files (and the tokenizer's) in `stage`, each checked; model.json's contents."""
    graph = ExportGraph(pred.models, pred.tta_flip)  # names and outputs; traced below
    inputs = example_inputs(graph, pred.image_size or 8, pred.caption_enc)
    reference = reference_outputs(pred, graph.input_names, inputs)
    graph = ExportGraph(export_members(pred), pred.tta_flip).eval()
    steps = 3 if int8 else 2  # each step takes seconds to a minute: said as it starts
    log.info("export 1/%d: tracing the model into ONNX", steps)
    write_onnx(graph, inputs, stage / FP32_FILE)
    files = {"fp32": FP32_FILE}
    log.info("export 2/%d: checking ONNX Runtime against PyTorch", steps)
    parity = {"fp32_vs_torch_random_inputs": check_parity(reference, graph.input_names, inputs,
                                                           stage / FP32_FILE)}
    if int8:
        from mmtag.inference.quantize import quantize_model

        log.info("export 3/3: quantising the matrix products to int8")
        quantize_model(stage / FP32_FILE, stage / INT8_FILE)
        files["int8"] = INT8_FILE
    meta = model_json(pred, graph, run_dir, stage, files, parity)
    meta["files_mb"] = {k: round((stage / f).stat().st_size / 2**20, 2) for k, f in files.items()}
    return meta
