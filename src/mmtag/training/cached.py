"""Training on cached features: datasets over the outputs of the frozen part of the network."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mmtag.config import TrainConfig
from mmtag.data.dataset import ImageRows
from mmtag.training.feature_cache import (
    CacheOptions,
    cache_image_features,
    cache_text_features,
    resolve_engine,
)

log = logging.getLogger("mmtag.train")


class CachedDataset(Dataset):
    """(image features, caption ids or features, caption length, target) per row.

    `image` is (N, V, ...) with V views (original, flipped): training draws a view at random,
    evaluation takes view 0, or both (stacked) when `both_views`.
    """

    def __init__(self, image: np.ndarray | None, text: torch.Tensor, lengths: torch.Tensor,
                 targets: torch.Tensor, *, train: bool):
        self.image = torch.from_numpy(image) if image is not None else None
        self.text, self.lengths, self.targets = text, lengths, targets
        self.train = train
        self.both_views = False

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        if self.image is None:
            img = torch.zeros(1)
        elif self.both_views:
            img = self.image[i].float()  # (V, ...)
        elif self.train and self.image.shape[1] > 1:
            img = self.image[i, int(torch.randint(self.image.shape[1], ()))].float()
        else:
            img = self.image[i, 0].float()
        text = self.text[i]
        return img, text.float() if text.is_floating_point() else text, self.lengths[i], self.targets[i]


def plan_cache(cfg: TrainConfig, model) -> tuple[int, int]:
    """(image input stage, caption input stage) for this model; (0, 0) for no cache.

    The frozen prefix of the image encoder is cached: stages [0, k) for k frozen stages, or the
    pooled features when all are frozen (the last feature map instead when an attention image
    head or query fusion reads it). Likewise for MiniLM: the token states after its k frozen
    layers, or its pooled features when it is frozen whole (its last token states when query
    fusion reads them).
    """
    if cfg.cache.enabled == "off":
        return 0, 0
    stage = 0
    enc = model.image_encoder
    if enc is not None and enc.frozen_stages > 0:
        stage = enc.frozen_stages
        if stage == enc.num_stages and not model.needs_image_map:
            stage = enc.num_stages + 1  # pooled features
    text_stage = 0
    txt = model.text_encoder
    if cfg.model.text_encoder == "minilm" and txt.freeze != "none":
        text_stage = txt.num_layers + 1 if txt.freeze == "all" else int(txt.freeze)
        if text_stage > txt.num_layers and model.reads_caption_tokens:
            text_stage = txt.num_layers  # the token states after the last layer, not pooled
    return stage, text_stage


@dataclass(frozen=True)
class CachePlan:
    """What is cached (plan_cache's image stages and caption layers) and how: the autocast
    dtype the model predicts with (the frozen prefix runs under it), progress bars."""

    stage: int
    text_stage: int
    dtype: torch.dtype | None = None
    progress: bool = False


def cached_dataset(cfg: TrainConfig, model, ds, transform_spec, plan: CachePlan, *,
                   train: bool) -> CachedDataset:
    """Replace one raw dataset (mmtag.data.dataset.TaggingDataset) by its cached features, the
    images read through `transform_spec`."""
    root = Path(cfg.cache.dir) if cfg.cache.dir else None
    image = None
    if plan.stage > 0:
        image = cache_image_features(
            model.image_encoder, plan.stage, ImageRows(ds.records, ds.image_dir, ds.source),
            transform_spec, CacheOptions(
                root=root, flip=cfg.cache.flip, batch_size=cfg.cache.batch_size,
                num_workers=cfg.cache.num_workers, progress=plan.progress, dtype=plan.dtype,
                engine=resolve_engine(cfg.cache.engine)))
    text = ds.tokens
    if plan.text_stage:
        text = torch.from_numpy(cache_text_features(model.text_encoder, plan.text_stage, ds,
                                                    root=root, dtype=plan.dtype))
    return CachedDataset(image, text, ds.lengths, ds.targets, train=train)
