"""The multi-label tagger: image encoder + caption encoder -> fusion -> one logit per label.

    image (B, 3, S, S) --ImageEncoder--> (B, Di) --\
                                                     fuse -> BatchNorm -> Dropout -> MLP -> (B, C)
    ids (B, T), lengths (B,) --TextEncoder--> (B, Dt) --/

With fusion='query' the MLP is replaced by `LabelQueryDecoder`: one query per label attends over
the image's feature-map positions and the caption's token states.

Either encoder may be absent (image-only or caption-only models). Sigmoid is applied at inference,
never inside the model, so the losses get logits.
"""

from __future__ import annotations

import torch
from torch import nn

from mmtag.config import ModelConfig


def _attention_read(s: torch.Tensor, temperature: float, dim: int) -> torch.Tensor:
    """The attention term of `ClassAttentionHead`: the scores `s` summed along `dim` with softmax
    weights at `temperature`."""
    return (torch.softmax(s * temperature, dim=dim) * s).sum(dim=dim)


class ClassAttentionHead(nn.Module):
    """Per-class logits read off a spatial feature map: a 1x1 conv scores every position for every
    class; each class's logit is the mean of its score map plus `lam` times an attention-weighted
    sum in which positions where that class scores high count more (softmax over positions at
    temperature `temperature`; very large = max pooling). Small objects fill a few cells of the map
    and vanish in a global average; the attention term keeps them (class-specific residual
    attention, Zhu & Wu, ICCV 2021)."""

    def __init__(self, in_dim: int, num_classes: int, *, lam: float, temperature: float,
                 dropout: float):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_dim)
        # whole channels, as dropout on the pooled vector would: element-wise dropout of the map
        # is as regularising but its random mask costs ~40x more on a CPU
        self.drop = nn.Dropout2d(dropout)
        self.score = nn.Conv2d(in_dim, num_classes, kernel_size=1)
        self.lam = lam
        self.temperature = temperature

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        # float32 from here: fp16 overflows at high temperatures, and CPU autocast would run the
        # softmax in bf16
        s = self.score(self.drop(self.norm(fmap))).flatten(2).float()  # (B, C, H*W)
        return s.mean(dim=2) + self.lam * _attention_read(s, self.temperature, dim=2)  # (B, C)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, temperature={self.temperature}"


class _QueryLayer(nn.Module):
    """One pre-norm decoder layer for label queries: self-attention among the queries, their
    cross-attention over the memory, a feed-forward block. Written out (not
    nn.TransformerDecoderLayer) so that the first layer's self-attention, which sees only the
    learned queries, runs once instead of once per sample, and so that the cross-attention's small
    (queries x positions) products avoid the fused CPU kernel, whose backward pass was a third
    of the decoder's time here (docs/experiments.md)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """x (b, C, dim) with b = 1 (the same queries for every sample) or B; memory (B, N, dim);
        pad (B, N) True = ignore -> (B, C, dim)."""
        h = self.norm_self(x)
        x = x + self.drop(self.self_attn(h, h, h, need_weights=False)[0])
        b, c, dim = x.shape
        n_batch, n, heads = memory.shape[0], memory.shape[1], self.heads
        q = self.q(self.norm_cross(x)).view(b, c, heads, -1).transpose(1, 2)  # (b, h, C, dh)
        k, v = self.kv(memory).view(n_batch, n, 2, heads, -1).permute(2, 0, 3, 1, 4)  # (B, h, N, dh)
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, h, C, N)
        scores = scores.float().masked_fill(pad[:, None, None, :], float("-inf"))
        attn = torch.softmax(scores, dim=-1).to(v.dtype)
        read = (attn @ v).transpose(1, 2).reshape(n_batch, c, dim)  # (B, C, dim)
        x = x + self.drop(self.out(read))
        return x + self.drop(self.ff(self.norm_ff(x)))


class LabelQueryDecoder(nn.Module):
    """Fusion by label queries (Query2Label, Liu et al. 2021; ML-Decoder, Ridnik et al. 2023):
    one learned query per label cross-attends over the image's feature-map positions and the
    caption's token states together, so each label looks for its own evidence wherever it is
    (a small car in one corner, the word that names it); from the second layer on the queries
    also attend to each other (labels that go together). Each query's output is scored by that
    label's own weight vector.

    tokens: [(B, N_i, D_i)] per modality with masks [(B, N_i) bool, True = real] -> (B, C)."""

    def __init__(self, in_dims: list[int], num_classes: int, *, dim: int, layers: int,
                 heads: int, dropout: float):
        super().__init__()
        self.proj = nn.ModuleList(nn.Sequential(nn.Linear(d, dim), nn.LayerNorm(dim))
                                  for d in in_dims)
        self.modality = nn.Parameter(torch.zeros(len(in_dims), dim))  # which modality a token is
        self.queries = nn.Parameter(torch.randn(num_classes, dim) * 0.02)  # (C, dim)
        self.layers = nn.ModuleList(_QueryLayer(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out_weight = nn.Parameter(torch.randn(num_classes, dim) * dim ** -0.5)  # (C, dim)
        self.out_bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, tokens: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
        memory = torch.cat([proj(t) + self.modality[i]
                            for i, (proj, t) in enumerate(zip(self.proj, tokens, strict=True))],
                           dim=1)
        pad = ~torch.cat(masks, dim=1)  # (B, N) True = padding, ignored by the attention
        x = self.queries.unsqueeze(0)  # (1, C, dim): broadcast over the batch by the first layer
        for layer in self.layers:
            x = layer(x, memory, pad)  # (B, C, dim)
        out = self.norm(x).float()
        return (out * self.out_weight).sum(-1) + self.out_bias  # (B, C)



def _pre_head_channels(encoder: nn.Module) -> int:
    """Input channels of an image encoder's last stage when that stage is a trainable 1x1 conv
    head."""
    from mmtag.models.image_encoders import conv_head_in_channels

    channels = conv_head_in_channels(encoder.stages)
    if channels is None or getattr(encoder, "frozen_stages", 0) >= encoder.num_stages:
        raise ValueError("model.query_pre_head needs an image encoder whose last stage is a 1x1 "
                         "conv head (EfficientNet, MobileNet), not frozen whole")
    return channels


def _mlp_head(in_dim: int, hidden: int, num_classes: int, dropout: float) -> nn.Module:
    """The report's fusion head: BatchNorm -> Dropout -> Linear -> ReLU -> Dropout -> Linear."""
    return nn.Sequential(nn.BatchNorm1d(in_dim), nn.Dropout(dropout), nn.Linear(in_dim, hidden),
                         nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes))


def _linear_head(in_dim: int, num_classes: int, dropout: float) -> nn.Module:
    """A per-modality head on a pooled vector."""
    return nn.Sequential(nn.BatchNorm1d(in_dim), nn.Dropout(dropout), nn.Linear(in_dim, num_classes))


class Tagger(nn.Module):
    """Fuses the image and caption embeddings (pooled vectors -> MLP, or label queries over the
    image map and caption tokens) and predicts one logit per label. Built from a validated
    `ModelConfig` (`mmtag.models.build.build_tagger` makes the encoders)."""

    def __init__(self, image_encoder: nn.Module | None, text_encoder: nn.Module | None,
                 num_classes: int, cfg: ModelConfig):
        super().__init__()
        if image_encoder is None and text_encoder is None:
            raise ValueError("a tagger needs an image encoder, a caption encoder, or both")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.fusion = cfg.fusion
        # Inputs other than raw data, for training on cached features (mmtag.training.feature_cache):
        # image_input_stage k > 0 means `images` are the outputs of image stages [0, k)
        # (num_stages + 1: already pooled); likewise text_input_stage k > 0 means `ids` are the
        # caption encoder's token states after k layers (num_layers + 1: pooled features).
        # Plain attributes, not saved: a loaded model always takes raw images and token ids.
        self.image_input_stage = 0
        self.text_input_stage = 0
        img_dim = image_encoder.out_dim if image_encoder is not None else 0
        txt_dim = text_encoder.out_dim if text_encoder is not None else 0
        # the label queries read the image map before the encoder's 1x1 conv head (352 channels
        # for Lite2 instead of 1280: a 3.6x cheaper projection)
        self.query_pre_head = cfg.query_pre_head and cfg.fusion == "query" and img_dim > 0
        if cfg.fusion == "query":
            # the image's feature-map positions and the caption's tokens (MiniLM) or its pooled
            # vector (one token) are the memory the label queries read
            map_dim = _pre_head_channels(image_encoder) if self.query_pre_head else img_dim
            self.head = LabelQueryDecoder([d for d in (map_dim, txt_dim) if d], num_classes,
                                          dim=cfg.query_dim, layers=cfg.query_layers,
                                          heads=cfg.query_heads, dropout=cfg.query_dropout)
        else:
            self.head = _mlp_head(img_dim + txt_dim, cfg.hidden, num_classes, cfg.dropout)
        # Per-modality heads (image + caption models only): 'loss' trains each modality to
        # classify on its own as well (a regulariser: the fused head otherwise leans on whichever
        # modality learns fastest); 'ensemble' also averages their logits with the fused ones,
        # weighted by head_weights (training scores each head on its own).
        self.aux_heads = cfg.aux_heads if img_dim and txt_dim else "none"
        self.head_weights = tuple(float(w) for w in cfg.head_weights)
        self.image_head_kind = cfg.image_head if self.aux_heads != "none" else "linear"
        if self.aux_heads != "none":
            if self.image_head_kind == "attention":
                self.image_head = ClassAttentionHead(img_dim, num_classes, lam=cfg.attn_lambda,
                                                     temperature=cfg.attn_temperature,
                                                     dropout=cfg.dropout)
            else:
                self.image_head = _linear_head(img_dim, num_classes, cfg.dropout)
            self.text_head = _linear_head(txt_dim, num_classes, cfg.dropout)

    @property
    def needs_image_map(self) -> bool:
        """Whether a head reads the image's feature map (so pooled features cannot stand in)."""
        return self.image_head_kind == "attention" or self.fusion == "query"

    @property
    def reads_caption_tokens(self) -> bool:
        """Whether the label queries read the caption's token states (MiniLM), not its pooled
        vector."""
        return self.fusion == "query" and hasattr(self.text_encoder, "run_layers")

    def _embed(self, images, ids, lengths):
        """(pooled embeddings, the image feature map (B, Di, H', W') or None if not computed,
        the caption's (token states (B, T, Dt), mask (B, T)) or None if not needed, the map the
        label queries read: the feature map, or the one before the conv head)."""
        parts = []
        fmap = qmap = tokens = None
        enc = self.image_encoder
        if enc is not None:
            k = self.image_input_stage
            if k > enc.num_stages:
                if self.needs_image_map:
                    raise ValueError("an attention image head or query fusion needs the feature "
                                     "map: cache image stages before the last one, not pooled "
                                     "features")
                parts.append(images.float())  # (B, Di) cached pooled features
            else:
                if self.query_pre_head:
                    qmap = enc.run_stages(images, k, enc.num_stages - 1)  # (B, Dq, H', W')
                    # left in the autocast dtype: the class-attention head's BatchNorm, channel
                    # dropout and 1x1 conv read this 1280-channel map at half the bytes (a cpu
                    # recipe step 0.488 -> 0.470 s, docs/experiments.md)
                    fmap = enc.run_stages(qmap, enc.num_stages - 1)  # (B, D, H', W')
                else:
                    fmap = qmap = enc.run_stages(images, k).float()  # (B, D, H', W')
                parts.append(enc.pool(fmap).float())  # (B, D)
        if self.text_encoder is not None:
            txt, tokens = self._embed_caption(ids, lengths)
            parts.append(txt)
        return parts, fmap, tokens, qmap

    def _embed_caption(self, ids, lengths):
        """(the caption's pooled vector (B, Dt), its (token states (B, T, Dt), mask (B, T)) or
        None if the label queries do not read tokens)."""
        txt_enc, k, tokens = self.text_encoder, self.text_input_stage, None
        if self.reads_caption_tokens:
            if k > txt_enc.num_layers:
                raise ValueError("query fusion needs token states: cache them, not pooled "
                                 "features")
            states = txt_enc.run_layers(ids if k == 0 else ids.float(), lengths, k)  # (B, T, Dt)
            txt = txt_enc.pool(states, lengths)  # (B, Dt)
            tokens = (states, txt_enc.token_mask(lengths, states.shape[1], states.device))
        elif k == 0:
            txt = txt_enc(ids, lengths)  # (B, Dt) from token ids
        elif k > txt_enc.num_layers:
            txt = ids  # (B, Dt) cached pooled features
        else:
            txt = txt_enc.pool(txt_enc.run_layers(ids.float(), lengths, k), lengths)  # (B, Dt)
        return txt.float(), tokens

    @property
    def has_caption_head(self) -> bool:
        """Whether the caption has a head of its own (trained on its own loss), which can
        predict a sample from its caption alone."""
        return self.aux_heads != "none" and self.text_encoder is not None

    def caption_logits(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of the caption's own head: the prediction for samples whose image is
        missing. The image encoder does not run."""
        if not self.has_caption_head:
            raise ValueError("this model has no caption head of its own (it was trained with "
                             "model.aux_heads=none or without a caption encoder), so it cannot "
                             "predict from the caption alone")
        return self.text_head(self._embed_caption(ids, lengths)[0])

    def forward_all(self, images: torch.Tensor | None, ids: torch.Tensor | None,
                    lengths: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """{'logits': final (B, C)} plus 'fused', and 'image', 'text' (B, C) logits with aux
        heads."""
        parts, fmap, tokens, qmap = self._embed(images, ids, lengths)
        if self.fusion == "query":
            out = {"fused": self.head(*self._memory(parts, qmap, tokens))}  # (B, C)
        else:
            out = {"fused": self.head(torch.cat(parts, dim=1))}  # (B, Di + Dt) -> (B, C)
        if self.aux_heads != "none":
            img_in = fmap if self.image_head_kind == "attention" else parts[0]
            out["image"] = self.image_head(img_in)  # (B, C)
            out["text"] = self.text_head(parts[-1])  # (B, C)
        if self.aux_heads == "ensemble":
            logits = [out["fused"], out["image"], out["text"]]
            out["logits"] = (sum(w * x for w, x in zip(self.head_weights, logits, strict=True))
                             / sum(self.head_weights))
        else:
            out["logits"] = out["fused"]
        return out

    def _memory(self, parts, fmap, tokens) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The label queries' memory: per modality (B, N, D) tokens and (B, N) masks; `fmap` is
        the image map they read."""
        seqs, masks = [], []
        if fmap is not None:
            seqs.append(fmap.flatten(2).transpose(1, 2))  # (B, H'*W', D): every position is real
            masks.append(torch.ones(seqs[-1].shape[:2], dtype=torch.bool, device=fmap.device))
        if tokens is not None:
            seqs.append(tokens[0])  # (B, T, Dt) token states, padding masked
            masks.append(tokens[1])
        elif self.text_encoder is not None:
            seqs.append(parts[-1].unsqueeze(1))  # (B, 1, Dt): a pooled caption is one token
            masks.append(torch.ones(seqs[-1].shape[:2], dtype=torch.bool, device=seqs[-1].device))
        return seqs, masks

    def forward(self, images: torch.Tensor | None, ids: torch.Tensor | None,
                lengths: torch.Tensor | None, all_heads: bool = False):
        """(B, C) logits; with `all_heads`, forward_all's dict (training calls the model this
        way, so that DistributedDataParallel and torch.compile wrap the whole step)."""
        out = self.forward_all(images, ids, lengths)
        return out if all_heads else out["logits"]  # (B, C) logits
