import pytest
import torch
from torch import nn

from mmtag.models.tagger import (
    ClassAttentionHead,
    LabelQueryDecoder,
    Tagger,
    TokenAttentionHead,
    hide_tokens,
)


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


def test_class_attention_head_averages_the_attention_terms_of_several_temperatures():
    torch.manual_seed(0)
    head = ClassAttentionHead(6, 3, lam=0.5, temperature=(1.0, 1e4), dropout=0.0).eval()
    fmap = torch.randn(2, 6, 4, 4)
    s = head.score(head.norm(fmap)).flatten(2)
    soft = (torch.softmax(s, dim=2) * s).sum(2)
    torch.testing.assert_close(head(fmap), s.mean(2) + 0.5 * (soft + s.amax(2)) / 2)
    single = ClassAttentionHead(6, 3, lam=0.5, temperature=1.0, dropout=0.0).eval()
    single.load_state_dict(head.state_dict())
    assert not torch.allclose(head(fmap), single(fmap))  # the max term changes the logits
    with pytest.raises(ValueError, match="temperatures must be > 0"):
        ClassAttentionHead(6, 3, lam=0.5, temperature=(1.0, 0.0), dropout=0.0)
    # a caption attention head in the same tagger gets the same temperatures
    images, ids, lengths = _inputs()
    model = Tagger(_Img(), _TokTxt(), 3, aux_heads="ensemble", image_head="attention",
                   text_head="attention", attn_temperature=(1.0, 99.0)).eval()
    assert model(images, ids, lengths).shape == (4, 3)


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


def test_hide_tokens_only_adds_to_the_mask_and_never_hides_a_whole_sample():
    torch.manual_seed(0)
    pad = torch.zeros(2000, 10, dtype=torch.bool)
    pad[:, 7:] = True  # 3 padding tokens per sample
    out = hide_tokens(pad, 0.3)
    assert out[pad].all()  # padding stays hidden
    assert (~out).any(dim=1).all()  # every sample keeps a token
    assert abs(out[:, :7].float().mean().item() - 0.3) < 0.02
    # where every real token would be hidden, the sample keeps its own mask
    torch.testing.assert_close(hide_tokens(pad[:5], 0.999999), pad[:5])


def test_memory_drop_acts_in_training_only():
    torch.manual_seed(0)
    dec = LabelQueryDecoder([6], 3, dim=8, layers=1, heads=2, dropout=0.0, memory_drop=0.5)
    img, masks = torch.randn(4, 9, 6), [torch.ones(4, 9, dtype=torch.bool)]
    dec.eval()
    torch.testing.assert_close(dec([img], masks), dec([img], masks))
    dec.train()
    assert not torch.allclose(dec([img], masks), dec([img], masks))


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
    parts, fmap, tokens, qmap, _ = model._embed(images, ids, lengths)
    seqs, masks = model._memory(parts, qmap, tokens)
    assert [s.shape for s in seqs] == [(4, 64, 6), (4, 1, 5)] and all(m.all() for m in masks)
    assert model(images, ids, lengths).shape == (4, 3)


def test_query_fusion_can_read_the_map_before_the_conv_head():
    torch.manual_seed(0)
    images, ids, lengths = _inputs()
    model = Tagger(_Img(), _TokTxt(), 3, fusion="query", aux_heads="ensemble",
                   image_head="attention", query_dim=8, query_heads=2, query_pre_head=True).eval()
    assert model.head.proj[0][0].in_features == 4  # the stand-in's stage 0 output, not 6
    parts, fmap, tokens, qmap, extra = model._embed(images, ids, lengths)
    assert extra is None
    torch.testing.assert_close(qmap, model.image_encoder.run_stages(images, 0, 1))
    torch.testing.assert_close(fmap, model.image_encoder.run_stages(images))
    out = model(images, ids, lengths)
    model.image_input_stage = 1  # cached stage-0 output: the same logits
    torch.testing.assert_close(model(qmap, ids, lengths), out)
    img = _Img()
    img.stages[1] = nn.Conv2d(4, 6, 3, padding=1)  # no 1x1 conv head to read before
    with pytest.raises(ValueError, match="1x1 conv head"):
        Tagger(img, _TokTxt(), 3, fusion="query", query_pre_head=True)


def test_query_fusion_can_also_read_a_finer_map():
    from mmtag.models.image_encoders import build_image_encoder
    from mmtag.models.tagger import stage_out_channels

    torch.manual_seed(0)
    enc = build_image_encoder("efficientnet_lite0", pretrained=False, freeze=5)
    for k in range(1, enc.num_stages + 1):  # the width read off the modules is the real one
        assert stage_out_channels(enc, k) == enc.eval().run_stages(torch.zeros(1, 3, 32, 32),
                                                                    0, k).shape[1]
    images, ids, lengths = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2, 7)), torch.full((2,), 7)
    model = Tagger(enc, _TokTxt(), 3, fusion="query", aux_heads="ensemble", image_head="attention",
                   query_dim=8, query_heads=2, query_pre_head=True, query_extra_stage=4).eval()
    # memory: the last block stage's 2x2 map, the stride-8 8x8 map of stages [0, 4), the caption
    assert [p[0].in_features for p in model.head.proj] == [320, 40, 5]
    parts, fmap, tokens, qmap, extra = model._embed(images, ids, lengths)
    torch.testing.assert_close(extra, enc.run_stages(images, 0, 4))
    seqs, _ = model._memory(parts, qmap, tokens, extra)
    assert [x.shape[1] for x in seqs] == [4, 64, 7]
    out = model(images, ids, lengths)
    # cached inputs: stage 5's input with the finer map beside it give the same logits
    model.image_input_stage = 5
    torch.testing.assert_close(model((enc.run_stages(images, 0, 5), extra), ids, lengths), out)
    model.image_input_stage = 2  # a cache before the extra stage: the model runs on to it
    torch.testing.assert_close(model(enc.run_stages(images, 0, 2), ids, lengths), out)
    # the extra map changes what the queries read
    plain = Tagger(enc, _TokTxt(), 3, fusion="query", query_dim=8, query_heads=2)
    assert len(plain.head.proj) == 2
    with pytest.raises(ValueError, match="needs model.fusion=query"):
        Tagger(enc, _TokTxt(), 3, fusion="concat", query_extra_stage=4)
    with pytest.raises(ValueError, match="choose k in 1..7"):
        Tagger(enc, _TokTxt(), 3, fusion="query", query_pre_head=True, query_extra_stage=8)


def test_ensemble_head_weights_weigh_the_heads_logits():
    torch.manual_seed(0)
    images, ids, lengths = _inputs()
    model = Tagger(_Img(), _TokTxt(), 3, fusion="query", aux_heads="ensemble", query_dim=8,
                   query_heads=2, head_weights=(1.0, 1.0, 0.5)).eval()
    out = model.forward_all(images, ids, torch.tensor([7, 3, 5, 2]))
    torch.testing.assert_close(out["logits"], (out["fused"] + out["image"] + 0.5 * out["text"]) / 2.5)
    with pytest.raises(ValueError, match="3 weights"):
        Tagger(_Img(), _TokTxt(), 3, aux_heads="ensemble", head_weights=(1.0, 1.0))


def test_pooled_head_is_a_fourth_weighted_member_and_learns():
    torch.manual_seed(0)
    images, ids, _ = _inputs()
    lengths = torch.tensor([7, 3, 5, 2])
    model = Tagger(_Img(), _TokTxt(), 3, hidden=8, fusion="query", aux_heads="ensemble",
                   query_dim=8, query_heads=2, head_weights=(1.0, 1.0, 0.5, 2.0),
                   pooled_head=True).eval()
    out = model.forward_all(images, ids, lengths)
    assert out["pooled"].shape == (4, 3)
    torch.testing.assert_close(out["logits"], (out["fused"] + out["image"] + 0.5 * out["text"]
                                               + 2.0 * out["pooled"]) / 4.5)
    # its own loss reaches its MLP, not the label queries' head
    model.train()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        model.forward_all(images, ids, lengths)["pooled"], torch.ones(4, 3))
    loss.backward()
    assert model.pooled_mlp[-1].weight.grad.abs().sum() > 0
    assert model.head.out_weight.grad is None
    with pytest.raises(ValueError, match="4 weights"):
        Tagger(_Img(), _TokTxt(), 3, fusion="query", aux_heads="ensemble", pooled_head=True)
    with pytest.raises(ValueError, match="fusion='query'"):
        Tagger(_Img(), _TokTxt(), 3, aux_heads="ensemble", pooled_head=True,
               head_weights=(1.0, 1.0, 1.0, 1.0))
