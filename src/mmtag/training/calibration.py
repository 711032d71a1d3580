"""Per-class recalibration of a model's probabilities on held-out rows (Platt scaling).

A model trained with BCE is calibrated on average, but not class by class on rows it never saw:
one label's probabilities run a little high, another's a little low. One global threshold, and
the expected-F1 rule (which reads probabilities as true chances), then decide each class on a
slightly different scale. Per-class thresholds fix that but overfit rare classes (they chase
the F1 of a handful of positives); this fits two smooth numbers per class instead, by log-loss:

    p' = sigmoid(exp(a_c) * logit(p) + b_c)

with a penalty `strength * (a_c^2 + b_c^2)` that keeps classes with few positives near the
identity (a = b = 0). Fitted on the validation rows after training (`calibration: per_class`);
the cross-fit figures fit it on one half and score the other, like the thresholds.
"""

from __future__ import annotations

import numpy as np
import torch

_EPS = 1e-6


def logits(probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def fit_calibration(y, probs, strength: float = 10.0) -> dict:
    """Per-class scale and bias for `apply_calibration`, fitted on rows `y` (N, C) 0/1 with
    probabilities `probs` (N, C). Returns {'scale': [C], 'bias': [C]} (plain floats)."""
    y = np.asarray(y, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    if y.shape != probs.shape or y.ndim != 2:
        raise ValueError(f"labels {y.shape} and probabilities {probs.shape} must be the same (N, C)")
    if strength <= 0:
        raise ValueError(f"calibration strength must be > 0, got {strength}")
    z = torch.from_numpy(logits(probs))
    t = torch.from_numpy(y)
    a = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)  # log of the scale
    b = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a, b], max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z * a.exp() + b, t,
                                                                    reduction="sum")
        loss = loss + strength * (a.square().sum() + b.square().sum())
        loss.backward()
        return loss

    opt.step(closure)
    return {"scale": [float(v) for v in a.detach().exp()], "bias": [float(v) for v in b.detach()]}


def apply_calibration(probs, calibration: dict | None) -> np.ndarray:
    """Recalibrated probabilities (N, C); `probs` unchanged when `calibration` is None."""
    probs = np.asarray(probs, dtype=np.float64)
    if calibration is None:
        return probs
    scale = np.asarray(calibration["scale"], dtype=np.float64)
    bias = np.asarray(calibration["bias"], dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(scale) or len(bias) != len(scale):
        raise ValueError(f"calibration for {len(scale)} classes cannot apply to probabilities "
                         f"of shape {probs.shape}")
    return 1.0 / (1.0 + np.exp(-(logits(probs) * scale + bias)))
