import pytest
import torch
from torch import nn

from mmtag.models.tagger import ClassAttentionHead, Tagger, TokenAttentionHead


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


def test_class_attention_head_pools_mean_plus_attention():
    torch.manual_seed(0)
    head = ClassAttentionHead(6, 3, lam=0.0, temperature=1.0, dropout=0.0).eval()
    fmap = torch.randn(2, 6, 4, 4)
    # lam = 0: the mean of the score map = the linear classifier on the average-pooled map
    pooled = head.norm(fmap).mean((2, 3))
    expect = pooled @ head.score.weight.view(3, 6).T + head.score.bias
    torch.testing.assert_close(head(fmap), expect)
    # a very large temperature turns the attention term into max pooling of the score map
    head.lam, head.temperature = 1.0, 1e4
    s = head.score(head.norm(fmap)).flatten(2)
    torch.testing.assert_close(head(fmap), s.mean(2) + s.amax(2))


def test_class_attention_head_keeps_a_small_object_that_averaging_dilutes():
    head = ClassAttentionHead(1, 1, lam=1.0, temperature=5.0, dropout=0.0).eval()
    with torch.no_grad():
        head.score.weight.fill_(1.0)
        head.score.bias.zero_()
    small = torch.zeros(1, 1, 9, 9)
    small[0, 0, 4, 4] = 1.0  # one cell of 81 lights up
    avg = head.score(head.norm(small)).mean()
    assert head(small).item() > avg.item() + 0.5  # the attention term keeps the lit cell's score


def test_attention_image_head_in_a_tagger():
    torch.manual_seed(0)
    images, ids, lengths = _inputs()
    model = Tagger(_Img(), _Txt(), 3, hidden=8, aux_heads="ensemble", image_head="attention").eval()
    out = model.forward_all(images, ids, lengths)
    torch.testing.assert_close(out["image"], model.image_head(model.image_encoder.run_stages(images)))
    model.image_input_stage = 1  # cached stage-0 activations: same logits
    torch.testing.assert_close(model(model.image_encoder.run_stages(images, 0, 1), ids, lengths),
                               out["logits"])
    model.image_input_stage = 3  # pooled features have no map to attend over
    with pytest.raises(ValueError, match="needs the feature map"):
        model(torch.randn(4, 6), ids, lengths)
    with pytest.raises(ValueError, match="unknown image_head"):
        Tagger(_Img(), _Txt(), 3, aux_heads="ensemble", image_head="max")


@pytest.mark.parametrize("aux,image_head", [("none", "linear"), ("ensemble", "linear"),
                                            ("ensemble", "attention")])
def test_avgmax_image_pool_feeds_average_and_maximum(aux, image_head):
    torch.manual_seed(0)
    images, ids, lengths = _inputs()
    model = Tagger(_Img(), _Txt(), 3, hidden=8, aux_heads=aux, image_head=image_head,
                   image_pool="avgmax").eval()
    assert model(images, ids, lengths).shape == (4, 3)
    assert model.head[0].num_features == 2 * 6 + 5  # [average, maximum] of 6 channels + caption
    fmap = model.image_encoder.run_stages(images)
    parts = model.embed(images, ids, lengths)
    torch.testing.assert_close(parts[0], torch.cat([fmap.mean((2, 3)), fmap.amax((2, 3))], 1))
    # the maximum sees a one-cell object that the average of an 8x8 map dilutes 64 times
    spot = torch.zeros(1, 6, 8, 8)
    spot[0, :, 3, 5] = 1.0
    model.image_input_stage = 2
    assert model.embed(spot, ids[:1], lengths[:1])[0][0, 6:].min().item() == 1.0
    model.image_input_stage = 3  # pooled cached features have no maximum
    with pytest.raises(ValueError, match="needs the feature map"):
        model(torch.randn(4, 12), ids, lengths)
    with pytest.raises(ValueError, match="unknown image_pool"):
        Tagger(_Img(), _Txt(), 3, image_pool="gem")


def test_plan_cache_keeps_the_map_for_max_pooling():
    from types import SimpleNamespace

    from mmtag.config import load_config
    from mmtag.training.cached import plan_cache

    cfg = load_config(None, ["model.text_encoder=none", "model.freeze_image=all"])
    enc = SimpleNamespace(frozen_stages=2, num_stages=2)
    model = SimpleNamespace(image_encoder=enc, text_encoder=None, image_head_kind="linear",
                            image_pool="avg")
    assert plan_cache(cfg, model) == (3, 0)  # pooled features
    model.image_pool = "avgmax"
    assert plan_cache(cfg, model) == (2, 0)  # the last feature map


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_class_attention_head_is_finite_under_autocast(dtype):
    torch.manual_seed(0)
    head = ClassAttentionHead(8, 3, lam=1.0, temperature=1e4, dropout=0.0).eval()
    fmap = torch.randn(2, 8, 5, 5) * 50
    with torch.autocast("cpu", dtype=dtype):
        out = head(fmap)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, head(fmap), rtol=0.05, atol=0.5)


def test_token_attention_head_reads_only_real_tokens():
    torch.manual_seed(0)
    head = TokenAttentionHead(8, 3, lam=0.5, temperature=1.0, dropout=0.0).eval()
    tokens = torch.randn(2, 5, 8)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    out = head(tokens, mask)
    padded = tokens.clone()
    padded[0, 3:] = 100.0  # whatever sits in the padding must not matter
    torch.testing.assert_close(head(padded, mask), out)
    # lam = 0: the mean of the per-token scores over the real tokens only
    head.lam = 0.0
    scores = head.score(tokens[0, :3])  # (3, C)
    torch.testing.assert_close(head(tokens, mask)[0], scores.mean(0))
    # the attention-weighted sum favours high-scoring tokens, so it is never below the mean
    head.lam = 0.5
    mean = torch.stack([head.score(tokens[0, :3]).mean(0), head.score(tokens[1]).mean(0)])
    assert (head(tokens, mask) >= 1.5 * mean - 1e-5).all()
