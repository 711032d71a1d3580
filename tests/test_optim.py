"""The optimiser: fused Adam/AdamW where PyTorch has it, the same updates as the plain loop."""

import copy

import pytest
import torch
from torch import nn

from mmtag.config import load_config
from mmtag.training.optim import make_optimizer


class _Net(nn.Module):
    """Stands in for a tagger: the optimiser only reads its encoders and parameters."""

    def __init__(self):
        super().__init__()
        self.image_encoder = nn.Linear(6, 5)
        self.text_encoder = None
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(5, 3))

    def forward(self, x):
        return self.head(self.image_encoder(x))


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_fused_optimizer_makes_the_plain_loops_updates(name):
    cfg = load_config(None, [f"optim.name={name}", "optim.lr=1e-2", "optim.weight_decay=0.01",
                             "optim.encoder_lr_mult=0.5"])
    torch.manual_seed(0)
    net = _Net()
    plain_net, start_net = copy.deepcopy(net), copy.deepcopy(net)
    fused = make_optimizer(cfg.optim, net)
    # PyTorch fuses on the CPU from 2.4 on; before, the plain optimizer is the fallback
    cpu_fuses = torch.torch_version.TorchVersion(torch.__version__) >= "2.4"
    assert bool(fused.defaults.get("fused")) is cpu_fuses
    assert [g["lr"] for g in fused.param_groups] == [1e-2, 5e-3]  # head, then the encoder
    cls = type(fused)
    plain = cls([{"params": g["params"], "lr": g["lr"]} for g in (
        {"params": list(plain_net.head.parameters()), "lr": 1e-2},
        {"params": list(plain_net.image_encoder.parameters()), "lr": 5e-3})],
        weight_decay=0.01, foreach=False)
    x, y = torch.randn(16, 6), torch.rand(16, 3)
    for _ in range(5):
        for model, opt in ((net, fused), (plain_net, plain)):
            opt.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
            opt.step()
    for a, b, start in zip(net.parameters(), plain_net.parameters(), start_net.parameters(),
                           strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert (a - start).abs().max() > 1e-3  # every tensor was trained
