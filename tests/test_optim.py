"""The optimiser: fused Adam/AdamW where PyTorch has it, the same updates as the plain loop."""

import copy

import pytest
import torch
from torch import nn

from mmtag.config import load_config
from mmtag.training.optim import lr_factor, make_optimizer, make_scheduler, make_warmup


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


@pytest.mark.parametrize(("scale", "world", "want"), [
    ("none", 4, 1.0), ("linear", 1, 4.0), ("linear", 2, 8.0), ("sqrt", 1, 2.0), ("sqrt", 4, 4.0)])
def test_lr_scaling_follows_the_global_batch(scale, world, want):
    o = load_config(None, ["optim.batch_size=256", "optim.lr_batch=64", f"optim.lr_scale={scale}",
                           "optim.lr=1e-3", "optim.encoder_lr_mult=0.1"]).optim
    assert lr_factor(o, world) == pytest.approx(want)
    opt = make_optimizer(o, _Net(), lr_factor(o, world))
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([1e-4 * want, 1e-3 * want])


def test_plateau_warmup_rises_then_leaves_the_rate_to_the_plateau():
    o = load_config(None, ["optim.scheduler=plateau", "optim.warmup_epochs=1", "optim.lr=1e-2",
                           "optim.plateau_patience=0"]).optim
    opt = make_optimizer(o, _Net())
    warm = make_warmup(o, opt, steps_per_epoch=4)
    seen = [opt.param_groups[0]["lr"]]
    for _ in range(5):
        warm.step()
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])
    assert warm.finished
    plateau = make_scheduler(o, opt, 4)
    plateau.step(1.0)
    plateau.step(2.0)  # worse: halved, and the warm-up no longer touches it
    warm.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)
    again = make_warmup(o, make_optimizer(o, _Net()), 4)
    again.load_state_dict(warm.state_dict())
    assert again.finished and again.base == warm.base


def test_cosine_keeps_its_own_warmup():
    o = load_config(None, ["optim.scheduler=cosine", "optim.warmup_epochs=1"]).optim
    assert make_warmup(o, make_optimizer(o, _Net()), 4) is None


@pytest.mark.parametrize("bad", ["optim.lr_scale=cubic", "optim.lr_batch=0", "data.pipeline=gpu"])
def test_new_speed_options_are_checked(bad):
    from mmtag.config import ConfigError

    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load_config(None, [bad])
