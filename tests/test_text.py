import numpy as np
import pytest

from mmtag.data import text
from mmtag.data.text import (
    PAD_ID,
    UNK_ID,
    CaptionEncoder,
    Vocabulary,
    caption_tokens,
    choose_max_len,
)


def test_caption_pipeline_on_known_sentences():
    assert caption_tokens("Two DOGS are running over the 3 hills!") == ["two", "dog", "running", "hill"]
    assert caption_tokens('A man reads "oh no, not beef..." in geese/mice') == \
        ["man", "read", "oh", "beef", "goose", "mouse"]
    # stopwords and lemmas can be switched off
    assert caption_tokens("The dogs", stopwords=False, lemmatizer="none") == ["the", "dogs"]
    assert caption_tokens("1234 !!") == []


def test_vocabulary_pads_truncates_and_marks_unknown():
    vocab = Vocabulary.build([["dog", "cat"], ["dog", "horse"], ["zzzqqq"]], allowed={"dog", "cat", "horse"})
    assert vocab.words[:3] == ["<pad>", "<unk>", "dog"]  # most frequent first
    assert "zzzqqq" not in vocab.words  # not in the allowed (GloVe) list
    ids, n = vocab.encode(["dog", "zzzqqq", "cat"], max_len=5)
    assert n == 3 and ids.dtype == np.int64
    assert list(ids) == [2, UNK_ID, vocab.words.index("cat"), PAD_ID, PAD_ID]
    ids, n = vocab.encode(["dog"] * 9, max_len=4)
    assert n == 4 and list(ids) == [2] * 4
    ids, n = vocab.encode([], max_len=3)  # empty caption: one <unk>, never length 0
    assert n == 1 and list(ids) == [UNK_ID, PAD_ID, PAD_ID]


def test_max_len_from_length_distribution():
    assert choose_max_len([3] * 99 + [40], quantile=0.99) < 40
    assert choose_max_len([5, 6, 7], quantile=1.0) == 7
    assert choose_max_len([]) == 1


def test_glove_subset_and_encoder_round_trip():
    enc = CaptionEncoder.fit(["A dog chases a cat", "Dogs and horses", "qwxzv blorp"], max_len=None,
                             quantile=1.0)
    assert "qwxzv" not in enc.vocab.words  # not a GloVe word: maps to <unk>
    assert enc.max_len == 3
    mat, hits = enc.vocab.glove_matrix()
    assert mat.shape == (len(enc.vocab), 50) and hits == len(enc.vocab) - 2
    index, table = text.load_glove()
    np.testing.assert_allclose(mat[enc.vocab.words.index("dog")], table[index["dog"]])
    assert not mat[PAD_ID].any()
    again = CaptionEncoder.from_dict(enc.to_dict())
    np.testing.assert_array_equal(again("the dogs chase")[0], enc("the dogs chase")[0])


def test_missing_wordnet_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(text.WordNetMissingError, match="wordnet-base"):
        text.setup_wordnet(tmp_path / "nltk", source=tmp_path / "nowhere", allow_apt=False)


def test_wordnet_without_the_sense_index_names_the_package_to_install(tmp_path):
    source = tmp_path / "debian"
    source.mkdir()
    (source / "index.noun").write_text("")  # wordnet-base alone: NLTK 3.10 also opens index.sense
    with pytest.raises(text.WordNetMissingError, match=r"index\.sense.*wordnet-sense-index"):
        text.setup_wordnet(tmp_path / "nltk", source=source, allow_apt=False)
    assert not (tmp_path / "nltk").exists()


def _has_wordnet() -> bool:
    try:
        text.lemmatize("dogs", "wordnet")
    except text.WordNetMissingError:  # an option whose data comes apart from pip
        return False
    return True


@pytest.mark.parametrize("lemmatizer", [
    "lemminflect",
    pytest.param("wordnet", marks=pytest.mark.skipif(not _has_wordnet(), reason="no WordNet data "
                                                     "(mmtag setup-wordnet)"))])
def test_both_lemmatizers_take_words_as_nouns(lemmatizer):
    words = ["dogs", "children", "buses", "geese", "umbrellas", "kites", "skis", "running"]
    assert [text.lemmatize(w, lemmatizer) for w in words] == \
        ["dog", "child", "bus", "goose", "umbrella", "kite", "ski", "running"]
    with pytest.raises(ValueError, match="unknown lemmatizer 'porter'"):
        text.lemmatize("dogs", "porter")


def test_a_vocabulary_saved_before_the_lemmatizer_choice_keeps_wordnet():
    enc = CaptionEncoder(Vocabulary(["<pad>", "<unk>", "dog"]), 4)
    d = enc.to_dict()
    assert d["kind"] == "glove" and d["lemmatizer"] == "lemminflect"
    assert CaptionEncoder.from_dict(d) == enc
    old = {k: v for k, v in d.items() if k not in ("kind", "lemmatizer")}
    assert CaptionEncoder.from_dict({**old, "lemmas": True}).lemmatizer == "wordnet"
    assert CaptionEncoder.from_dict({**old, "lemmas": False}).lemmatizer == "none"


def test_the_old_lemmatize_key_reads_as_the_lemmatizer_it_meant():
    from mmtag.config import ConfigError, load_config

    assert load_config(None, []).data.lemmatizer == "lemminflect"
    assert load_config(None, ["data.lemmatize=true"]).data.lemmatizer == "wordnet"
    assert load_config(None, ["data.lemmatize=false"]).data.lemmatizer == "none"
    with pytest.raises(ConfigError, match="data.lemmatizer must be one of"):
        load_config(None, ["data.lemmatizer=porter"])
