"""The Python API behind `mmtag evaluate` and `mmtag predict`: load a run with the engine asked
for, score it on labelled rows, predict a CSV."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from mmtag.atomic import atomic_write_many, read_json
from mmtag.data.csv_io import Record, format_csv
from mmtag.data.dataset import ImageRows, Split
from mmtag.data.images import (
    ImageReadError,
    load_image,
)
from mmtag.data.labels import LabelMap
from mmtag.data.sources import (
    Columns,
    Source,
    format_table_predictions,
    open_data,
    open_rows,
)
from mmtag.distributed import Dist, barrier, from_env, sharded, start, stop
from mmtag.evaluation.probs_csv import format_probs
from mmtag.evaluation.thresholds import check_threshold
from mmtag.inference.base import PredictorBase
from mmtag.inference.onnx_engine import OnnxPredictor
from mmtag.inference.torch_engine import Predictor
from mmtag.outputs import check_distinct, check_output
from mmtag.run_files import SPLIT_FILE, SUMMARY_FILE, best_checkpoint
from mmtag.runtime import (
    resolve_device,
)

log = logging.getLogger("mmtag.predict")


@dataclass(frozen=True)
class PredictOptions:
    """How `evaluate` and `predict` run a model: which engine on which device, the decision
    rule, the batching. The CLI fills one from its flags."""

    engine: str = "torch"          # 'torch', 'onnx', 'onnx-int8' or 'openvino'
    device: str = "auto"
    threshold: float | None = None  # one global threshold instead of the run's rule
    decision: str | None = None     # 'threshold' or 'expected_f1' instead of the run's rule
    batch_size: int = 64
    num_workers: int = 0
    # predict only: rows whose photo is missing are predicted from their caption
    caption_only_missing: bool = False


@dataclass(frozen=True)
class PredictFiles:
    """What `predict` reads and writes: the CSV, its photos' folder, the submission and (or
    None) the probabilities; the outputs as checked, the names as the user gave them."""

    source: Source
    out: Path
    probs: Path | None
    given_out: str
    given_probs: str | None


def load_predictor(run: Path | str, engine: str = "torch", device: str = "auto") -> PredictorBase:
    """The predictor of `engine`: 'torch' (the run's best.pt), 'onnx', 'onnx-int8' or
    'openvino' (its export: an export folder, or a run folder with export/ inside)."""
    if engine == "torch":
        return Predictor.load(run, device)
    if device not in ("auto", "cpu"):
        raise ValueError(f"--engine {engine} runs on the CPU; leave --device out")
    return OnnxPredictor.load(run, engine)


def run_folder(run: Path | str, pred: PredictorBase) -> Path:
    """The training run behind `run`: its folder, or for an export folder the run it names."""
    path = best_checkpoint(run).parent if pred.engine == "torch" else Path(run)
    if pred.engine != "torch" and not (path / SPLIT_FILE).exists():
        path = Path(pred.meta["run"])
    return path


def check_predict_outputs(run: Path | str, csv_path: Path, images: Path, out: Path | str,
                          probs_out: Path | str | None) -> tuple[Path, Path | None]:
    """The files predict writes (`mmtag.outputs.check_output`'s rule: never an input, a photo,
    a run's or an export's file, a folder or a special file; a link is followed), checked
    before the model loads."""
    inputs = {"--csv": csv_path, "the run's checkpoint": best_checkpoint(run)}
    inputs = {k: v for k, v in inputs.items() if v is not None}  # a DataFrame has no file
    targets = {"--out": check_output(out, "--out", inputs, [images])}
    if probs_out is not None:
        targets["--probs"] = check_output(probs_out, "--probs", inputs, [images])
    check_distinct(targets)
    return targets["--out"], targets.get("--probs")


def find_missing_images(records: Sequence[Record], image_dir: Path,
                        source: str) -> dict[int, str]:
    """Rows whose image is missing or cannot be decoded: {row index: message naming the file
    and the CSV line}."""
    bad = {}
    for i, r in enumerate(records):
        try:
            load_image(image_dir / r.image_id, f"{source} line {r.line}")
        except ImageReadError as e:
            bad[i] = str(e)
    return bad


def evaluate_run(run: Path | str, *, data_dir: Path | str | Source | None = None,
                 csv_path: Path | str | Source | None = None, images: Path | str | None = None,
                 options: PredictOptions = PredictOptions()) -> dict:
    """Metrics of a run on its saved validation split of `data_dir` (the data it was trained
    on) or on every row of a labelled file `csv_path` (a Kaggle CSV or a table, photos in
    `images`); either may be a `Source` (a table with other column names).

    On the validation split with the run's tuned thresholds, the thresholds were chosen on these
    very rows: the figures are then marked optimistic (`tuned_on_these_rows`), with the run's
    cross-fit estimate from summary.json beside them (`crossfit`)."""
    o = options
    threshold, decision = o.threshold, o.decision
    if threshold is not None:
        check_threshold(threshold)  # before any inference
    pred = load_predictor(run, o.engine, o.device)
    if csv_path is not None:
        src = csv_path if isinstance(csv_path, Source) else open_rows(csv_path, images)
        rows, image_dir, source = _labelled_rows(pred, src)
        validation_of = None
    elif data_dir is not None:
        src = data_dir if isinstance(data_dir, Source) else open_data(data_dir, images)
        validation_of = run_folder(run, pred)
        rows, image_dir, source = _validation_rows(pred, validation_of, src)
    else:
        raise ValueError("evaluate needs --data DIR (the run's validation split) or --csv FILE")
    m = pred.metrics_of(ImageRows(rows, image_dir, source), o.threshold, o.decision,
                        o.batch_size, o.num_workers)
    m["source"] = source
    m["image_sizes"] = [pred.image_size]
    m["thresholds"] = (f"global {threshold:.3f}" if threshold is not None
                       else [round(float(t), 4) for t in pred.thresholds])
    m["decision"] = pred.describe_decision(threshold, decision)
    m["engine"] = pred.engine
    rule = decision or pred.rule
    m["tuned_on_these_rows"] = bool(validation_of is not None and threshold is None
                                    and rule == "threshold" and not pred.unfinished)
    m["unfinished"] = pred.unfinished
    if validation_of is not None:
        m["source"] = f"the run's validation split of {source}"
        if threshold is None and not pred.unfinished:
            m.update(_crossfit_estimate(pred, validation_of, rule))
    return m


def _labelled_rows(pred: PredictorBase, src: Source) -> tuple[list[Record], Path, str]:
    if src.kaggle:
        pred.check_captions(src.rows)
    rows = src.read(need_labels=True)
    if any(not r.labels for r in rows):
        raise ValueError(f"{src.shown} has rows without labels (first: line "
                         f"{next(r.line for r in rows if not r.labels)}); evaluate needs labels")
    return rows, src.images, src.shown


def _validation_rows(pred: PredictorBase, run_dir: Path,
                     src: Source) -> tuple[list[Record], Path, str]:
    """The run's validation rows of the data it was trained on, by its saved split."""
    split = Split.load(run_dir / SPLIT_FILE)
    _, rows = split.apply(src.read(need_labels=True))
    if pred.limit_val:
        rows = rows[: pred.limit_val]
    return rows, src.images, src.shown


def _crossfit_estimate(pred: PredictorBase, run_dir: Path, rule: str) -> dict:
    """{'crossfit': the run's cross-fit estimate for `rule`} from its summary.json, when it
    holds one measured at the sizes `pred` reads (else {})."""
    summary_path = run_dir / SUMMARY_FILE
    summary = read_json(summary_path) if summary_path.exists() else {}
    # the run's estimate holds for the sizes it was measured at, not for other TTA sizes
    same_sizes = (not pred.reads_images
                  or summary.get("tta", {}).get("sizes") == [pred.image_size])
    if same_sizes:
        for key in ("val_crossfit", "val_crossfit_other_rule"):
            c = summary.get(key) or {}
            if c.get("decision", summary.get("decision")) == rule and "micro_f1" in c:
                return {"crossfit": {k: c[k] for k in ("micro_f1", "samples_f1")}}
    return {}


def optimism_note(m: dict) -> str:
    """For `evaluate_run`'s result: a note that its figures come from thresholds tuned on the
    scored rows, with the run's cross-fit estimate; "" when they do not."""
    if not m["tuned_on_these_rows"]:
        return ""
    c = m.get("crossfit")
    return ("(the thresholds were tuned on these rows, so these figures are optimistic"
            + (f"; the run's cross-fit estimate for unseen rows: micro-F1 {c['micro_f1']:.4f}, "
               f"samples-F1 {c['samples_f1']:.4f}" if c else "") + ")")


def predict_csv(run: Path | str, csv_path: Path | str | Source, images: Path | str | None = None,
                out: Path | str = "Predicted_labels.csv", *, probs_out: Path | str | None = None,
                options: PredictOptions = PredictOptions()) -> dict | None:
    """Predict every row of `csv_path` (a Kaggle CSV such as test.csv, a table, or a `Source`;
    photos in `images`), in order, into `out`: the Kaggle submission for a Kaggle CSV, else a
    CSV of the table's image and labels columns (and the probabilities to `probs_out`, one
    column per label name): both files or neither.

    Under torchrun each process predicts every world-th row and rank 0 writes the files and
    returns the result; the others return None."""
    src = csv_path if isinstance(csv_path, Source) else open_rows(csv_path, images)
    checked_out, checked_probs = check_predict_outputs(run, src.rows, src.images, out, probs_out)
    files = PredictFiles(src, checked_out, checked_probs, str(out),
                         str(probs_out) if probs_out is not None else None)
    if options.threshold is not None:
        check_threshold(options.threshold)  # before any inference
    dist = from_env()
    if dist.active:  # each rank on its own GPU; the ONNX engines run on the CPU (gloo)
        torch_engine = options.engine == "torch"
        on = start(dist, resolve_device(options.device) if torch_engine else torch.device("cpu"))
        if torch_engine:
            options = replace(options, device=str(on))
    try:
        result = _predict_csv(run, files, options, dist)
        barrier(dist)  # rank 0 has written the files; nobody leaves the group before
        return result
    finally:
        stop(dist)


def _predict_csv(run: Path | str, files: PredictFiles, o: PredictOptions,
                 dist: Dist) -> dict | None:
    pred = load_predictor(run, o.engine, o.device)
    src = files.source
    if src.kaggle:
        pred.check_captions(src.rows)
    rows = src.read()
    source = src.shown
    bad = find_missing_images(rows, src.images, source) if pred.reads_images else {}
    msgs = list(bad.values())
    _check_missing_images(pred, bad, o.caption_only_missing)
    # Rows without their image: the caption's own head where the model has one (trained on its
    # own loss, so its probabilities hold for a caption alone); otherwise the whole model with
    # a blank image in place of the photo, which is said so.
    via = ("the caption head" if pred.has_caption_head
           else "a blank image in place of the photo (this model has no caption head of its own)")
    if msgs:  # every row is in the result (the CLI prints them); the log names the first few
        more = f" and {len(msgs) - 3} more" if len(msgs) > 3 else ""
        log.warning("predicting %d row(s) from the caption alone, by %s: %s%s", len(msgs), via,
                    "; ".join(msgs[:3]), more)
    probs = sharded(len(rows), dist, getattr(pred, "device", torch.device("cpu")),
                    lambda idx: _csv_probabilities(
                        pred, ImageRows([rows[i] for i in idx], src.images, source),
                        {j: bad[i] for j, i in enumerate(idx) if i in bad}, o))
    if not dist.main:
        return None
    decisions = pred.decide(probs, o.threshold, decision=o.decision)
    label_sets = [pred.label_map.decode(d) for d in decisions]
    written = [(files.out, format_predictions(src, rows, label_sets, pred.label_map))]
    if files.probs is not None:
        written.append((files.probs, format_probs(
            [r.image_id for r in rows], list(pred.label_map.display), probs,
            id_column=src.columns.image if src.columns else "ImageID")))
    atomic_write_many(written)
    return {"rows": len(rows), "out": files.given_out, "probs": files.given_probs,
            "caption_only": msgs, "caption_only_via": via if msgs else None,
            "decision": pred.describe_decision(o.threshold, o.decision)}


def format_predictions(src: Source, rows: Sequence[Record], label_sets: Sequence[tuple[str, ...]],
                       label_map: LabelMap) -> str:
    """The text of predict's --out: the Kaggle submission (ImageID,Labels, ids space-separated)
    for a Kaggle CSV of a run with integer labels, else a CSV of the table's image and labels
    columns (labels joined by its separator, `|` by default)."""
    if src.kaggle and label_map.integer:
        return format_csv([Record(r.image_id, tuple(int(lab) for lab in labs), "", r.line)
                           for r, labs in zip(rows, label_sets, strict=True)], captions=False)
    return format_table_predictions([r.image_id for r in rows], label_sets,
                                    src.columns or Columns())


def _check_missing_images(pred: PredictorBase, bad: dict[int, str], caption_only_missing: bool) -> None:
    """Refuse rows whose image is missing or unreadable, unless they may be predicted from
    their caption (--caption-only-missing) by a model that reads captions."""
    msgs = list(bad.values())
    if bad and caption_only_missing and not pred.reads_captions:
        raise ImageReadError(
            f"{len(bad)} image(s) missing or unreadable (first: {msgs[0]}), and this model reads "
            f"no caption, so --caption-only-missing cannot predict them: every such row would get "
            f"one and the same prediction. Fix the images, or leave those rows out of the CSV.")
    if bad and not caption_only_missing:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ImageReadError(
            f"{len(bad)} image(s) missing or unreadable: " + "; ".join(msgs[:5]) + more +
            ". Fix them, or pass --caption-only-missing to predict those rows from the caption "
            "alone (they are listed).")


def _csv_probabilities(pred: PredictorBase, rows: ImageRows, bad: dict[int, str],
                       o: PredictOptions) -> np.ndarray:
    """(N, C) probabilities of every row; rows in `bad` (no readable image) from the caption
    head, or from a blank image when the model has none."""
    records, images, source = rows.records, rows.image_dir, rows.source
    if not (bad and pred.has_caption_head):
        ds = pred.dataset(records, images, source, blank_missing_images=bool(bad),
                          with_targets=False)
        return pred.probabilities(ds, o.batch_size, o.num_workers)
    good = [i for i in range(len(records)) if i not in bad]
    probs = np.zeros((len(records), pred.label_map.num_classes))
    if good:
        probs[good] = pred.probabilities(
            pred.dataset([records[i] for i in good], images, source, with_targets=False),
            o.batch_size, o.num_workers)
    probs[list(bad)] = pred.caption_probabilities(
        pred.dataset([records[i] for i in bad], images, source, with_targets=False),
        o.batch_size)
    return probs
