"""Checkpoints: atomic writes, the `best` (inference) and `last` (resume) files, model size.

`best.pt` holds only plain data and tensors (config, label map, caption encoder, weights,
thresholds) so it loads with `torch.load(..., weights_only=True)` and predict needs nothing else.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

FORMAT_VERSION = 1


class ModelTooLargeError(ValueError):
    """The saved inference model would exceed the configured size limit."""


def atomic_save(obj, path: Path | str) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash mid-write never
    leaves a truncated checkpoint behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def inference_state_dict(model: nn.Module, fp16: bool = False) -> dict[str, torch.Tensor]:
    """Weights and buffers on the CPU; floating tensors in fp16 when `fp16`."""
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        if fp16 and v.is_floating_point():
            v = v.half()
        sd[k] = v.clone()
    return sd


def state_dict_megabytes(model: nn.Module, fp16: bool = False) -> float:
    """Size of the weights as stored in `best.pt` (MB = 10^6 bytes)."""
    total = 0
    for v in model.state_dict().values():
        size = 2 if fp16 and v.is_floating_point() else v.element_size()
        total += v.numel() * size
    return total / 1e6


def check_model_size(model: nn.Module, limit_mb: float, fp16: bool) -> float:
    """Refuse up front a configuration whose saved model would exceed `limit_mb`."""
    mb = state_dict_megabytes(model, fp16)
    if mb > limit_mb:
        hint = "" if fp16 else f" (fp16 storage would make it {state_dict_megabytes(model, True):.1f} MB: set model.fp16_storage=true)"
        raise ModelTooLargeError(
            f"the saved model would be {mb:.1f} MB, over the {limit_mb:g} MB limit"
            f"{hint}; choose smaller encoders, a smaller model.hidden, or raise model.max_size_mb")
    return mb


def load_checkpoint(path: Path | str) -> dict:
    """Load a checkpoint written by mmtag (plain data + tensors only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not an mmtag checkpoint of format {FORMAT_VERSION}")
    return ckpt
