"""One epoch of training: the loop body every run repeats.

`train_one_epoch(model, loader, loss_fn, optimizer, options)` knows nothing of run folders,
checkpoints or configs; the evaluation pass is `mmtag.prediction.passes.evaluate`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mmtag.distributed import SINGLE, Dist, all_sum, gather_rows
from mmtag.prediction.passes import batch_to, concat_rows, progress_bar
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
    train_model: nn.Module | None = None  # what runs the forward pass: the model wrapped in
                                       # DistributedDataParallel and/or torch.compile (None: it)
    dist: Dist = SINGLE                # the training processes: epoch figures cover all ranks
    on_first_step: Callable[[], None] | None = None  # called once the first step has finished


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
    probabilities, targets) of the pass, over every rank's rows.

    Nothing waits for the device inside the loop: losses, logits and a divergence flag stay
    on it and come back once, at the end of the epoch (or with a 30-s progress line)."""
    model.train()
    forward = opts.train_model if opts.train_model is not None else model
    # float64 sums, as Python floats were (MPS has no float64)
    total = torch.zeros((), device=opts.device,
                        dtype=torch.float32 if opts.device.type == "mps" else torch.float64)
    # one process on a CPU checks every step (no GPU to wait for), and stops before a bad step
    check_now = opts.device.type == "cpu" and not opts.dist.active
    first_bad = torch.full((), -1, dtype=torch.long, device=opts.device)
    bad_loss = torch.zeros((), device=opts.device)
    logits_seen, targets_seen, count = [], [], 0
    bar = progress_bar(loader, len(loader), opts.desc, opts.progress)
    last_log = time.time()
    for step, batch in enumerate(bar):
        images, ids, lengths, target = batch_to(batch, opts.device, opts.channels_last)
        with autocast(opts.device, opts.dtype):
            out = forward(images, ids, lengths, all_heads=True)
        loss = _objective(out, target, loss_fn, opts.aux_weight)
        newly_bad = ~torch.isfinite(loss.detach()) & (first_bad < 0)
        first_bad = torch.where(newly_bad, step, first_bad)
        bad_loss = torch.where(newly_bad, loss.detach(), bad_loss)
        if check_now and bool(newly_bad):
            break
        _step(model, loss, optimizer, opts)
        if step == 0 and opts.on_first_step is not None:
            loss.item()  # waits for the step: its end is what is timed
            opts.on_first_step()
        logits = out["logits"].detach().float()
        # reported: the final prediction's loss against the labels, what `evaluate` reports for
        # the validation rows (the objective adds the per-modality heads' terms)
        with torch.no_grad():
            total += loss_fn(logits, target) * target.shape[0]
        count += target.shape[0]
        logits_seen.append(logits)
        targets_seen.append(target)
        if time.time() - last_log > (2 if opts.progress else 30):  # the only mid-epoch sync
            _report_progress(bar, opts, step, len(loader), (total / count).item())
            last_log = time.time()
    # every rank learns whether any rank diverged, and all stop together
    sums = all_sum(torch.stack([total, torch.full_like(total, count),
                                (first_bad >= 0).to(total.dtype)]), opts.dist)
    if sums[2].item() > 0:
        step = first_bad.item()
        raise TrainingDivergedError(
            f"the loss became {bad_loss.item()} at {opts.desc} step {step}" if step >= 0
            else f"the loss became infinite or nan in another process during {opts.desc}")
    probs = torch.sigmoid(concat_rows(logits_seen, opts.device))
    targets = concat_rows(targets_seen, opts.device)
    n = len(probs) * opts.dist.world  # every rank ran the same number of rows
    probs, targets = gather_rows(probs, n, opts.dist), gather_rows(targets, n, opts.dist)
    return (sums[0] / sums[1].clamp(min=1)).item(), probs.cpu().numpy(), targets.cpu().numpy()


def _report_progress(bar, opts: StepOptions, step: int, steps: int, loss: float) -> None:
    if opts.progress:
        bar.set_postfix(loss=f"{loss:.4f}")
    else:
        log.info("%s step %d/%d loss %.4f", opts.desc, step + 1, steps, loss)


