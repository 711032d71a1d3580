import pytest
import torch
from torch import nn

from mmtag.config import ConfigError, ModelConfig
from mmtag.models.tagger import ClassAttentionHead, LabelQueryDecoder
from mmtag.models.tagger import Tagger as _Tagger


def Tagger(image, text, num_classes, **model):  # noqa: N802 - reads like the class it builds
    """A Tagger from `ModelConfig(**model)`, the way build_tagger makes one."""
    return _Tagger(image, text, num_classes, ModelConfig(**model))


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


@pytest.mark.parametrize("fusion", ["concat", "query"])
@pytest.mark.parametrize("aux", ["none", "loss", "ensemble"])
def test_logit_shapes_for_every_fusion(fusion, aux):
    torch.manual_seed(0)
    model = Tagger(_Img(), _Txt(), 3, hidden=8, fusion=fusion, aux_heads=aux, query_dim=8,
                   query_heads=2).eval()
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
    with pytest.raises(ConfigError, match="model.image_head must be one of"):
        Tagger(_Img(), _Txt(), 3, aux_heads="ensemble", image_head="max")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_class_attention_head_is_finite_under_autocast(dtype):
    torch.manual_seed(0)
    head = ClassAttentionHead(8, 3, lam=1.0, temperature=1e4, dropout=0.0).eval()
    fmap = torch.randn(2, 8, 5, 5) * 50
    with torch.autocast("cpu", dtype=dtype):
        out = head(fmap)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, head(fmap), rtol=0.05, atol=0.5)


class _TokTxt(nn.Module):
    """Stand-in caption encoder with MiniLM's token-state interface."""

    out_dim, num_layers = 5, 2

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 5)
        self.layers = nn.ModuleList([nn.Linear(5, 5), nn.Linear(5, 5)])

    @staticmethod
    def token_mask(lengths, t, device):
        return torch.arange(t, device=device)[None, :] < lengths.to(device)[:, None]

    def run_layers(self, x, lengths, start=0, end=None):
        if start == 0:
            x = self.emb(x)
        for layer in self.layers[start:end]:
            x = torch.tanh(layer(x))
        return x

    def pool(self, states, lengths):
        m = self.token_mask(lengths, states.shape[1], states.device).unsqueeze(-1).float()
        return (states * m).sum(1) / m.sum(1)


def test_label_query_decoder_ignores_padding_and_scores_each_label_with_its_own_vector():
    torch.manual_seed(0)
    dec = LabelQueryDecoder([6, 5], 3, dim=8, layers=2, heads=2, dropout=0.0).eval()
    img, txt = torch.randn(2, 9, 6), torch.randn(2, 4, 5)
    masks = [torch.ones(2, 9, dtype=torch.bool), torch.tensor([[True, True, False, False]] + [[True] * 4])]
    out = dec([img, txt], masks)
    assert out.shape == (2, 3)
    padded = txt.clone()
    padded[0, 2:] = 50.0  # padding must not matter
    torch.testing.assert_close(dec([img, padded], masks), out)
    # the caption's real tokens do matter
    changed = txt.clone()
    changed[0, 0] += 5.0
    assert not torch.allclose(dec([img, changed], masks)[0], out[0])
    # a label's logit is its own weight vector times its query's output, plus its bias
    dec.out_weight.data[1] = 0.0
    assert torch.allclose(dec([img, txt], masks)[:, 1], dec.out_bias[1].expand(2))


@pytest.mark.parametrize("aux", ["none", "ensemble"])
def test_query_fusion_reads_feature_map_and_caption_tokens(aux):
    torch.manual_seed(0)
    images, ids, lengths = _inputs()
    lengths = torch.tensor([7, 3, 5, 2])
    model = Tagger(_Img(), _TokTxt(), 3, fusion="query", aux_heads=aux, query_dim=8,
                   query_heads=2).eval()
    out = model.forward_all(images, ids, lengths)
    assert out["fused"].shape == (4, 3)
    if aux == "ensemble":
        torch.testing.assert_close(out["logits"], (out["fused"] + out["image"] + out["text"]) / 3)
    # token ids past a caption's length are padding
    ids2 = ids.clone()
    ids2[1, 3:] = (ids2[1, 3:] + 1) % 10
    torch.testing.assert_close(model(images, ids2, lengths), out["logits"])
    # cached inputs (the image's stage-0 output, the caption's layer-1 states) give the same logits
    model.image_input_stage, model.text_input_stage = 1, 1
    cached = model(model.image_encoder.run_stages(images, 0, 1),
                   model.text_encoder.run_layers(ids, lengths, 0, 1), lengths)
    torch.testing.assert_close(cached, out["logits"])
    model.image_input_stage = 3  # pooled features: no positions to attend over
    with pytest.raises(ValueError, match="needs the feature map"):
        model(torch.randn(4, 6), ids, lengths)
    model.image_input_stage, model.text_input_stage = 0, 3  # pooled caption: no tokens
    with pytest.raises(ValueError, match="needs token states"):
        model(images, torch.randn(4, 5), lengths)


def test_query_fusion_with_one_modality_or_a_pooled_caption():
    torch.manual_seed(0)
    images, ids, lengths = _inputs()
    assert Tagger(_Img(), None, 3, fusion="query", query_dim=8, query_heads=2).eval()(
        images, None, None).shape == (4, 3)
    assert Tagger(None, _TokTxt(), 3, fusion="query", query_dim=8, query_heads=2).eval()(
        None, ids, lengths).shape == (4, 3)
    # a caption encoder without token states (GloVe + LSTM) is one token: its pooled vector
    model = Tagger(_Img(), _Txt(), 3, fusion="query", query_dim=8, query_heads=2).eval()
    parts, fmap, tokens, qmap = model._embed(images, ids, lengths)
    seqs, masks = model._memory(parts, qmap, tokens)
    assert [s.shape for s in seqs] == [(4, 64, 6), (4, 1, 5)] and all(m.all() for m in masks)
    assert model(images, ids, lengths).shape == (4, 3)


def test_query_fusion_can_read_the_map_before_the_conv_head():
    torch.manual_seed(0)
    images, ids, lengths = _inputs()
    model = Tagger(_Img(), _TokTxt(), 3, fusion="query", aux_heads="ensemble",
                   image_head="attention", query_dim=8, query_heads=2, query_pre_head=True).eval()
    assert model.head.proj[0][0].in_features == 4  # the stand-in's stage 0 output, not 6
    parts, fmap, tokens, qmap = model._embed(images, ids, lengths)
    torch.testing.assert_close(qmap, model.image_encoder.run_stages(images, 0, 1))
    torch.testing.assert_close(fmap, model.image_encoder.run_stages(images))
    out = model(images, ids, lengths)
    model.image_input_stage = 1  # cached stage-0 output: the same logits
    torch.testing.assert_close(model(qmap, ids, lengths), out)
    img = _Img()
    img.stages[1] = nn.Conv2d(4, 6, 3, padding=1)  # no 1x1 conv head to read before
    with pytest.raises(ValueError, match="1x1 conv head"):
        Tagger(img, _TokTxt(), 3, fusion="query", query_pre_head=True)


def test_ensemble_head_weights_weigh_the_heads_logits():
    torch.manual_seed(0)
    images, ids, lengths = _inputs()
    model = Tagger(_Img(), _TokTxt(), 3, fusion="query", aux_heads="ensemble", query_dim=8,
                   query_heads=2, head_weights=[1.0, 1.0, 0.5]).eval()
    out = model.forward_all(images, ids, torch.tensor([7, 3, 5, 2]))
    torch.testing.assert_close(out["logits"], (out["fused"] + out["image"] + 0.5 * out["text"]) / 2.5)
    with pytest.raises(ConfigError, match="3 weights"):
        Tagger(_Img(), _TokTxt(), 3, aux_heads="ensemble", head_weights=[1.0, 1.0])
