import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmtag.training.losses import (
    AsymmetricLoss,
    BCELoss,
    FocalLoss,
    build_loss,
    pos_weight_from_targets,
)

# A 2 x 3 example; the per-element values below were worked out from the formulas.
LOGITS = [[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]]
TARGETS = [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _tensors():
    return torch.tensor(LOGITS), torch.tensor(TARGETS)


def _naive_bce(pos_weight=(1.0, 1.0, 1.0)) -> float:
    """Plain-Python BCE from probabilities, mean over the 6 elements."""
    total = 0.0
    for xr, yr in zip(LOGITS, TARGETS, strict=True):
        for x, y, w in zip(xr, yr, pos_weight, strict=True):
            p = _sig(x)
            total += -w * math.log(p) if y else -math.log(1 - p)
    return total / 6


def test_bce_matches_hand_values():
    x, y = _tensors()
    # -log(sigmoid(2)), -log(1-sigmoid(-1)), -log(1-sigmoid(.5)), -log(1-sigmoid(-3)),
    # log 2, -log(sigmoid(4))
    by_hand = (0.126928 + 0.313262 + 0.974077 + 0.048587 + 0.693147 + 0.018150) / 6
    torch.testing.assert_close(BCELoss()(x, y), torch.tensor(by_hand), atol=2e-6, rtol=0)
    torch.testing.assert_close(BCELoss()(x, y), torch.tensor(_naive_bce()), atol=1e-6, rtol=1e-6)


def test_bce_pos_weight_scales_positive_terms_only():
    x, y = _tensors()
    w = [2.0, 0.5, 3.0]
    got = BCELoss(pos_weight=torch.tensor(w))(x, y)
    torch.testing.assert_close(got, torch.tensor(_naive_bce(w)), atol=1e-6, rtol=1e-6)
    assert "pos_weight" not in BCELoss(pos_weight=w).state_dict()
    with pytest.raises(ValueError, match="4 entries but the logits have 3 classes"):
        BCELoss(pos_weight=[1.0] * 4)(x, y)


def test_focal_matches_hand_values():
    x, y = _tensors()
    total = 0.0
    for xr, yr in zip(LOGITS, TARGETS, strict=True):
        for xv, yv in zip(xr, yr, strict=True):
            p = _sig(xv)
            if yv:
                total += -0.25 * (1 - p) ** 2 * math.log(p)
            else:
                total += -0.75 * p**2 * math.log(1 - p)
    torch.testing.assert_close(FocalLoss()(x, y), torch.tensor(total / 6), atol=1e-7, rtol=1e-6)
    by_hand = (0.000451 + 0.016994 + 0.283059 + 0.000082 + 0.043322 + 0.000001) / 6
    torch.testing.assert_close(FocalLoss()(x, y), torch.tensor(by_hand), atol=2e-6, rtol=0)


def test_focal_without_focusing_or_alpha_is_bce():
    x = torch.randn(5, 7) * 4
    y = (torch.rand(5, 7) > 0.5).float()
    torch.testing.assert_close(FocalLoss(alpha=None, gamma=0.0)(x, y), BCELoss()(x, y))
    torch.testing.assert_close(FocalLoss(alpha=-1, gamma=0.0)(x, y), BCELoss()(x, y))
    # alpha = 0.5 halves every term.
    torch.testing.assert_close(FocalLoss(alpha=0.5, gamma=0.0)(x, y), BCELoss()(x, y) / 2)


def test_asl_matches_hand_values():
    x, y = _tensors()
    per_image_sum = 0.0
    for xr, yr in zip(LOGITS, TARGETS, strict=True):
        for xv, yv in zip(xr, yr, strict=True):
            p = _sig(xv)
            if yv:  # gamma_pos = 0
                per_image_sum += -math.log(p)
            else:  # shifted probability, gamma_neg = 4
                pm = max(p - 0.05, 0.0)
                per_image_sum += -(pm**4) * math.log(1 - pm)
    want = per_image_sum / 2  # sum over classes, mean over the 2 images
    got = AsymmetricLoss()(x, y)
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-6, rtol=1e-6)
    by_hand = (0.12692801 + 0.0005678 + 0.091253 + 0.0 + 0.69314718 + 0.01814993) / 2
    torch.testing.assert_close(got, torch.tensor(by_hand), atol=2e-6, rtol=0)


def test_asl_without_focusing_is_clipped_bce():
    x = torch.randn(4, 5) * 3
    y = (torch.rand(4, 5) > 0.5).float()
    p = torch.sigmoid(x.double())
    clipped = -(y * torch.log(p) + (1 - y) * torch.log(1 - (p - 0.1).clamp(min=0)))
    got = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0.1)(x, y)
    torch.testing.assert_close(got, (clipped.sum() / 4).float(), atol=1e-5, rtol=1e-5)
    # No clip either: C times the element-mean BCE.
    plain = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)(x, y)
    torch.testing.assert_close(plain, 5 * F.binary_cross_entropy_with_logits(x, y))
    # Easy negatives (p < clip) contribute exactly nothing.
    easy = AsymmetricLoss(clip=0.05)(torch.full((2, 3), -5.0), torch.zeros(2, 3))
    assert easy.item() == 0.0


@pytest.mark.parametrize(
    "loss",
    [BCELoss(), BCELoss(pos_weight=[5.0, 0.3]), FocalLoss(), FocalLoss(alpha=None, gamma=0.5),
     AsymmetricLoss(), AsymmetricLoss(clip=0), AsymmetricLoss(gamma_neg=0.5, gamma_pos=0.5)],
)
def test_extreme_logits_give_finite_loss_and_gradients(loss):
    x = torch.tensor([[100.0, -100.0], [-100.0, 100.0], [0.0, 30.0]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    value = loss(x, y)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(x.grad).all()
    # The very wrong rows are penalised (about 100 per wrong element), the right ones are not.
    assert value.item() > 1.0


def test_half_precision_inputs_are_computed_in_float32():
    x32 = torch.randn(6, 4) * 5
    y = (torch.rand(6, 4) > 0.5).float()
    x16 = x32.to(torch.bfloat16)
    for loss in (BCELoss(), FocalLoss(), AsymmetricLoss()):
        got = loss(x16, y.to(torch.bfloat16))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, loss(x16.float(), y))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert loss(x32, y).dtype == torch.float32


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="does not match logits shape"):
        BCELoss()(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"must be \(B, C\)"):
        FocalLoss()(torch.zeros(3), torch.zeros(3))


def test_build_loss_names_and_errors():
    from mmtag.config import ConfigError, LossConfig

    assert isinstance(build_loss(LossConfig("bce")), BCELoss)
    assert isinstance(build_loss(LossConfig("bce"), [1.0, 2.0]).pos_weight, torch.Tensor)
    focal = build_loss(LossConfig("focal", alpha=-1.0, gamma=1.0))  # a negative alpha: off
    assert isinstance(focal, FocalLoss) and focal.alpha is None and focal.gamma == 1.0
    asl = build_loss(LossConfig("asl", gamma_neg=2, gamma_pos=1, clip=0.1))
    assert isinstance(asl, AsymmetricLoss)
    assert (asl.gamma_neg, asl.gamma_pos, asl.clip) == (2.0, 1.0, 0.1)
    with pytest.raises(ConfigError, match=r"loss.name must be one of \['asl', 'bce', 'focal'\]"):
        LossConfig("foo")
    with pytest.raises(ValueError, match="pos_weight only applies"):
        build_loss(LossConfig("focal"), [1.0])
    with pytest.raises(ConfigError, match="clip"):
        LossConfig("asl", clip=1.5)


def test_pos_weight_from_targets():
    # 8 images: class 0 on 6, class 1 on 1, class 2 on none.
    t = np.zeros((8, 3), dtype=np.float32)
    t[:6, 0] = 1
    t[0, 1] = 1
    w = pos_weight_from_targets(t, max_weight=5.0)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([2 / 6, 5.0, 5.0]))  # 7/1 clipped to 5
    torch.testing.assert_close(pos_weight_from_targets(torch.from_numpy(t), max_weight=10.0),
                               torch.tensor([2 / 6, 7.0, 10.0]))
