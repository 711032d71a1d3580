"""How much the caption pipeline's two lemmatizers (lemminflect, the default, and NLTK WordNet)
differ on a dataset's captions: the share of captions whose tokens differ, the vocabulary each
gives, and the most frequent words they lemmatise differently.

    python tools/analysis/compare_lemmatizers.py ../shared/data/comp5329/train.csv

Needs WordNet's data (`mmtag setup-wordnet`). The effect on a trained model is measured by
training the report recipe's caption branch with each (docs/experiments.md).
"""

from __future__ import annotations

import sys
from collections import Counter

from mmtag.data.csv_io import read_csv
from mmtag.data.text import STOPWORDS, caption_tokens, lemmatize


def main(path: str) -> None:
    captions = [r.caption for r in read_csv(path)]
    lem = [caption_tokens(c, lemmatizer="lemminflect") for c in captions]
    wn = [caption_tokens(c, lemmatizer="wordnet") for c in captions]
    differ = sum(a != b for a, b in zip(lem, wn, strict=True))
    words = Counter(w for c in captions for w in caption_tokens(c, lemmatizer="none")
                    if w not in STOPWORDS)
    changed = [(n, w, lemmatize(w, "lemminflect"), lemmatize(w, "wordnet"))
               for w, n in words.most_common()
               if lemmatize(w, "lemminflect") != lemmatize(w, "wordnet")]
    print(f"{len(captions)} captions; tokens differ in {differ} ({differ / len(captions):.1%})")
    print(f"vocabulary: lemminflect {len({w for c in lem for w in c})}, "
          f"wordnet {len({w for c in wn for w in c})}; distinct words lemmatised differently: "
          f"{len(changed)} of {len(words)}, {sum(n for n, *_ in changed)} of "
          f"{sum(words.values())} word occurrences")
    for n, w, a, b in changed[:15]:
        print(f"  {w!r} x{n}: lemminflect {a!r}, wordnet {b!r}")


if __name__ == "__main__":
    main(sys.argv[1])
