"""The multi-label tagger: image encoder + caption encoder -> fusion -> one logit per label.

    image (B, 3, S, S) --ImageEncoder--> (B, Di) --\
                                                     fuse -> BatchNorm -> Dropout -> MLP -> (B, C)
    ids (B, T), lengths (B,) --TextEncoder--> (B, Dt) --/

Either encoder may be absent (image-only or caption-only models). Sigmoid is applied at inference,
never inside the model, so the losses get logits.
"""

from __future__ import annotations

import torch
from torch import nn


class GatedFusion(nn.Module):
    """Projects both modalities to `dim` and mixes them with a learned per-feature gate, so the
    model can lean on the caption when the image is ambiguous and vice versa."""

    def __init__(self, image_dim: int, text_dim: int, dim: int):
        super().__init__()
        self.image_proj = nn.Linear(image_dim, dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.gate = nn.Linear(image_dim + text_dim, dim)
        self.out_dim = dim

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(torch.cat([img, txt], dim=1)))  # (B, dim)
        return g * self.image_proj(img) + (1 - g) * self.text_proj(txt)  # (B, dim)


class Tagger(nn.Module):
    """Fuses the pooled image and caption embeddings and predicts one logit per label."""

    def __init__(self, image_encoder: nn.Module | None, text_encoder: nn.Module | None,
                 num_classes: int, hidden: int = 512, dropout: float = 0.3, fusion: str = "concat"):
        super().__init__()
        if image_encoder is None and text_encoder is None:
            raise ValueError("a tagger needs an image encoder, a caption encoder, or both")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        img_dim = image_encoder.out_dim if image_encoder is not None else 0
        txt_dim = text_encoder.out_dim if text_encoder is not None else 0
        if fusion == "gated" and img_dim and txt_dim:
            self.fusion = GatedFusion(img_dim, txt_dim, hidden)
            fused_dim = hidden
        elif fusion in ("concat", "gated"):  # gated with one modality is just that modality
            self.fusion = None
            fused_dim = img_dim + txt_dim
        else:
            raise ValueError(f"unknown fusion {fusion!r}; choose from ['concat', 'gated']")
        # Inputs other than raw data, for training on cached features (mmtag.data.feature_cache):
        # image_input_stage k > 0 means `images` are the outputs of image stages [0, k)
        # (num_stages + 1: already pooled); text_input_cached means `ids` are caption features.
        # Plain attributes, not saved: a loaded model always takes raw images and token ids.
        self.image_input_stage = 0
        self.text_input_cached = False
        self.head = nn.Sequential(
            nn.BatchNorm1d(fused_dim),
            nn.Dropout(dropout),
            nn.Linear(fused_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def encode(self, images: torch.Tensor | None, ids: torch.Tensor | None,
               lengths: torch.Tensor | None) -> torch.Tensor:
        """The fused embedding (B, D) that the head classifies."""
        parts = []
        enc = self.image_encoder
        if enc is not None:
            k = self.image_input_stage
            if k > enc.num_stages:
                parts.append(images)  # (B, Di) cached pooled features
            else:
                parts.append(enc.pool(enc.run_stages(images, k)))  # (B, Di)
        if self.text_encoder is not None:
            # (B, Dt), from token ids or cached caption features
            parts.append(ids if self.text_input_cached else self.text_encoder(ids, lengths))
        if self.fusion is not None:
            return self.fusion(parts[0].float(), parts[1].float())  # (B, hidden)
        return torch.cat([p.float() for p in parts], dim=1)  # (B, Di + Dt)

    def forward(self, images: torch.Tensor | None, ids: torch.Tensor | None,
                lengths: torch.Tensor | None) -> torch.Tensor:
        return self.head(self.encode(images, ids, lengths))  # (B, C) logits
