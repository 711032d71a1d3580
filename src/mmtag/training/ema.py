"""Exponential moving average (EMA) of a model's trainable weights.

The averaged weights are what gets validated and saved: they sit near the centre of the region
the optimiser wanders in at the end of training, which usually generalises a little better than
the last step's weights. Trainable parameters and floating-point buffers (BatchNorm running
statistics) are averaged; frozen parameters never change, so they are not copied.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    """`decay` per optimiser step, with a warm-up (decay_t = min(decay, (1 + t) / (10 + t))) so the
    first steps' random-ish weights are forgotten quickly."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.steps = 0
        self.shadow = {name: t.detach().clone() for name, t in self._tracked(model)}

    @staticmethod
    def _tracked(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in model.named_parameters():
            if p.requires_grad:
                yield name, p
        for name, b in model.named_buffers():
            if b.is_floating_point():
                yield name, b

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        names, live = zip(*self._tracked(model), strict=True) if self.shadow else ((), ())
        # one fused kernel per dtype and device instead of one per tensor: a GPU recipe's model
        # has hundreds of tensors, and their launches cost more than the arithmetic
        torch._foreach_lerp_([self.shadow[n] for n in names], [t.detach() for t in live], 1.0 - d)

    @contextmanager
    def applied(self, model: nn.Module):
        """Temporarily put the averaged weights into `model` (restored on exit)."""
        backup = {}
        with torch.no_grad():
            for name, t in self._tracked(model):
                backup[name] = t.detach().clone()
                t.copy_(self.shadow[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, t in self._tracked(model):
                    t.copy_(backup[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "steps": self.steps, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.steps = state["decay"], state["steps"]
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        for name, t in state["shadow"].items():
            self.shadow[name].copy_(t)
