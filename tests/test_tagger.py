import pytest
import torch
from torch import nn

from mmtag.models.tagger import Tagger


class _Img(nn.Module):
    """Stand-in image encoder with the ImageEncoder interface (stages + pool)."""

    out_dim, num_stages = 6, 2

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 1)])

    def run_stages(self, x, start=0, end=None):
        for s in self.stages[start:end]:
            x = s(x)
        return x

    def pool(self, f):
        return f.mean((2, 3))


class _Txt(nn.Module):
    out_dim = 5

    def __init__(self):
        super().__init__()
        self.emb = nn.EmbeddingBag(10, 5)

    def forward(self, ids, lengths):
        return self.emb(ids)


def _inputs(b=4):
    return torch.randn(b, 3, 8, 8), torch.randint(0, 10, (b, 7)), torch.full((b,), 7)


@pytest.mark.parametrize("fusion", ["concat", "gated"])
@pytest.mark.parametrize("aux", ["none", "loss", "ensemble"])
def test_logit_shapes_for_every_fusion(fusion, aux):
    torch.manual_seed(0)
    model = Tagger(_Img(), _Txt(), num_classes=3, hidden=8, fusion=fusion, aux_heads=aux).eval()
    out = model.forward_all(*_inputs())
    assert out["logits"].shape == (4, 3)
    if aux == "ensemble":
        torch.testing.assert_close(out["logits"], (out["fused"] + out["image"] + out["text"]) / 3)
    elif aux == "loss":
        torch.testing.assert_close(out["logits"], out["fused"])
        assert out["image"].shape == out["text"].shape == (4, 3)


def test_single_modality_models_and_cached_inputs():
    torch.manual_seed(0)
    images, ids, lengths = _inputs()
    assert Tagger(_Img(), None, 3).eval()(images, None, None).shape == (4, 3)
    assert Tagger(None, _Txt(), 3).eval()(None, ids, lengths).shape == (4, 3)
    with pytest.raises(ValueError, match="needs an image encoder"):
        Tagger(None, None, 3)
    # cached activations of stage 0 give the same logits as raw images
    model = Tagger(_Img(), _Txt(), 3, hidden=8).eval()
    raw = model(images, ids, lengths)
    model.image_input_stage = 1
    torch.testing.assert_close(model(model.image_encoder.run_stages(images, 0, 1), ids, lengths), raw)
    model.image_input_stage = 3  # pooled
    pooled = model.image_encoder.pool(model.image_encoder.run_stages(images))
    torch.testing.assert_close(model(pooled, ids, lengths), raw)
