"""Build a tagger from a config (fresh, or to receive saved weights)."""

from __future__ import annotations

from torch import nn

from mmtag.config import ModelConfig
from mmtag.models.tagger import Tagger


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
        from mmtag.models.text_encoders import GloveLSTMEncoder, LstmShape

        emb = caption_enc.vocab.glove_matrix()[0] if load_pretrained else None
        shape = LstmShape(50, cfg.lstm_hidden, cfg.lstm_layers, cfg.bidirectional)
        text = GloveLSTMEncoder(len(caption_enc.vocab), shape,
                                freeze_embeddings=cfg.freeze_embeddings, embeddings=emb)
    elif cfg.text_encoder == "minilm":
        from mmtag.models.text_encoders import MiniLMEncoder

        freeze = int(cfg.freeze_text) if cfg.freeze_text.isdigit() else cfg.freeze_text
        text = MiniLMEncoder(pretrained=pretrained, freeze=freeze)
    return Tagger(image, text, num_classes, cfg)


def encoder_normalisation(model: nn.Module) -> str:
    """The input normalisation a model's image encoder expects ('imagenet' without one)."""
    enc = getattr(model, "image_encoder", None)
    return getattr(enc, "normalisation", "imagenet") if enc is not None else "imagenet"
