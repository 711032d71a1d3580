import pytest
import torch
from torch import nn

from mmtag.training.ema import EMA


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    m[0].requires_grad_(False)  # frozen: not tracked
    return m


def test_update_is_a_moving_average_with_warmup():
    m = _model()
    ema = EMA(m, decay=0.5)
    assert "0.weight" not in ema.shadow and "2.weight" in ema.shadow and "1.running_mean" in ema.shadow
    w0 = m[2].weight.detach().clone()
    with torch.no_grad():
        m[2].weight.add_(1.0)
    ema.update(m)  # step 1: decay = min(0.5, 2 / 11)
    d = 2 / 11
    torch.testing.assert_close(ema.shadow["2.weight"], d * w0 + (1 - d) * (w0 + 1))
    for _ in range(20):
        ema.update(m)  # decay 0.5 from step 9 on: converges to the current weights
    torch.testing.assert_close(ema.shadow["2.weight"], w0 + 1, atol=1e-4, rtol=0)


def test_applied_swaps_weights_in_and_restores_them():
    m = _model()
    ema = EMA(m, decay=0.9)
    ema.shadow["2.weight"].fill_(7.0)
    before = m[2].weight.detach().clone()
    with ema.applied(m):
        assert torch.all(m[2].weight == 7.0)
    torch.testing.assert_close(m[2].weight, before)


def test_state_round_trip_and_mismatch():
    m = _model()
    ema = EMA(m, decay=0.9)
    ema.update(m)
    other = EMA(_model(), decay=0.1)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9 and other.steps == 1
    with pytest.raises(ValueError, match="does not match"):
        EMA(nn.Linear(3, 2), 0.9).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="decay"):
        EMA(m, 1.0)
