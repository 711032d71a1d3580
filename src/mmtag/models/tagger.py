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


def _temperatures(t: float | tuple[float, ...]) -> tuple[float, ...]:
    """An attention head's softmax temperature(s) as a tuple."""
    return tuple(float(v) for v in t) if isinstance(t, (tuple, list)) else (float(t),)


def _attention_read(s: torch.Tensor, temperature: float | tuple[float, ...], dim: int,
                    keep: torch.Tensor | None = None) -> torch.Tensor:
    """The attention term of the attention heads: the scores `s` summed along `dim` with softmax
    weights at each temperature (positions where `keep` is False get none), averaged over the
    temperatures."""
    temps = _temperatures(temperature)
    total = 0.0
    for t in temps:
        z = s * t if keep is None else (s * t).masked_fill(~keep, float("-inf"))
        total = total + (torch.softmax(z, dim=dim) * s).sum(dim=dim)
    return total / len(temps)


class ClassAttentionHead(nn.Module):
    """Per-class logits read off a spatial feature map: a 1x1 conv scores every position for every
    class; each class's logit is the mean of its score map plus `lam` times an attention-weighted
    sum in which positions where that class scores high count more (softmax over positions at
    temperature `temperature`; very large = max pooling). Small objects fill a few cells of the map
    and vanish in a global average; the attention term keeps them (class-specific residual
    attention, Zhu & Wu, ICCV 2021). Several temperatures (a tuple) average their attention terms,
    like the paper's multi-head variant with one shared scoring conv."""

    def __init__(self, in_dim: int, num_classes: int, *, lam: float,
                 temperature: float | tuple[float, ...], dropout: float):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_dim)
        # whole channels, as dropout on the pooled vector would: element-wise dropout of the map
        # is as regularising but its random mask costs ~40x more on a CPU
        self.drop = nn.Dropout2d(dropout)
        self.score = nn.Conv2d(in_dim, num_classes, kernel_size=1)
        self.lam = lam
        self.temperature = temperature
        if not _temperatures(temperature) or min(_temperatures(temperature)) <= 0:
            raise ValueError(f"attention temperatures must be > 0, got {temperature}")

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        # float32 from here: fp16 overflows at high temperatures, and CPU autocast would run the
        # softmax in bf16
        s = self.score(self.drop(self.norm(fmap))).flatten(2).float()  # (B, C, H*W)
        return s.mean(dim=2) + self.lam * _attention_read(s, self.temperature, dim=2)  # (B, C)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, temperature={self.temperature}"


class TokenAttentionHead(nn.Module):
    """Per-class logits read off a caption's token states, the way `ClassAttentionHead` reads a
    feature map: a linear layer scores every token for every class; each class's logit is the
    mean of its scores over the real tokens plus `lam` times an attention-weighted sum in which
    the tokens that score high for that class (the word that names the object) count more."""

    def __init__(self, in_dim: int, num_classes: int, *, lam: float, temperature: float,
                 dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.score = nn.Linear(in_dim, num_classes)
        self.lam = lam
        self.temperature = temperature

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, D), mask (B, T) bool (True = a real token) -> (B, C)."""
        s = self.score(self.drop(tokens)).float()  # (B, T, C)
        keep = mask.unsqueeze(-1)  # (B, T, 1)
        mean = (s * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1)  # (B, C)
        return mean + self.lam * _attention_read(s, self.temperature, dim=1, keep=keep)  # (B, C)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, temperature={self.temperature}"


class _QueryLayer(nn.Module):
    """One pre-norm decoder layer for label queries: self-attention among the queries, their
    cross-attention over the memory, a feed-forward block. Written out (not
    nn.TransformerDecoderLayer) so that the first layer's self-attention, which sees only the
    learned queries, runs once instead of once per sample, and so that the cross-attention's small
    (queries x positions) products avoid the fused CPU kernel, whose backward pass was a third
    of the decoder's time here (docs/quality.md, session 6)."""

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


def hide_tokens(pad: torch.Tensor, chance: float) -> torch.Tensor:
    """pad (B, N) True = ignored -> the same with each other token also hidden with `chance`; a
    sample whose every token would be hidden keeps its own mask."""
    hidden = pad | (torch.rand(pad.shape, device=pad.device) < chance)
    return torch.where(hidden.all(dim=1, keepdim=True), pad, hidden)


class LabelQueryDecoder(nn.Module):
    """Fusion by label queries (Query2Label, Liu et al. 2021; ML-Decoder, Ridnik et al. 2023):
    one learned query per label cross-attends over the image's feature-map positions and the
    caption's token states together, so each label looks for its own evidence wherever it is
    (a small car in one corner, the word that names it); from the second layer on the queries
    also attend to each other (labels that go together). Each query's output is scored by that
    label's own weight vector.

    In training, `memory_drop` hides each memory token (an image position, a caption token) from
    the queries with that chance, so that no label leans on one position or word alone (a sample
    keeps its full memory in the rare case that every token would be hidden).

    tokens: [(B, N_i, D_i)] per modality with masks [(B, N_i) bool, True = real] -> (B, C)."""

    def __init__(self, in_dims: list[int], num_classes: int, *, dim: int, layers: int,
                 heads: int, dropout: float, memory_drop: float = 0.0):
        super().__init__()
        self.memory_drop = memory_drop
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
        if self.training and self.memory_drop > 0:
            pad = hide_tokens(pad, self.memory_drop)
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


def stage_out_channels(encoder: nn.Module, k: int) -> int:
    """Channels of the output of image stages [0, k): those of the last convolution or
    BatchNorm in stage k - 1."""
    for m in reversed(list(encoder.stages[k - 1].modules())):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return m.num_features
        if isinstance(m, nn.Conv2d):
            return m.out_channels
    raise ValueError(f"stage {k - 1} of {encoder.name} has no convolution to read its width from")


class Tagger(nn.Module):
    """Fuses the image and caption embeddings (pooled vectors -> MLP, or label queries over the
    image map and caption tokens) and predicts one logit per label."""

    def __init__(self, image_encoder: nn.Module | None, text_encoder: nn.Module | None,
                 num_classes: int, hidden: int = 512, dropout: float = 0.3, fusion: str = "concat",
                 aux_heads: str = "none", image_head: str = "linear", text_head: str = "linear",
                 image_pool: str = "avg", attn_lambda: float = 0.2,
                 attn_temperature: float | tuple[float, ...] = 1.0,
                 query_dim: int = 256, query_layers: int = 1, query_heads: int = 8,
                 query_dropout: float = 0.1, query_pre_head: bool = False,
                 query_memory_drop: float = 0.0, query_extra_stage: int = 0,
                 head_weights: tuple[float, ...] = (1.0, 1.0, 1.0), pooled_head: bool = False):
        super().__init__()
        if image_encoder is None and text_encoder is None:
            raise ValueError("a tagger needs an image encoder, a caption encoder, or both")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        img_dim = map_dim = image_encoder.out_dim if image_encoder is not None else 0
        # 'avgmax': the image vector is the feature map's average and its maximum, concatenated;
        # a small object lights up a few positions, which the maximum keeps and the average dilutes
        if image_pool not in ("avg", "avgmax"):
            raise ValueError(f"unknown image_pool {image_pool!r}; choose from ['avg', 'avgmax']")
        self.image_pool = image_pool if image_encoder is not None else "avg"
        if self.image_pool == "avgmax":
            img_dim *= 2
        txt_dim = text_encoder.out_dim if text_encoder is not None else 0
        if fusion == "gated" and img_dim and txt_dim:
            self.fusion = GatedFusion(img_dim, txt_dim, hidden)
            fused_dim = hidden
        elif fusion in ("concat", "gated", "query"):  # gated with one modality: that modality
            self.fusion = None
            fused_dim = img_dim + txt_dim
        else:
            raise ValueError(f"unknown fusion {fusion!r}; choose from ['concat', 'gated', 'query']")
        self.fusion_kind = fusion
        # Inputs other than raw data, for training on cached features (mmtag.data.feature_cache):
        # image_input_stage k > 0 means `images` are the outputs of image stages [0, k)
        # (num_stages + 1: already pooled); likewise text_input_stage k > 0 means `ids` are the
        # caption encoder's token states after k layers (num_layers + 1: pooled features).
        # Plain attributes, not saved: a loaded model always takes raw images and token ids.
        self.image_input_stage = 0
        self.text_input_stage = 0
        # query_pre_head: the label queries read the image map before the encoder's 1x1 conv
        # head (352 channels for Lite2 instead of 1280: a 3.6x cheaper projection)
        self.query_pre_head = bool(query_pre_head and fusion == "query" and image_encoder is not None)
        query_map_dim = _pre_head_channels(image_encoder) if self.query_pre_head else map_dim
        # query_extra_stage k: the queries also read the output of image stages [0, k), a map at
        # a finer stride than the last one (small objects cover more of its positions)
        self.query_extra_stage = int(query_extra_stage)
        extra_dim = 0
        if self.query_extra_stage:
            last = image_encoder.num_stages - (2 if self.query_pre_head else 1) if image_encoder else 0
            if fusion != "query" or image_encoder is None:
                raise ValueError("model.query_extra_stage adds a map for the label queries to "
                                 "read: it needs model.fusion=query and an image encoder")
            if not 1 <= self.query_extra_stage <= last:
                raise ValueError(f"model.query_extra_stage={self.query_extra_stage}: "
                                 f"{image_encoder.name} has stages 0..{image_encoder.num_stages - 1}"
                                 f"; choose k in 1..{last} (the output of stages [0, k) is read "
                                 f"besides the last map)")
            extra_dim = stage_out_channels(image_encoder, self.query_extra_stage)
        if fusion == "query":
            # the image's feature-map positions (and those of the finer extra map) and the
            # caption's tokens (MiniLM) or its pooled vector (one token) are the memory the label
            # queries read
            self.head = LabelQueryDecoder([d for d in (query_map_dim, extra_dim, txt_dim) if d],
                                          num_classes,
                                          dim=query_dim, layers=query_layers, heads=query_heads,
                                          dropout=query_dropout,
                                          memory_drop=query_memory_drop)
        else:
            self.head = nn.Sequential(
                nn.BatchNorm1d(fused_dim),
                nn.Dropout(dropout),
                nn.Linear(fused_dim, hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(hidden, num_classes),
            )
        # Per-modality heads: 'loss' trains each modality to classify on its own as well (a
        # regulariser: the fused MLP otherwise leans on whichever modality learns fastest);
        # 'ensemble' also averages their logits with the fused ones at prediction time.
        if aux_heads not in ("none", "loss", "ensemble"):
            raise ValueError(f"unknown aux_heads {aux_heads!r}; choose from ['ensemble', 'loss', 'none']")
        self.aux_heads = aux_heads if img_dim and txt_dim else "none"
        # 'ensemble': the prediction is the weighted mean of the fused, image and caption heads'
        # logits (training scores each head on its own, so the weights change predictions only,
        # unless loss.self_distill makes this mean every head's soft target)
        self.head_weights = tuple(float(w) for w in head_weights)
        # pooled_head: a fourth member, an MLP on the pooled image and caption vectors (the
        # fusion of v1-v3), beside the label queries: a head that reads the inputs another way
        if pooled_head and (self.aux_heads != "ensemble" or fusion != "query"):
            raise ValueError("pooled_head is a fourth head beside label-query fusion's "
                             "per-modality heads: it needs fusion='query', aux_heads='ensemble' "
                             "and both modalities")
        n_heads = 4 if pooled_head else 3
        if (len(self.head_weights) != n_heads or min(self.head_weights) < 0
                or sum(self.head_weights) <= 0):
            raise ValueError(f"head_weights must be {n_heads} weights >= 0 with a positive sum, "
                             f"got {head_weights}")
        self.pooled_mlp = None
        if pooled_head:
            self.pooled_mlp = nn.Sequential(
                nn.BatchNorm1d(img_dim + txt_dim), nn.Dropout(dropout),
                nn.Linear(img_dim + txt_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                nn.Linear(hidden, num_classes))
        # The image's own head reads the pooled vector ('linear') or the spatial map ('attention':
        # ClassAttentionHead), which needs the map, so not pooled cached features.
        if image_head not in ("linear", "attention"):
            raise ValueError(f"unknown image_head {image_head!r}; choose from ['attention', 'linear']")
        self.image_head_kind = image_head if self.aux_heads != "none" else "linear"
        # The caption's own head likewise: 'attention' (TokenAttentionHead) needs MiniLM's tokens.
        if text_head not in ("linear", "attention"):
            raise ValueError(f"unknown text_head {text_head!r}; choose from ['attention', 'linear']")
        has_tokens = hasattr(text_encoder, "run_layers")
        if text_head == "attention" and self.aux_heads != "none" and not has_tokens:
            raise ValueError("text_head='attention' reads token states: use the MiniLM caption "
                             "encoder")
        self.text_head_kind = text_head if self.aux_heads != "none" else "linear"
        if self.aux_heads != "none":
            if image_head == "attention":
                self.image_head = ClassAttentionHead(map_dim, num_classes, lam=attn_lambda,
                                                     temperature=attn_temperature, dropout=dropout)
            else:
                self.image_head = nn.Sequential(nn.BatchNorm1d(img_dim), nn.Dropout(dropout),
                                                nn.Linear(img_dim, num_classes))
            if self.text_head_kind == "attention":
                self.text_head = TokenAttentionHead(txt_dim, num_classes, lam=attn_lambda,
                                                    temperature=attn_temperature, dropout=dropout)
            else:
                self.text_head = nn.Sequential(nn.BatchNorm1d(txt_dim), nn.Dropout(dropout),
                                               nn.Linear(txt_dim, num_classes))

    def embed(self, images: torch.Tensor | None, ids: torch.Tensor | None,
              lengths: torch.Tensor | None) -> list[torch.Tensor]:
        """Pooled embeddings of the modalities present: [(B, Di)] and/or [(B, Dt)]."""
        return self._embed(images, ids, lengths)[0]

    def _embed(self, images, ids, lengths):
        """(pooled embeddings, the image feature map (B, Di, H', W') or None if not computed,
        the caption's (token states (B, T, Dt), mask (B, T)) or None if not needed, the map the
        label queries read: the feature map, or the one before the conv head, and the finer map
        they also read with `query_extra_stage`, else None).

        With `query_extra_stage` s and cached inputs from a stage k > s, `images` is the pair
        (input of stage k, output of stages [0, s))."""
        parts = []
        fmap = qmap = tokens = extra = None
        enc = self.image_encoder
        if enc is not None:
            k = self.image_input_stage
            s = self.query_extra_stage
            if s and k > s:  # cached: (input of stage k, output of stages [0, s))
                images, extra = images
            elif s:
                extra = images = enc.run_stages(images, k, s)  # (B, De, H'', W'')
                k = s
            if k > enc.num_stages:
                if (self.image_head_kind == "attention" or self.image_pool != "avg"
                        or self.fusion_kind == "query"):
                    raise ValueError("an attention image head, query fusion or image_pool='avgmax' "
                                     "needs the feature map: cache image stages before the last "
                                     "one, not pooled features")
                parts.append(images.float())  # (B, Di) cached pooled features
            else:
                if self.query_pre_head:
                    # the label queries read the map before the 1x1 conv head (fewer channels)
                    qmap = enc.run_stages(images, k, enc.num_stages - 1)  # (B, Dq, H', W')
                    # left in the autocast dtype: the class-attention head's BatchNorm, channel
                    # dropout and 1x1 conv read this 1280-channel map at half the bytes (a cpu
                    # recipe step 0.488 -> 0.470 s, docs/quality.md session 8)
                    fmap = enc.run_stages(qmap, enc.num_stages - 1)  # (B, D, H', W')
                else:
                    fmap = qmap = enc.run_stages(images, k).float()  # (B, D, H', W')
                pooled = enc.pool(fmap).float()  # (B, D)
                if self.image_pool == "avgmax":
                    pooled = torch.cat([pooled, fmap.amax(dim=(2, 3))], dim=1)  # (B, 2D)
                parts.append(pooled)  # (B, Di)
        if self.text_encoder is not None:
            txt, tokens = self._embed_caption(ids, lengths)
            parts.append(txt)
        return parts, fmap, tokens, qmap, extra

    def _embed_caption(self, ids, lengths):
        """(the caption's pooled vector (B, Dt), its (token states (B, T, Dt), mask (B, T)) or
        None if neither the caption head nor the label queries read tokens)."""
        txt_enc, k, tokens = self.text_encoder, self.text_input_stage, None
        wants_tokens = (self.text_head_kind == "attention"
                        or (self.fusion_kind == "query" and hasattr(txt_enc, "run_layers")))
        if wants_tokens:
            if k > txt_enc.num_layers:
                raise ValueError("an attention caption head or query fusion needs token "
                                 "states: cache them, not pooled features")
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
        return self._caption_head(*self._embed_caption(ids, lengths))

    def _caption_head(self, txt: torch.Tensor, tokens) -> torch.Tensor:
        """(B, C) logits of the caption's own head from `_embed_caption`'s outputs."""
        return self.text_head(*tokens) if self.text_head_kind == "attention" else self.text_head(txt)

    def forward_all(self, images: torch.Tensor | None, ids: torch.Tensor | None,
                    lengths: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """{'logits': final (B, C)} plus 'fused', 'image', 'text' (B, C) logits with aux heads,
        and 'pooled' with the pooled head."""
        parts, fmap, tokens, qmap, extra = self._embed(images, ids, lengths)
        if self.fusion_kind == "query":
            out = {"fused": self.head(*self._memory(parts, qmap, tokens, extra))}  # (B, C)
        else:
            if self.fusion is not None:
                fused = self.fusion(parts[0], parts[1])  # (B, hidden)
            else:
                fused = torch.cat(parts, dim=1)  # (B, Di + Dt)
            out = {"fused": self.head(fused)}  # (B, C)
        if self.aux_heads != "none":
            img_in = fmap if self.image_head_kind == "attention" else parts[0]
            out["image"] = self.image_head(img_in)  # (B, C)
            out["text"] = self._caption_head(parts[-1], tokens)  # (B, C)
        if self.pooled_mlp is not None:
            out["pooled"] = self.pooled_mlp(torch.cat(parts, dim=1))  # (B, C)
        if self.aux_heads == "ensemble":
            names = ("fused", "image", "text", "pooled")[:len(self.head_weights)]
            out["logits"] = (sum(w * out[k] for w, k in zip(self.head_weights, names, strict=True))
                             / sum(self.head_weights))
        else:
            out["logits"] = out["fused"]
        return out

    def _memory(self, parts, fmap, tokens, extra=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The label queries' memory: per modality (B, N, D) tokens and (B, N) masks. `fmap` is
        the image map they read, `extra` the finer one (see `_embed`)."""
        seqs, masks = [], []
        for m in (fmap, extra):
            if m is not None:
                seqs.append(m.flatten(2).transpose(1, 2))  # (B, H'*W', D): every position is real
                masks.append(torch.ones(seqs[-1].shape[:2], dtype=torch.bool, device=m.device))
        if tokens is not None:
            seqs.append(tokens[0])  # (B, T, Dt) token states, padding masked
            masks.append(tokens[1])
        elif self.text_encoder is not None:
            seqs.append(parts[-1].unsqueeze(1))  # (B, 1, Dt): a pooled caption is one token
            masks.append(torch.ones(seqs[-1].shape[:2], dtype=torch.bool, device=seqs[-1].device))
        return seqs, masks

    def forward(self, images: torch.Tensor | None, ids: torch.Tensor | None,
                lengths: torch.Tensor | None) -> torch.Tensor:
        return self.forward_all(images, ids, lengths)["logits"]  # (B, C) logits
