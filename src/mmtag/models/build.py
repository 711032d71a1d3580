"""Build a tagger and its caption encoder from a config (fresh, or to receive saved weights)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmtag.config import DataConfig, ModelConfig
from mmtag.data.text import CaptionEncoder
from mmtag.models.tagger import Tagger


class NoCaption:
    """Caption 'encoder' of image-only models: a single padding id."""

    max_len = 1

    def __call__(self, caption: str) -> tuple[np.ndarray, int]:
        return np.zeros(1, dtype=np.int64), 1

    def to_dict(self) -> dict:
        return {"kind": "none"}


def fit_caption_encoder(model_cfg: ModelConfig, data_cfg: DataConfig, captions: Sequence[str]):
    """The caption -> (ids, length) function for this model, fitted on training captions."""
    if model_cfg.text_encoder == "none":
        return NoCaption()
    if model_cfg.text_encoder == "minilm":
        from mmtag.models.text_encoders import MiniLMTokenizer, choose_minilm_max_len

        max_len = data_cfg.max_len or choose_minilm_max_len(captions, data_cfg.len_quantile)
        return MiniLMTokenizer(max_len=max_len)
    return CaptionEncoder.fit(captions, max_len=data_cfg.max_len, quantile=data_cfg.len_quantile,
                              min_freq=data_cfg.min_freq, stopwords=data_cfg.stopwords,
                              lemmas=data_cfg.lemmatize)


def caption_encoder_to_dict(enc) -> dict:
    d = enc.to_dict()
    if isinstance(enc, CaptionEncoder):
        d["kind"] = "glove"
    elif "kind" not in d:
        d["kind"] = "minilm"
    return d


def caption_encoder_from_dict(d: dict):
    kind = d.get("kind")
    if kind == "none":
        return NoCaption()
    if kind == "glove":
        return CaptionEncoder.from_dict(d)
    if kind == "minilm":
        from mmtag.models.text_encoders import MiniLMTokenizer

        return MiniLMTokenizer.from_dict(d)
    raise ValueError(f"unknown caption encoder kind {kind!r} in checkpoint")


def build_tagger(cfg: ModelConfig, num_classes: int, caption_enc, *, load_pretrained: bool) -> Tagger:
    """A Tagger for `cfg`. `load_pretrained=False` builds the same architecture without reading
    any pretrained weights (a checkpoint's state dict is loaded next)."""
    pretrained = cfg.pretrained and load_pretrained
    image = None
    if cfg.image_encoder != "none":
        from mmtag.models.image_encoders import build_image_encoder

        freeze = int(cfg.freeze_image) if cfg.freeze_image.isdigit() else cfg.freeze_image
        image = build_image_encoder(cfg.image_encoder, pretrained=pretrained, freeze=freeze,
                                    drop_path=cfg.drop_path)
    text = None
    if cfg.text_encoder == "glove_lstm":
        from mmtag.models.text_encoders import GloveLSTMEncoder

        emb = caption_enc.vocab.glove_matrix()[0] if load_pretrained else None
        text = GloveLSTMEncoder(len(caption_enc.vocab), 50, hidden=cfg.lstm_hidden,
                                layers=cfg.lstm_layers, bidirectional=cfg.bidirectional,
                                freeze_embeddings=cfg.freeze_embeddings, embeddings=emb)
    elif cfg.text_encoder == "minilm":
        from mmtag.models.text_encoders import MiniLMEncoder

        freeze = int(cfg.freeze_text) if cfg.freeze_text.isdigit() else cfg.freeze_text
        text = MiniLMEncoder(pretrained=pretrained, freeze=freeze)
    return Tagger(image, text, num_classes, cfg)
