"""What every engine's predictor offers (`PredictorBase`): the dataset of a run's inputs, the
decision rule, `predict` and `predict_probs`. The engines: `torch_engine.Predictor` and
`onnx_engine.OnnxPredictor`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mmtag.data.csv_io import Record, csv_columns
from mmtag.data.dataset import ImageRows, Reading, TaggingDataset
from mmtag.data.images import (
    load_image,
)
from mmtag.data.labels import LabelMap, UnknownLabelError
from mmtag.data.sources import frame_records, is_frame
from mmtag.evaluation.metrics import multilabel_metrics
from mmtag.evaluation.thresholds import apply_thresholds, check_threshold, decide


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
    # tell its user (mmtag.prediction.checkpoint.BestCheckpoint.unfinished_message)
    unfinished: str | None = None

    @property
    def tta_flip(self) -> bool:
        """Whether each image is averaged with its mirror image."""
        raise NotImplementedError

    @property
    def image_size(self) -> int | None:
        """The size images are read at; None for a model that reads no images."""
        raise NotImplementedError

    def transform(self, size: int | None = None):
        """The preprocessing of one PIL image into the model's input tensor."""
        raise NotImplementedError

    def dataset(self, records: Sequence[Record], image_dir: Path | str, source: str = "",
                blank_missing_images: bool = False, with_targets: bool = True) -> TaggingDataset:
        """`records` as model inputs; their labels become targets only `with_targets` (for
        scoring), which must then be in the run's label set."""
        return TaggingDataset(ImageRows(records, Path(image_dir), source), self.caption_enc,
                              self.label_map, self.transform(),
                              Reading(images=self.reads_images, targets=with_targets,
                                      blank_missing_images=blank_missing_images))

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

    def predict(self, data, threshold: float | None = None, *,
                images: Path | str | None = None) -> list[tuple[str, ...]]:
        """The labels of each sample: `data` is a list of (image or image path, caption)
        pairs, or a pandas DataFrame with image and caption columns (paths relative to
        `images`)."""
        return [self.label_map.decode(row) for row in self.decide(self._probs(data, images),
                                                                  threshold)]

    def predict_proba(self, data, *, images: Path | str | None = None):
        """A pandas DataFrame of probabilities: one row per sample (a DataFrame's index is
        kept), one column per label name."""
        import pandas as pd

        probs = self._probs(data, images)
        index = data.index if is_frame(data) else None
        return pd.DataFrame(probs, columns=list(self.label_map.display), index=index)

    def evaluate(self, data, *, images: Path | str | None = None,
                 threshold: float | None = None) -> dict:
        """Metrics on a labelled DataFrame (image, caption, labels columns): micro-, macro- and
        samples-F1, precision, recall, and per label (`per_class`), by the run's rule."""
        rows = frame_records(data, need_labels=True)
        return self.metrics_of(ImageRows(rows, Path(images or "."), "the DataFrame"),
                               threshold=threshold)

    def metrics_of(self, rows: ImageRows, threshold: float | None = None,
                   decision: str | None = None, batch_size: int = 64,
                   num_workers: int = 0) -> dict:
        """`multilabel_metrics` of labelled rows (per label by its name)."""
        try:
            ds = self.dataset(rows.records, rows.image_dir, rows.source)
        except UnknownLabelError as e:
            raise UnknownLabelError(e.label, e.where, (
                f"label {e.label} ({e.where}) is not one this run predicts "
                f"({', '.join(self.label_map.labels)}), so it cannot be scored: remove it "
                f"from the rows, or evaluate a run trained on rows that carry it")) from None
        probs = self.probabilities(ds, batch_size, num_workers, desc="evaluate")
        y = ds.targets.numpy().astype(int)
        m = multilabel_metrics(y, self.decide(probs, threshold, decision=decision),
                               label_names=list(self.label_map.display))
        m["rows"] = len(rows.records)
        return m

    def _probs(self, data, images: Path | str | None) -> np.ndarray:
        if is_frame(data):
            ds = self.dataset(frame_records(data), Path(images or "."), "the DataFrame",
                              with_targets=False)
            return self.probabilities(ds, desc="predict")
        pairs = list(data)
        root = Path(images) if images is not None else None
        imgs = [img if isinstance(img, Image.Image) or not self.reads_images
                else load_image(root / img if root else img, f"pair {i}")
                for i, (img, _) in enumerate(pairs)]
        return self.predict_probs(imgs, [c for _, c in pairs])

    def describe(self) -> dict:
        """The model in a few facts (GET /v1/model, the benchmark)."""
        return {"engine": self.engine, "labels": list(self.label_map.labels),
                "names": list(self.label_map.display),
                "decision": {"rule": self.rule,
                             "thresholds": [round(float(t), 6) for t in self.thresholds],
                             "at_least_one": self.at_least_one},
                "reads_images": self.reads_images, "reads_captions": self.reads_captions,
                # a list, as /v1/model has always given it
                "image_sizes": [self.image_size], "tta_flip": self.tta_flip,
                "caption_max_len": getattr(self.caption_enc, "max_len", None)}

    def check_captions(self, csv_path: Path) -> None:
        """A model that reads captions refuses a CSV without them, rather than predicting every
        row from an empty caption."""
        if self.reads_captions and not csv_columns(csv_path)[1]:
            raise ValueError(f"{csv_path} has no Caption column, and this model reads captions: "
                             f"give the CSV with the captions (ImageID,Caption or "
                             f"ImageID,Labels,Caption)")
