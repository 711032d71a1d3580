"""Predict with a run's PyTorch checkpoint (`--engine torch`, the reference engine)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import mmtag
from mmtag.config import ConfigError, TrainConfig
from mmtag.data.batching import Pass
from mmtag.data.dataset import TaggingDataset, make_loader
from mmtag.data.device_batches import DecodedBatches
from mmtag.data.images import (
    build_transform,
    to_rgb,
    transform_spec,
    upright,
)
from mmtag.data.labels import LabelMap
from mmtag.data.tokenizers import tokenizer_from_dict
from mmtag.evaluation.probs_csv import average_probs
from mmtag.inference.base import PredictorBase
from mmtag.models.build import build_tagger, encoder_normalisation
from mmtag.prediction.checkpoint import BestCheckpoint
from mmtag.prediction.passes import EvalPass, evaluate, flip_tta_logits
from mmtag.run_files import best_checkpoint
from mmtag.runtime import (
    Precision,
    autocast,
    choose_precision,
    inference_precision,
    resolve_device,
)

log = logging.getLogger("mmtag.predict")


@dataclass
class Predictor(PredictorBase):
    """A trained tagger with its preprocessing and decision thresholds; for an ensemble
    (`mmtag ensemble`), its members, whose probabilities are averaged."""

    models: list[torch.nn.Module] = None
    config: TrainConfig = None
    device: torch.device = None
    precision: Precision = None  # the autocast dtype of every pass, and why

    @classmethod
    def load(cls, run: Path | str, device: str = "auto", amp: str | None = None) -> Predictor:
        """From a run folder (its best.pt) or a checkpoint file; `amp` replaces its autocast
        setting ('none': fp32)."""
        path = best_checkpoint(run)
        ckpt = BestCheckpoint.load(path)
        cfg = ckpt.config
        if amp is not None:
            cfg = {**cfg, "amp": amp}
        try:
            cfg = TrainConfig.from_dict(cfg)
        except ConfigError as e:
            raise ConfigError(f"the config saved in {path}: {e}") from None
        label_map = LabelMap.from_dict(ckpt.labels)
        caption_enc = tokenizer_from_dict(ckpt.caption)
        unfinished = None if ckpt.finished else ckpt.unfinished_message(path)
        if unfinished:
            log.warning("%s", unfinished)
        dev = resolve_device(device)
        precision = choose_precision(amp, dev) if amp else inference_precision(cfg.amp, dev)
        if precision.setting in ("bf16", "fp16") and precision.dtype is None:  # dropped
            log.info("precision: %s (%s)", precision.name, precision.reason)
        models = []
        for state in ckpt.states():
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
                   thresholds=np.asarray(ckpt.thresholds, dtype=float),
                   at_least_one=ckpt.at_least_one, rule=ckpt.rule,
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
    def image_size(self) -> int | None:
        """The size images are read at (None: a model that reads no images)."""
        return self.config.data.image_size if self.reads_images else None

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
                      num_workers: int = 0, desc: str = "predict") -> np.ndarray:
        """(N, C) sigmoid probabilities, in dataset order (averaged over an ensemble's
        members)."""
        # on a GPU the photos are decoded there (nvJPEG), batch by batch: CPU processes
        # decoding JPEGs cannot keep up with it (a blank image stands in for a missing one
        # only on the DataLoader path)
        on_device = (self.device.type == "cuda" and dataset.load_images
                     and not dataset.blank_missing_images)
        loader = (DecodedBatches(dataset, self.transform_spec(), batch_size, self.device)
                  if on_device else
                  make_loader(dataset, Pass(batch_size), num_workers=num_workers))
        return average_probs(evaluate(model, loader, None, self.device, EvalPass(
            dtype=self.precision.dtype, channels_last=True, tta=self.config.tta_flip,
            progress=None, desc=desc))[1]
            for model in self.models)

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
        tf = self.transform() if self.reads_images else None
        with torch.inference_mode(), autocast(self.device, self.precision.dtype):
            batch = (torch.stack([tf(img) for img in pil]).to(self.device)
                     .contiguous(memory_format=torch.channels_last)
                     if tf is not None else torch.zeros(len(pil), 1))
            for model in self.models:
                logits = flip_tta_logits(model, batch, ids, lengths, self.config.tta_flip)
                parts.append(torch.sigmoid(logits.float()).cpu().numpy())
        return average_probs(parts)
