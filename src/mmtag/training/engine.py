"""One epoch of training and one pass of evaluation: the loop body every run repeats.

`train_one_epoch(model, loader, loss_fn, optimizer, options)` and `evaluate(model, loader,
loss_fn, device, ...)` know nothing of run folders, checkpoints or configs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mmtag.runtime import autocast

log = logging.getLogger("mmtag.train")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class StepOptions:
    """How `train_one_epoch` steps, besides the model, data, loss and optimizer."""

    device: torch.device
    dtype: torch.dtype | None = None   # autocast dtype (None: full precision)
    scaler: Any = None                 # torch.amp.GradScaler for fp16, else None
    grad_clip: float = 0.0             # max gradient norm; 0: off
    step_scheduler: Any = None         # a scheduler stepped after every optimizer step
    channels_last: bool = False        # image batches in channels_last memory format
    aux_weight: float = 0.0            # weight of the per-modality heads' loss terms
    ema: Any = None                    # mmtag.training.ema.EMA updated after every step
    progress: bool = False             # a tqdm bar (else a log line every 30 s)
    desc: str = "train"                # what the bar and the messages call this pass


def batch_to(batch, device: torch.device, channels_last: bool):
    """A (images, ids, lengths, targets) batch on `device`; lengths stay on the CPU, where
    pack_padded_sequence wants them."""
    images, ids, lengths, targets = batch
    images = images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, ids.to(device, non_blocking=True), lengths, targets.to(device, non_blocking=True)


def progress_bar(iterable, total: int, desc: str, enabled: bool):
    if enabled:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
    return iterable


def _objective(out: dict[str, torch.Tensor], target: torch.Tensor, loss_fn: nn.Module,
               aux_weight: float) -> torch.Tensor:
    """The fused head's loss plus `aux_weight` times each per-modality head's."""
    loss = loss_fn(out["fused"].float(), target)
    if aux_weight > 0 and "image" in out:
        loss = loss + aux_weight * sum(loss_fn(out[k].float(), target) for k in ("image", "text"))
    return loss


def _step(model: nn.Module, loss: torch.Tensor, optimizer, opts: StepOptions) -> None:
    optimizer.zero_grad(set_to_none=True)
    if opts.scaler is not None:
        opts.scaler.scale(loss).backward()
        opts.scaler.unscale_(optimizer)
    else:
        loss.backward()
    if opts.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
    if opts.scaler is not None:
        opts.scaler.step(optimizer)
        opts.scaler.update()
    else:
        optimizer.step()
    if opts.ema is not None:
        opts.ema.update(model)
    if opts.step_scheduler is not None:
        opts.step_scheduler.step()


def train_one_epoch(model: nn.Module, loader, loss_fn: nn.Module, optimizer,
                    opts: StepOptions) -> tuple[float, np.ndarray, np.ndarray]:
    """One pass over `loader`; returns (mean loss of the final logits against the labels,
    probabilities, targets) of the pass."""
    model.train()
    total, count = 0.0, 0
    probs, targets = [], []
    bar = progress_bar(loader, len(loader), opts.desc, opts.progress)
    last_log = time.time()
    for step, batch in enumerate(bar):
        images, ids, lengths, target = batch_to(batch, opts.device, opts.channels_last)
        with autocast(opts.device, opts.dtype):
            out = model.forward_all(images, ids, lengths)
        loss = _objective(out, target, loss_fn, opts.aux_weight)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(f"the loss became {loss.item()} at {opts.desc} step {step}")
        _step(model, loss, optimizer, opts)
        logits = out["logits"].detach().float()
        n = target.shape[0]
        # reported: the final prediction's loss against the labels, what `evaluate` reports for
        # the validation rows (the objective adds the per-modality heads' terms)
        with torch.no_grad():
            total += loss_fn(logits, target).item() * n
        count += n
        probs.append(torch.sigmoid(logits).cpu())
        targets.append(target.cpu())
        if opts.progress:
            bar.set_postfix(loss=f"{total / count:.4f}")
        elif time.time() - last_log > 30:
            log.info("%s step %d/%d loss %.4f", opts.desc, step + 1, len(loader), total / count)
            last_log = time.time()
    return total / max(count, 1), torch.cat(probs).numpy(), torch.cat(targets).numpy()


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


@torch.inference_mode()
def evaluate(model: nn.Module, loader, loss_fn: nn.Module | None, device: torch.device, *,
             dtype: torch.dtype | None = None, channels_last: bool = False, tta: bool = False,
             progress: bool = False, desc: str = "eval") -> tuple[float, np.ndarray, np.ndarray]:
    """(mean loss or nan, probabilities (N, C), targets (N, C)) over `loader`, in order.

    The image encoder runs as its `for_inference` copy (BatchNorm folded into the convs: the same
    outputs up to rounding, a quarter faster on CPU); `model` itself is left as it was."""
    model.eval()
    total, count = 0.0, 0
    probs, targets = [], []
    encoder = getattr(model, "image_encoder", None)
    if encoder is not None:
        model.image_encoder = encoder.for_inference(channels_last=channels_last)
    try:
        for batch in progress_bar(loader, len(loader), desc, progress):
            images, ids, lengths, target = batch_to(batch, device, channels_last)
            with autocast(device, dtype):
                logits = flip_tta_logits(model, images, ids, lengths, tta)
            if loss_fn is not None:
                total += loss_fn(logits, target).item() * target.shape[0]
            count += target.shape[0]
            probs.append(torch.sigmoid(logits).cpu())
            targets.append(target.cpu())
    finally:
        if encoder is not None:
            model.image_encoder = encoder
    loss = total / max(count, 1) if loss_fn is not None else float("nan")
    return loss, torch.cat(probs).numpy(), torch.cat(targets).numpy()
