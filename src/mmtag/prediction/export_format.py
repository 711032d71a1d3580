"""The export folder's format: the file names, model.json's version and the checks every
reader applies to it (`mmtag export` writes it, the ONNX engines and the service read it).
docs/deploy.md describes the files for programs in other languages."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from mmtag.run_files import BEST_FILE, RunError

MODEL_JSON = "model.json"
FP32_FILE = "model.onnx"
INT8_FILE = "model-int8.onnx"
TOKENIZER_DIR = "tokenizer"
FORMAT = "mmtag-onnx"
FORMAT_VERSION = 1
PARITY_TOLERANCE = 1e-4  # largest |ONNX - PyTorch| probability accepted at export


class ExportError(RunError, ValueError):
    """A run cannot be exported, or an export folder cannot be read."""


def is_mmtag_export(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def checkpoint_digest(path: Path) -> dict:
    """What identifies the checkpoint an export was made from (to notice a stale export)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"file": path.name, "sha256": h.hexdigest()}


REQUIRED_KEYS = ("labels", "decision", "inputs", "outputs", "image", "caption", "tta_flip",
                 "files", "model", "recipe", "versions", "created")


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
    # label texts; an export made when labels were integer ids holds numbers
    if not isinstance(labels, list) or not labels or not all(
            (isinstance(x, str) and x) or (isinstance(x, int) and not isinstance(x, bool))
            for x in labels) or len({str(x) for x in labels}) != len(labels):
        return "labels must be a non-empty list of distinct labels"
    names = meta.get("label_names")
    if names is not None and (not isinstance(names, list) or len(names) != len(labels)
                              or not all(isinstance(x, str) for x in names)):
        return "label_names must be a list of one text per label"
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
    run = path if (path / BEST_FILE).is_file() else Path(meta.get("run", ""))
    ckpt = run / meta.get("checkpoint", {}).get("file", BEST_FILE)
    digest = meta.get("checkpoint", {}).get("sha256")
    if digest and ckpt.is_file() and checkpoint_digest(ckpt)["sha256"] != digest:
        raise ExportError(f"the export in {export_folder(path)} was made from an earlier {ckpt}: "
                          f"run mmtag export {run} again")
