"""One pass of a model over a loader: the probabilities every evaluation, prediction and
export computes, with flip TTA. Training, distillation, prediction and export all call it;
it knows nothing of run folders, checkpoints or configs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mmtag.distributed import SINGLE, Dist, gather_rows
from mmtag.progress import progress
from mmtag.runtime import autocast


def batch_to(batch, device: torch.device, channels_last: bool):
    """A (images, ids, lengths, targets) batch on `device`; lengths stay on the CPU, where
    pack_padded_sequence wants them."""
    images, ids, lengths, targets = batch
    images = images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, ids.to(device, non_blocking=True), lengths, targets.to(device, non_blocking=True)


def progress_bar(iterable, total: int, desc: str, enabled: bool | None):
    """A bar when `enabled` (None: on a terminal), else a log line every 30 s."""
    return progress(iterable, total, desc, bar=enabled)


def concat_rows(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The epoch's (B, C) batches as one (N, C) tensor (an empty pass: (0, 0))."""
    return torch.cat(parts) if parts else torch.zeros(0, 0, device=device)


def flip_tta_logits(model: nn.Module, images, ids, lengths, tta: bool) -> torch.Tensor:
    """Model logits; with `tta`, the mean over the image and its mirror image (raw images are
    flipped here; cached features arrive as (B, V, ...) views)."""
    if not tta or getattr(model, "image_encoder", None) is None:
        return model(images, ids, lengths).float()
    if model.image_input_stage > 0:
        views = [images[:, v] for v in range(images.shape[1])]
    else:
        views = [images, images.flip(-1)]
    return torch.stack([model(v, ids, lengths).float() for v in views]).mean(0)


@dataclass(frozen=True)
class EvalPass:
    """How an evaluation pass runs its model."""

    dtype: torch.dtype | None = None  # autocast to it (None: float32)
    channels_last: bool = False
    tta: bool = False                 # flip TTA: the mean with the mirror image's logits
    progress: bool | None = False     # a bar named `desc` (None: on a terminal), else log lines
    desc: str = "eval"
    dist: Dist = SINGLE               # under torchrun: the loader holds this rank's shard
    rows: int | None = None           # ... of this many rows in all


@torch.inference_mode()
def evaluate(model: nn.Module, loader, loss_fn: nn.Module | None, device: torch.device,
             how: EvalPass = EvalPass()) -> tuple[float, np.ndarray, np.ndarray]:
    """(mean loss or nan, probabilities (N, C), targets (N, C)) over `loader`, in order.

    Under torchrun each rank's `loader` holds its `shard_indices(how.rows, ..., equal='pad')`
    rows, and every rank gets all `how.rows` rows back. The image encoder runs as its
    `for_inference` copy (BatchNorm folded into the convs: the same outputs up to rounding, a
    quarter faster on CPU); `model` itself is left as it was. The logits stay on the device
    until the pass ends."""
    model.eval()
    logits_seen, targets_seen = [], []
    encoder = getattr(model, "image_encoder", None)
    if encoder is not None:
        model.image_encoder = encoder.for_inference(channels_last=how.channels_last)
    try:
        for batch in progress_bar(loader, len(loader), how.desc, how.progress):
            images, ids, lengths, target = batch_to(batch, device, how.channels_last)
            with autocast(device, how.dtype):
                logits_seen.append(flip_tta_logits(model, images, ids, lengths, how.tta))
            targets_seen.append(target)
    finally:
        if encoder is not None:
            model.image_encoder = encoder
    logits, targets = concat_rows(logits_seen, device), concat_rows(targets_seen, device)
    n = how.rows if how.rows is not None else len(logits)
    logits, targets = gather_rows(logits, n, how.dist), gather_rows(targets, n, how.dist)
    loss = (loss_fn(logits, targets).item() if loss_fn is not None and n
            else float("nan"))
    return loss, torch.sigmoid(logits).cpu().numpy(), targets.cpu().numpy()
