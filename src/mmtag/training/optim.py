"""The optimizer and the learning-rate schedule of a run, from its `optim` config."""

from __future__ import annotations

import math

import torch
from torch import nn

from mmtag.config import OptimConfig


def lr_factor(o: OptimConfig, world_size: int = 1) -> float:
    """How much optim.lr_scale multiplies the configured learning rates: the global batch
    (batch_size per process x processes) against optim.lr_batch, linearly or by its square root."""
    ratio = o.batch_size * world_size / o.lr_batch
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[o.lr_scale]


def make_optimizer(o: OptimConfig, model: nn.Module, factor: float = 1.0) -> torch.optim.Optimizer:
    """Adam/AdamW; pretrained encoders get `lr * encoder_lr_mult` (fine-tuning pretrained
    weights wants smaller steps than the freshly initialised head); every rate times `factor`
    (`lr_factor`)."""
    encoders = [m for m in (model.image_encoder, model.text_encoder) if m is not None]
    enc_ids = {id(p) for m in encoders for p in m.parameters()}
    enc_params = [p for m in encoders for p in m.parameters() if p.requires_grad]
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in enc_ids]
    if not enc_params and not rest:
        raise ValueError("every parameter is frozen: nothing to train")
    lr = o.lr * factor
    groups = [{"params": rest, "lr": lr}]
    if enc_params:
        groups.append({"params": enc_params, "lr": lr * o.encoder_lr_mult})
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    groups = [g for g in groups if g["params"]]
    try:
        # one fused kernel per step instead of a handful of ops per parameter tensor: the same
        # update (tests/test_optim.py); it pays with many small tensors and on GPUs, while a cpu
        # recipe step is dominated by convolutions (no measurable change there,
        # docs/experiments.md); PyTorch < 2.4 fuses on CUDA only
        return cls(groups, lr=lr, weight_decay=o.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return cls(groups, lr=lr, weight_decay=o.weight_decay)


class LinearWarmup:
    """The learning rates rise linearly over the first `steps` optimizer steps, then are left
    alone (so ReduceLROnPlateau's reductions afterwards stay); stepped once per step."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int):
        self.optimizer, self.steps, self.done = optimizer, max(1, steps), 0
        self.base = [g["lr"] for g in optimizer.param_groups]
        self._apply()

    def _apply(self) -> None:
        if self.done < self.steps:
            for g, base in zip(self.optimizer.param_groups, self.base, strict=True):
                g["lr"] = base * (self.done + 1) / self.steps

    def step(self) -> None:
        self.done += 1
        self._apply()

    @property
    def finished(self) -> bool:
        return self.done >= self.steps

    def state_dict(self) -> dict:
        return {"steps": self.steps, "done": self.done, "base": self.base}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.done, self.base = state["steps"], state["done"], list(state["base"])


def make_warmup(o: OptimConfig, optimizer, steps_per_epoch: int) -> LinearWarmup | None:
    """The warm-up of the plateau and constant schedules (cosine has its own), or None."""
    steps = int(o.warmup_epochs * steps_per_epoch)
    if o.scheduler == "cosine" or steps < 1:
        return None
    return LinearWarmup(optimizer, steps)


def make_scheduler(o: OptimConfig, optimizer, steps_per_epoch: int):
    """ReduceLROnPlateau (stepped once per epoch), cosine with linear warm-up (stepped once per
    optimizer step), or None."""
    if o.scheduler == "plateau":
        mode = "min" if o.plateau_on == "val_loss" else "max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=o.plateau_factor, patience=o.plateau_patience)
    if o.scheduler == "cosine":
        total = max(1, o.epochs * steps_per_epoch)
        warm = int(o.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return None
