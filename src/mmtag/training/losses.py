"""Multi-label losses on logits: BCE, sigmoid focal loss and asymmetric loss (ASL).

Every loss takes logits `(B, C)` and float targets `(B, C)` in {0, 1} and returns a scalar.
All arithmetic happens in float32 whatever the input dtype, so the losses are safe under
bf16 / fp16 autocast, and every log-probability is a `logsigmoid` rather than `log(sigmoid(x))`,
so logits of +-100 (or more) give finite values and finite gradients.

Reductions (they differ on purpose; the losses are not meant to be compared by value):

- `BCELoss`, `FocalLoss`: mean over all B * C elements (PyTorch's default).
- `AsymmetricLoss`: sum over the C classes, mean over the B images. This is the per-image
  sum of Ridnik et al. (2021), divided by the batch size so the gradient scale does not grow
  with the batch. Its value is therefore about C times that of a per-element mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmtag.config import LossConfig

LOSS_NAMES = ("asl", "bce", "focal")


def _as_float32(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and upcast: the losses are computed in float32 even under autocast."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, C), got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match logits shape {tuple(logits.shape)}"
        )
    return logits.float(), targets.to(device=logits.device, dtype=torch.float32)


class BCELoss(nn.Module):
    """Binary cross-entropy on logits, mean over all elements.

    `pos_weight` (C,) multiplies the loss of the positive targets of each class (see
    `pos_weight_from_targets`); it is a non-persistent buffer, so it follows `.to(device)` but
    is not written into `state_dict`.
    """

    def __init__(self, pos_weight: torch.Tensor | Sequence[float] | None = None) -> None:
        super().__init__()
        if pos_weight is not None:
            pos_weight = torch.as_tensor(pos_weight, dtype=torch.float32).detach().clone()
            if pos_weight.ndim != 1:
                raise ValueError(f"pos_weight must be 1-D (C,), got shape {tuple(pos_weight.shape)}")
            if not bool(torch.isfinite(pos_weight).all()) or bool((pos_weight < 0).any()):
                raise ValueError("pos_weight must be finite and non-negative")
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x, y = _as_float32(logits, targets)  # (B, C)
        pos_weight = self.pos_weight
        if pos_weight is not None:
            if pos_weight.numel() != x.shape[1]:
                raise ValueError(
                    f"pos_weight has {pos_weight.numel()} entries but the logits have {x.shape[1]} classes"
                )
            pos_weight = pos_weight.to(x.device)
        return F.binary_cross_entropy_with_logits(x, y, pos_weight=pos_weight, reduction="mean")


class FocalLoss(nn.Module):
    """Sigmoid focal loss (Lin et al. 2017), mean over all elements.

    loss = -a_t * (1 - p_t) ** gamma * log(p_t), with p_t = p for positives and 1 - p for
    negatives, a_t = alpha for positives and 1 - alpha for negatives. `alpha=None` (or a negative
    alpha) turns the class weighting off; `gamma=0` with no alpha is plain BCE.
    """

    def __init__(self, alpha: float | None = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        if alpha is not None and alpha < 0:
            alpha = None
        if alpha is not None and alpha > 1:
            raise ValueError(f"alpha must be in [0, 1] (or None / negative to disable), got {alpha}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.alpha = alpha
        self.gamma = float(gamma)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x, y = _as_float32(logits, targets)  # (B, C)
        ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")  # -log(p_t)
        # (1 - p_t) ** gamma as exp(gamma * log(1 - p_t)): smooth even where 1 - p_t underflows to 0.
        log_1m_pt = y * F.logsigmoid(-x) + (1.0 - y) * F.logsigmoid(x)
        loss = torch.exp(self.gamma * log_1m_pt) * ce
        if self.alpha is not None:
            loss = (self.alpha * y + (1.0 - self.alpha) * (1.0 - y)) * loss
        return loss.mean()

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}"


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (Ridnik et al. 2021): sum over classes, mean over images.

    For a positive: -(1 - p) ** gamma_pos * log(p).
    For a negative: -p_m ** gamma_neg * log(1 - p_m), with the shifted probability
    p_m = max(p - clip, 0): easy negatives (p < clip) contribute nothing, and likely mislabelled
    negatives (p near 1) are down-weighted by the large gamma_neg.

    `clip=0` (or None) turns the shift off. `eps` floors p_m inside the focusing weight so its
    gradient stays finite when p_m = 0. Unlike the authors' code, log(p) is a `logsigmoid`
    (not clamped at eps), so very wrong positives keep a gradient, and the focusing weight is
    not detached.
    """

    def __init__(
        self,
        gamma_neg: float = 4.0,
        gamma_pos: float = 0.0,
        clip: float | None = 0.05,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        clip = 0.0 if clip is None else float(clip)
        if gamma_neg < 0 or gamma_pos < 0:
            raise ValueError(f"gamma_neg and gamma_pos must be >= 0, got {gamma_neg}, {gamma_pos}")
        if not 0.0 <= clip < 1.0:
            raise ValueError(f"clip must be in [0, 1), got {clip}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.gamma_neg = float(gamma_neg)
        self.gamma_pos = float(gamma_pos)
        self.clip = clip
        self.eps = float(eps)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x, y = _as_float32(logits, targets)  # (B, C)
        log_p = F.logsigmoid(x)
        loss_pos = torch.exp(self.gamma_pos * F.logsigmoid(-x)) * log_p
        if self.clip > 0:
            p_m = (torch.sigmoid(x) - self.clip).clamp(min=0.0)
            # 1 - p_m = min(1 - p + clip, 1); 1 - p taken as sigmoid(-x) to keep its precision.
            log_1m_pm = torch.log((torch.sigmoid(-x) + self.clip).clamp(max=1.0))
            focus_neg = p_m.clamp(min=self.eps).pow(self.gamma_neg)
        else:
            log_1m_pm = F.logsigmoid(-x)
            focus_neg = torch.exp(self.gamma_neg * log_p)
        loss_neg = focus_neg * log_1m_pm
        loss = -(y * loss_pos + (1.0 - y) * loss_neg)  # (B, C)
        return loss.sum() / x.shape[0]

    def extra_repr(self) -> str:
        return f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, eps={self.eps}"


def pos_weight_from_targets(
    targets: torch.Tensor | np.ndarray, max_weight: float = 50.0
) -> torch.Tensor:
    """Per-class BCE `pos_weight` = negatives / positives over the rows of `targets` (N, C).

    Clipped to `max_weight` so labels on a handful of images do not dominate the loss; a class
    with no positives gets `max_weight`. Common labels get weights below 1 (e.g. a label on 76%
    of images gets 0.32). Returns a float32 tensor (C,) on the CPU.
    """
    t = targets if torch.is_tensor(targets) else torch.as_tensor(np.asarray(targets))
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"targets must be (N, C) with N > 0, got shape {tuple(t.shape)}")
    if max_weight <= 0:
        raise ValueError(f"max_weight must be > 0, got {max_weight}")
    t = t.detach().to(device="cpu", dtype=torch.float64)
    pos = t.sum(dim=0)
    neg = t.shape[0] - pos
    ratio = torch.where(pos > 0, neg / pos.clamp(min=1.0), torch.full_like(pos, float(max_weight)))
    return ratio.clamp(max=float(max_weight)).float()


def build_loss(lc: LossConfig, pos_weight: torch.Tensor | Sequence[float] | None = None
               ) -> nn.Module:
    """The loss `lc.name` ('asl', 'bce' or 'focal') with its settings in `lc`: `alpha` and
    `gamma` for 'focal'; `gamma_neg`, `gamma_pos` and `clip` for 'asl'. `pos_weight` (per
    class) applies to 'bce' only: with another loss it is an error rather than ignored."""
    name = lc.name
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSS_NAMES)}")
    if pos_weight is not None and name != "bce":
        raise ValueError(f"pos_weight only applies to the 'bce' loss, not {name!r}; drop it or use 'bce'")
    if name == "bce":
        return BCELoss(pos_weight=pos_weight)
    if name == "focal":
        return FocalLoss(alpha=lc.alpha, gamma=lc.gamma)
    return AsymmetricLoss(gamma_neg=lc.gamma_neg, gamma_pos=lc.gamma_pos, clip=lc.clip)
