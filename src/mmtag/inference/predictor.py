"""Load a trained run and predict: the Python API behind `mmtag evaluate` and `mmtag predict`."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import mmtag
from mmtag.atomic import atomic_write_many, read_json
from mmtag.config import ConfigError, TrainConfig
from mmtag.data.csv_io import Record, csv_columns, format_csv, read_csv
from mmtag.data.dataset import Split, TaggingDataset, make_loader
from mmtag.data.device_batches import DecodedBatches
from mmtag.data.images import (
    ImageReadError,
    build_transform,
    load_image,
    to_rgb,
    transform_spec,
    upright,
)
from mmtag.data.labels import LabelMap, UnknownLabelError
from mmtag.data.tokenizers import tokenizer_from_dict
from mmtag.distributed import Dist, barrier, from_env, sharded, start, stop
from mmtag.evaluation.metrics import multilabel_metrics
from mmtag.evaluation.probs_csv import average_probs, format_probs
from mmtag.evaluation.thresholds import apply_thresholds, check_threshold, decide
from mmtag.models.build import build_tagger, encoder_normalisation
from mmtag.outputs import check_distinct, check_output
from mmtag.runtime import (
    Precision,
    autocast,
    choose_precision,
    inference_precision,
    resolve_device,
)
from mmtag.training.checkpoint import (
    CheckpointError,
    is_finished,
    load_checkpoint,
    member_states,
    unfinished_message,
)
from mmtag.training.engine import evaluate, flip_tta_logits

log = logging.getLogger("mmtag.predict")


def _checkpoint_path(run: Path | str) -> Path:
    run = Path(run)
    return run / "best.pt" if run.is_dir() else run


@dataclass
class PredictorBase:
    """What every engine shares: the labels, the caption tokenizer, the decision rule and its
    thresholds, and how CSV rows become model inputs. `Predictor` runs the PyTorch model;
    `mmtag.inference.onnx_engine.OnnxPredictor` an exported one."""

    label_map: LabelMap
    caption_enc: object
    thresholds: np.ndarray
    at_least_one: bool
    rule: str  # the run's decision rule: 'threshold' or 'expected_f1'

    reads_images: bool = True
    reads_captions: bool = True
    has_caption_head: bool = False  # a head of the caption alone (for rows without an image)
    limit_val: int = 0  # the run's data.limit_val: its validation rows are the first this many
    engine: str = "torch"
    # None for a finished run; for one that stopped before its thresholds were chosen, what to
    # tell its user (mmtag.training.checkpoint.unfinished_message)
    unfinished: str | None = None

    @property
    def tta_flip(self) -> bool:
        """Whether each image is averaged with its mirror image."""
        raise NotImplementedError

    @property
    def image_sizes(self) -> list[int | None]:
        """The sizes each image is read at; [None] for a model that reads no images."""
        raise NotImplementedError

    def transform(self, size: int | None = None):
        """The preprocessing of one PIL image into the model's input tensor."""
        raise NotImplementedError

    def dataset(self, records: Sequence[Record], image_dir: Path | str, source: str = "",
                blank_missing_images: bool = False, with_targets: bool = True) -> TaggingDataset:
        """`records` as model inputs; their labels become targets only `with_targets` (for
        scoring), which must then be in the run's label set."""
        return TaggingDataset(records, image_dir, self.caption_enc, self.label_map,
                              self.transform(), source=source,
                              blank_missing_images=blank_missing_images,
                              load_images=self.reads_images, with_targets=with_targets)

    def decide(self, probs: np.ndarray, threshold: float | None = None,
               at_least_one: bool | None = None, decision: str | None = None) -> np.ndarray:
        """0/1 decisions by the run's rule (`decision` in its config: the saved thresholds, or
        per-image expected-F1 label sets) or the `decision` given, or at one global `threshold`
        when given."""
        alo = self.at_least_one if at_least_one is None else at_least_one
        if threshold is not None:
            return apply_thresholds(probs, np.full(probs.shape[1], check_threshold(threshold)),
                                    alo)
        return decide(probs, self.thresholds, at_least_one=alo, rule=decision or self.rule)

    def describe_decision(self, threshold: float | None = None,
                          decision: str | None = None) -> str:
        """In words, the rule `decide` applies with these arguments."""
        if threshold is not None:
            return f"one global threshold {threshold:.3f}"
        if (decision or self.rule) == "expected_f1":
            return "expected-F1 label sets"
        if self.unfinished:
            return "untuned thresholds of 0.5 (the run is unfinished)"
        return "the run's tuned thresholds"

    def predict_probs(self, images: Sequence[Image.Image | None],
                      captions: Sequence[str]) -> np.ndarray:
        """(N, C) probabilities for decoded images (None: a blank one) and their captions."""
        raise NotImplementedError

    def predict(self, pairs: Sequence[tuple[Image.Image | str | Path, str]],
                threshold: float | None = None) -> list[tuple[int, ...]]:
        """Label ids for (image or image path, caption) pairs."""
        images = [img if isinstance(img, Image.Image) or not self.reads_images
                  else load_image(img, f"pair {i}") for i, (img, _) in enumerate(pairs)]
        probs = self.predict_probs(images, [c for _, c in pairs])
        return [self.label_map.decode(row) for row in self.decide(probs, threshold)]

    def describe(self) -> dict:
        """The model in a few facts (GET /v1/model, the benchmark)."""
        return {"engine": self.engine, "labels": list(self.label_map.labels),
                "decision": {"rule": self.rule,
                             "thresholds": [round(float(t), 6) for t in self.thresholds],
                             "at_least_one": self.at_least_one},
                "reads_images": self.reads_images, "reads_captions": self.reads_captions,
                "image_sizes": self.image_sizes, "tta_flip": self.tta_flip,
                "caption_max_len": getattr(self.caption_enc, "max_len", None)}

    def check_captions(self, csv_path: Path) -> None:
        """A model that reads captions refuses a CSV without them, rather than predicting every
        row from an empty caption."""
        if self.reads_captions and not csv_columns(csv_path)[1]:
            raise ValueError(f"{csv_path} has no Caption column, and this model reads captions: "
                             f"give the CSV with the captions (ImageID,Caption or "
                             f"ImageID,Labels,Caption)")


@dataclass
class Predictor(PredictorBase):
    """A trained tagger with its preprocessing and decision thresholds; for an ensemble
    (`mmtag ensemble`), its members, whose probabilities are averaged."""

    models: list[torch.nn.Module] = None
    config: TrainConfig = None
    device: torch.device = None
    precision: Precision = None  # the autocast dtype of every pass, and why

    @classmethod
    def load(cls, run: Path | str, device: str = "auto",
             tta_sizes: Sequence[int] | None = None, amp: str | None = None) -> Predictor:
        """From a run folder (its best.pt) or a checkpoint file. `tta_sizes` replaces the run's
        extra sizes of multi-scale TTA ([]: data.image_size alone, the fastest); `amp` its
        autocast setting ('none': fp32)."""
        path = _checkpoint_path(run)
        ckpt = load_checkpoint(path, required=("config", "labels", "caption", "thresholds",
                                               "at_least_one"))
        if "model" not in ckpt and "ensemble" not in ckpt:
            raise CheckpointError(f"checkpoint {path} holds no weights; it was not loaded")
        cfg = ckpt["config"]
        if tta_sizes is not None:
            cfg = {**cfg, "tta_sizes": list(tta_sizes)}
        if amp is not None:
            cfg = {**cfg, "amp": amp}
        try:
            cfg = TrainConfig.from_dict(cfg)
        except ConfigError as e:
            raise ConfigError(f"the config saved in {path}: {e}") from None
        label_map = LabelMap.from_dict(ckpt["labels"])
        caption_enc = tokenizer_from_dict(ckpt["caption"])
        unfinished = None if is_finished(ckpt, path) else unfinished_message(path, ckpt)
        if unfinished:
            log.warning("%s", unfinished)
        dev = resolve_device(device)
        precision = choose_precision(amp, dev) if amp else inference_precision(cfg.amp, dev)
        if precision.setting in ("bf16", "fp16") and precision.dtype is None:  # dropped
            log.info("precision: %s (%s)", precision.name, precision.reason)
        models = []
        for state in member_states(ckpt) if "ensemble" in ckpt else [ckpt["model"]]:
            model = build_tagger(cfg.model, label_map.num_classes, caption_enc,
                                 load_pretrained=False)
            model.load_state_dict({k: v.float() if v.is_floating_point() else v
                                   for k, v in state.items()})
            if model.image_encoder is not None:
                # BatchNorm folded into the convs and channels_last: same outputs, about 2x faster
                model.image_encoder = model.image_encoder.for_inference(channels_last=True)
            models.append(model.to(dev).eval())
        first = models[0]
        return cls(label_map=label_map, caption_enc=caption_enc,
                   thresholds=np.asarray(ckpt["thresholds"], dtype=float),
                   at_least_one=bool(ckpt["at_least_one"]), rule=cfg.decision,
                   reads_images=first.image_encoder is not None,
                   reads_captions=first.text_encoder is not None,
                   has_caption_head=first.has_caption_head,
                   limit_val=cfg.data.limit_val, unfinished=unfinished, models=models,
                   config=cfg, device=dev, precision=precision)

    @property
    def model(self) -> torch.nn.Module:
        """The (first) model: what every member shares (encoders, heads, input stages)."""
        return self.models[0]

    @property
    def tta_flip(self) -> bool:
        return self.config.tta_flip

    @property
    def image_sizes(self) -> list[int | None]:
        """data.image_size, then the extra sizes of multi-scale TTA."""
        return self.config.image_sizes if self.reads_images else [None]

    def describe(self) -> dict:
        m = self.config.model
        return {**super().describe(), "model": {
            "image_encoder": m.image_encoder, "text_encoder": m.text_encoder,
            "fusion": m.fusion, "members": len(self.models)}, "recipe": self.config.to_dict(),
            "versions": {"mmtag": mmtag.__version__, "torch": torch.__version__}}

    def transform_spec(self, size: int | None = None):
        """The validation preprocessing's parameters at data.image_size, or at `size`."""
        return transform_spec(self.config.data, encoder_normalisation(self.model), size)

    def transform(self, size: int | None = None):
        """Validation preprocessing at data.image_size, or at `size`."""
        return build_transform(self.transform_spec(size), train=False)

    def probabilities(self, dataset: TaggingDataset, batch_size: int = 64,
                      num_workers: int = 0) -> np.ndarray:
        """(N, C) sigmoid probabilities, in dataset order: averaged over the sizes of
        `image_sizes` (each a pass over `dataset` with that size's preprocessing)."""
        parts = []
        # on a GPU the photos are decoded there (nvJPEG), batch by batch: CPU processes
        # decoding JPEGs cannot keep up with it (a blank image stands in for a missing one
        # only on the DataLoader path)
        on_device = (self.device.type == "cuda" and dataset.load_images
                     and not dataset.blank_missing_images)
        for size in self.image_sizes:
            ds = copy.copy(dataset)  # the caller's dataset keeps its transform
            if size is not None:
                ds.transform = self.transform(size)
            loader = (DecodedBatches(ds, self.transform_spec(size), batch_size, self.device)
                      if on_device else
                      make_loader(ds, batch_size, shuffle=False, num_workers=num_workers))
            for model in self.models:
                parts.append(evaluate(model, loader, None, self.device,
                                      dtype=self.precision.dtype,
                                      tta=self.config.tta_flip, channels_last=True)[1])
        return average_probs(parts)

    def caption_probabilities(self, dataset: TaggingDataset, batch_size: int = 64) -> np.ndarray:
        """(N, C) probabilities of the caption's own head (`Tagger.caption_logits`), for rows
        whose image is missing: no image is read and the image encoder does not run."""
        out = []
        dtype = self.precision.dtype
        with torch.inference_mode(), autocast(self.device, dtype):
            for s in range(0, len(dataset), batch_size):
                ids = dataset.tokens[s:s + batch_size].to(self.device)
                out.append(average_probs(torch.sigmoid(m.caption_logits(
                    ids, dataset.lengths[s:s + batch_size]).float()).cpu().numpy()
                    for m in self.models))
        return np.concatenate(out) if out else np.zeros((0, self.label_map.num_classes))

    def predict_probs(self, images: Sequence[Image.Image | None],
                      captions: Sequence[str]) -> np.ndarray:
        """(N, C) probabilities for decoded images (None: a blank one) and their captions."""
        tokens = [self.caption_enc(c) for c in captions]
        ids = torch.as_tensor(np.stack([t[0] for t in tokens])).to(self.device)
        lengths = torch.as_tensor([t[1] for t in tokens])
        pil = [to_rgb(upright(img)) if img is not None else Image.new("RGB", (32, 32))
               for img in images]
        parts = []
        for size in self.image_sizes:
            tf = self.transform(size) if size is not None else None
            with torch.inference_mode(), autocast(self.device, self.precision.dtype):
                batch = (torch.stack([tf(img) for img in pil]).to(self.device)
                         .contiguous(memory_format=torch.channels_last)
                         if tf is not None else torch.zeros(len(pil), 1))
                for model in self.models:
                    logits = flip_tta_logits(model, batch, ids, lengths, self.config.tta_flip)
                    parts.append(torch.sigmoid(logits.float()).cpu().numpy())
        return average_probs(parts)


def load_predictor(run: Path | str, engine: str = "torch", device: str = "auto",
                   tta_sizes: Sequence[int] | None = None) -> PredictorBase:
    """The predictor of `engine`: 'torch' (the run's best.pt), 'onnx', 'onnx-int8' or
    'openvino' (its export: an export folder, or a run folder with export/ inside)."""
    if engine == "torch":
        return Predictor.load(run, device, tta_sizes)
    from mmtag.inference.onnx_engine import OnnxPredictor  # it builds on this module

    if tta_sizes:
        raise ValueError("--tta-sizes needs --engine torch: an export reads images at its "
                         "training size only")
    if device not in ("auto", "cpu"):
        raise ValueError(f"--engine {engine} runs on the CPU; leave --device out")
    return OnnxPredictor.load(run, engine)


def run_folder(run: Path | str, pred: PredictorBase) -> Path:
    """The training run behind `run`: its folder, or for an export folder the run it names."""
    path = _checkpoint_path(run).parent if pred.engine == "torch" else Path(run)
    if pred.engine != "torch" and not (path / "split.json").exists():
        path = Path(pred.meta["run"])
    return path


def check_predict_outputs(run: Path | str, csv_path: Path, images: Path, out: Path | str,
                          probs_out: Path | str | None) -> tuple[Path, Path | None]:
    """The files predict writes (`mmtag.outputs.check_output`'s rule: never an input, a photo,
    a run's or an export's file, a folder or a special file; a link is followed), checked
    before the model loads."""
    inputs = {"--csv": csv_path, "the run's checkpoint": _checkpoint_path(run)}
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


def evaluate_run(run: Path | str, *, data_dir: Path | str | None = None,
                 csv_path: Path | str | None = None, images: Path | str | None = None,
                 threshold: float | None = None, decision: str | None = None,
                 batch_size: int = 64, device: str = "auto", num_workers: int = 0,
                 tta_sizes: Sequence[int] | None = None, engine: str = "torch") -> dict:
    """Metrics of a run on its saved validation split (`data_dir`) or on a labelled CSV.

    On the validation split with the run's tuned thresholds, the thresholds were chosen on these
    very rows: the figures are then marked optimistic (`tuned_on_these_rows`), with the run's
    cross-fit estimate from summary.json beside them (`crossfit`)."""
    if threshold is not None:
        check_threshold(threshold)  # before any inference
    pred = load_predictor(run, engine, device, tta_sizes)
    if csv_path is not None:
        rows, image_dir, source = _labelled_csv(pred, Path(csv_path), images)
        validation_of = None
    elif data_dir is not None:
        validation_of = run_folder(run, pred)
        rows, image_dir, source = _validation_rows(pred, validation_of, Path(data_dir))
    else:
        raise ValueError("evaluate needs --data DIR (the run's validation split) or --csv FILE")
    try:
        ds = pred.dataset(rows, image_dir, source)
    except UnknownLabelError as e:
        raise UnknownLabelError(e.label, e.where, (
            f"label {e.label} ({e.where}) is not one this run predicts "
            f"({' '.join(map(str, pred.label_map.labels))}), so it cannot be scored: remove it "
            f"from the file, or evaluate a run trained on rows that carry it")) from None
    probs = pred.probabilities(ds, batch_size, num_workers)
    y = ds.targets.numpy().astype(int)
    m = multilabel_metrics(y, pred.decide(probs, threshold, decision=decision),
                           label_names=[str(lab) for lab in pred.label_map.labels])
    m["rows"] = len(rows)
    m["source"] = source
    m["image_sizes"] = pred.image_sizes
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


def _labelled_csv(pred: PredictorBase, csv_path: Path,
                  images: Path | str | None) -> tuple[list[Record], Path, str]:
    pred.check_captions(csv_path)
    rows = read_csv(csv_path)
    if any(not r.labels for r in rows):
        raise ValueError(f"{csv_path} has rows without labels (first: line "
                         f"{next(r.line for r in rows if not r.labels)}); evaluate needs labels")
    return rows, Path(images) if images else csv_path.parent / "data", str(csv_path)


def _validation_rows(pred: PredictorBase, run_dir: Path,
                     data_dir: Path) -> tuple[list[Record], Path, str]:
    """The run's validation rows of data_dir/train.csv, by its saved split."""
    split = Split.load(run_dir / "split.json")
    source = str(data_dir / "train.csv")
    _, rows = split.apply(read_csv(source))
    if pred.limit_val:
        rows = rows[: pred.limit_val]
    return rows, data_dir / "data", source


def _crossfit_estimate(pred: PredictorBase, run_dir: Path, rule: str) -> dict:
    """{'crossfit': the run's cross-fit estimate for `rule`} from its summary.json, when it
    holds one measured at the sizes `pred` reads (else {})."""
    summary_path = run_dir / "summary.json"
    summary = read_json(summary_path) if summary_path.exists() else {}
    # the run's estimate holds for the sizes it was measured at, not for other TTA sizes
    same_sizes = (not pred.reads_images
                  or summary.get("tta", {}).get("sizes") == list(pred.image_sizes))
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


def predict_csv(run: Path | str, csv_path: Path | str, images: Path | str,
                out: Path | str = "Predicted_labels.csv", *, probs_out: Path | str | None = None,
                threshold: float | None = None, decision: str | None = None,
                caption_only_missing: bool = False, batch_size: int = 64, device: str = "auto",
                num_workers: int = 0, tta_sizes: Sequence[int] | None = None,
                engine: str = "torch") -> dict | None:
    """Write the Kaggle submission for every row of `csv_path`, in order (and the
    probabilities to `probs_out`): both files or neither.

    Under torchrun each process predicts every world-th row and rank 0 writes the files and
    returns the result; the others return None."""
    dist = from_env()
    if dist.active:  # each rank on its own GPU; the ONNX engines run on the CPU (gloo)
        on = start(dist, resolve_device(device) if engine == "torch" else torch.device("cpu"))
        if engine == "torch":
            device = str(on)
    try:
        result = _predict_csv(run, csv_path, images, out, probs_out, threshold, decision,
                              caption_only_missing, batch_size, device, num_workers,
                              tta_sizes, engine, dist)
        barrier(dist)  # rank 0 has written the files; nobody leaves the group before
        return result
    finally:
        stop(dist)


def _predict_csv(run, csv_path, images, out, probs_out, threshold, decision, caption_only_missing,
                 batch_size, device, num_workers, tta_sizes, engine, dist: Dist) -> dict | None:
    csv_path, images = Path(csv_path), Path(images)
    given_out, given_probs = out, probs_out  # what the user named, for the messages
    out, probs_out = check_predict_outputs(run, csv_path, images, out, probs_out)
    if threshold is not None:
        check_threshold(threshold)  # before any inference
    pred = load_predictor(run, engine, device, tta_sizes)
    pred.check_captions(csv_path)
    rows = read_csv(csv_path)
    bad = find_missing_images(rows, images, str(csv_path)) if pred.reads_images else {}
    msgs = list(bad.values())
    _check_missing_images(pred, bad, caption_only_missing)
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
                        pred, [rows[i] for i in idx], images, str(csv_path),
                        {j: bad[i] for j, i in enumerate(idx) if i in bad}, batch_size,
                        num_workers))
    if not dist.main:
        return None
    decisions = pred.decide(probs, threshold, decision=decision)
    label_sets = [pred.label_map.decode(d) for d in decisions]
    files = [(out, format_csv([Record(r.image_id, labs, "", r.line)
                               for r, labs in zip(rows, label_sets, strict=True)],
                              captions=False))]
    if probs_out is not None:
        files.append((probs_out, format_probs([r.image_id for r in rows],
                                              [str(lab) for lab in pred.label_map.labels], probs)))
    atomic_write_many(files)
    return {"rows": len(rows), "out": str(given_out),
            "probs": str(given_probs) if given_probs else None,
            "caption_only": msgs, "caption_only_via": via if msgs else None,
            "decision": pred.describe_decision(threshold, decision)}


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


def _csv_probabilities(pred: PredictorBase, rows: list[Record], images: Path, source: str,
                       bad: dict[int, str], batch_size: int, num_workers: int) -> np.ndarray:
    """(N, C) probabilities of every row; rows in `bad` (no readable image) from the caption
    head, or from a blank image when the model has none."""
    if not (bad and pred.has_caption_head):
        ds = pred.dataset(rows, images, source, blank_missing_images=bool(bad), with_targets=False)
        return pred.probabilities(ds, batch_size, num_workers)
    good = [i for i in range(len(rows)) if i not in bad]
    probs = np.zeros((len(rows), pred.label_map.num_classes))
    if good:
        probs[good] = pred.probabilities(
            pred.dataset([rows[i] for i in good], images, source, with_targets=False),
            batch_size, num_workers)
    probs[list(bad)] = pred.caption_probabilities(
        pred.dataset([rows[i] for i in bad], images, source, with_targets=False), batch_size)
    return probs
