"""Tests for the synthetic demo dataset (mmtag.data.demo): layout, determinism, statistics,
caption truthfulness and a cheap plausibility check that the images carry class signal."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmtag.data import demo
from mmtag.data.csv_io import read_csv
from mmtag.data.demo import (
    DEMO_CLASS_WORDS,
    DEMO_LABEL_NAMES,
    DOMINANT_LABEL,
    make_caption,
    make_demo_data,
    render_sample,
)

TRAIN_ROW = re.compile(r'^(\d+)\.jpg,([0-9 ]+),"(.*)"$')
TEST_ROW = re.compile(r'^(\d+)\.jpg,"(.*)"$')
COLOURS = tuple(demo._PALETTE)

# One regex per class, built from the generator's own vocabulary (whole words, any case).
CLASS_ALT = {
    lab: "|".join(re.escape(w) for pair in words for w in pair)
    for lab, words in DEMO_CLASS_WORDS.items()
}
CLASS_RE = {lab: re.compile(rf"\b(?:{alt})\b", re.I) for lab, alt in CLASS_ALT.items()}


def mentioned_labels(caption: str) -> set[int]:
    return {lab for lab, rx in CLASS_RE.items() if rx.search(caption)}


def read_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and "\r" not in text
    return text[:-1].split("\n")


def parse_train(path: Path) -> list[tuple[int, list[int], str]]:
    """The demo writes one physical line per row, so a line regex reads it exactly."""
    lines = read_lines(path)
    assert lines[0] == "ImageID,Labels,Caption"
    rows = []
    for line in lines[1:]:
        m = TRAIN_ROW.match(line)
        assert m, line
        rows.append((int(m[1]), [int(t) for t in m[2].split()], m[3]))
    return rows


def parse_test(path: Path) -> list[tuple[int, str]]:
    lines = read_lines(path)
    assert lines[0] == "ImageID,Caption"
    rows = []
    for line in lines[1:]:
        m = TEST_ROW.match(line)
        assert m, line
        rows.append((int(m[1]), m[2]))
    return rows


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, dict]:
    """A larger set, shared by the statistics tests (about a second to make)."""
    out = tmp_path_factory.mktemp("demo300")
    return out, make_demo_data(out, n=300, seed=1, n_test=20)


def test_layout_counts_and_ids(tmp_path):
    out = tmp_path / "demo"
    summary = make_demo_data(out, n=60, seed=0)
    n_test = 60 // 4
    assert summary["n_train"] == 60 and summary["n_test"] == n_test
    for key in ("train_csv", "test_csv", "test_labels_csv", "labels_txt", "readme", "image_dir"):
        assert Path(summary[key]).exists(), key
    assert summary["label_names"] == DEMO_LABEL_NAMES

    train = parse_train(out / "train.csv")
    assert [r[0] for r in train] == list(range(60))
    test = parse_test(out / "test.csv")
    assert [r[0] for r in test] == list(range(60, 60 + n_test))
    answers = {r.image_id: r.labels for r in read_csv(out / "test_labels.csv")}
    assert list(answers) == [f"{i}.jpg" for i in range(60, 60 + n_test)]

    for _, labels, _ in train:
        assert 1 <= len(labels) <= 4 and len(set(labels)) == len(labels)
        assert set(labels) <= set(DEMO_LABEL_NAMES)
    assert all(1 <= len(v) <= 4 for v in answers.values())

    images = sorted(p.name for p in (out / "data").iterdir())
    assert images == sorted(f"{i}.jpg" for i in range(60 + n_test))
    for i in (0, 7, 59, 60, 60 + n_test - 1):
        with Image.open(out / "data" / f"{i}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            im.load()
            assert max(im.size) in (128, 100, 64) and min(im.size) >= 24

    lines = (out / "labels.txt").read_text(encoding="utf-8").splitlines()
    assert lines == [f"{i} {name}" for i, name in DEMO_LABEL_NAMES.items()]


def test_same_seed_identical_bytes_other_seed_differs(tmp_path):
    a, b, c = (
        make_demo_data(tmp_path / d, n=60, seed=s) for d, s in (("a", 3), ("b", 3), ("c", 4))
    )
    root_a, root_b, root_c = (Path(s["out_dir"]) for s in (a, b, c))
    files = sorted(p.relative_to(root_a) for p in root_a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(root_b) for p in root_b.rglob("*") if p.is_file())
    for rel in files:
        assert (root_a / rel).read_bytes() == (root_b / rel).read_bytes(), rel
    assert (root_a / "train.csv").read_bytes() != (root_c / "train.csv").read_bytes()
    same = sum(
        (root_a / "data" / f"{i}.jpg").read_bytes() == (root_c / "data" / f"{i}.jpg").read_bytes()
        for i in range(60)
    )
    assert same == 0


def test_refuses_foreign_directory_and_refreshes_its_own(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "train.csv").write_text("precious\n")
    with pytest.raises(FileExistsError, match="refusing"):
        make_demo_data(foreign, n=10)
    assert (foreign / "train.csv").read_text() == "precious\n"
    assert sorted(p.name for p in foreign.iterdir()) == ["train.csv"]

    own = tmp_path / "own"
    make_demo_data(own, n=40, seed=0)
    (own / "notes.txt").write_text("mine")
    make_demo_data(own, n=12, seed=0, n_test=3)  # smaller: stale images must go
    assert sorted(int(p.stem) for p in (own / "data").iterdir()) == list(range(15))
    assert (own / "notes.txt").read_text() == "mine"
    assert len(parse_train(own / "train.csv")) == 12

    with pytest.raises(ValueError):
        make_demo_data(tmp_path / "bad", n=0)


def test_label_statistics(big):
    out, summary = big
    train = parse_train(out / "train.csv")
    n = len(train)
    freq = {lab: sum(lab in labels for _, labels, _ in train) / n for lab in DEMO_LABEL_NAMES}
    assert freq == pytest.approx(summary["label_frequency"])
    assert 0.62 <= freq[DOMINANT_LABEL] <= 0.78  # designed: 0.70, like "person"
    assert all(f > 0.02 for f in freq.values()), freq  # every class appears
    assert max(f for lab, f in freq.items() if lab != DOMINANT_LABEL) < 0.4
    sizes = [len(labels) for _, labels, _ in train]
    assert 1.5 <= np.mean(sizes) <= 2.0 and min(sizes) == 1 and max(sizes) >= 3
    # Like the real files, labels are not written in sorted order.
    assert any(labels != sorted(labels) for _, labels, _ in train)


def test_captions_mention_only_present_labels(big):
    out, summary = big
    train = parse_train(out / "train.csv")
    n_labels = n_hits = n_empty = 0
    for _, labels, caption in train:
        said = mentioned_labels(caption)
        assert said <= set(labels), (labels, caption)
        n_labels += len(labels)
        n_hits += len(said)
        n_empty += not said
    recall = n_hits / n_labels
    assert recall == pytest.approx(summary["caption_label_recall"])
    assert 0.4 < recall < 0.7  # the caption alone misses a lot
    assert 0 < n_empty < len(train) / 2
    captions = [c for _, _, c in train]
    assert any('"' in c for c in captions)  # raw embedded quotes, Kaggle style
    # ...which, as with the real files, a standard CSV reader gets wrong without complaint.
    with open(out / "train.csv", encoding="utf-8", newline="") as f:
        std = [tuple(row) for row in csv.reader(f)][1:]
    exact = [(f"{i}.jpg", " ".join(map(str, labels)), c) for i, labels, c in train]
    assert len(std) == len(exact) and std != exact
    assert any("," in c for c in captions)
    assert any(c[:1].islower() for c in captions) and any(c[:1].isupper() for c in captions)
    colour_rx = re.compile(rf"\b(?:{'|'.join(COLOURS)})\b", re.I)
    assert any(colour_rx.search(c) for c in captions)
    assert len(set(captions)) > 0.8 * len(captions)


def test_caption_colours_and_mentions_are_true():
    """In memory, against what was drawn: the returned mentions are exactly the ones the words
    reveal, and a colour word before a class noun names a colour that object really has."""
    colour_noun = {
        lab: re.compile(rf"\b({'|'.join(COLOURS)}) (?:{alt})\b", re.I)
        for lab, alt in CLASS_ALT.items()
    }
    n_coloured = 0
    for i in range(200):
        rng = np.random.default_rng([5, i])
        sample = render_sample(rng)
        caption, mentioned = make_caption(rng, sample)
        assert {o.label for o in sample.objects} == set(sample.labels)
        assert mentioned_labels(caption) == set(mentioned) <= set(sample.labels), caption
        for lab, rx in colour_noun.items():
            for m in rx.finditer(caption):
                n_coloured += 1
                colours = {o.colour for o in sample.objects if o.label == lab}
                assert m[1].lower() in colours, (caption, colours)
    assert n_coloured > 10


def test_kaggle_reader_reads_demo_files(big):
    csv_io = pytest.importorskip("mmtag.data.csv_io")
    if not hasattr(csv_io, "read_csv"):
        pytest.skip("mmtag.data.csv_io.read_csv not available")
    out, _ = big
    records = csv_io.read_csv(out / "train.csv")
    assert [(r.image_id, list(r.labels), r.caption) for r in records] == [
        (f"{i}.jpg", labels, caption) for i, labels, caption in parse_train(out / "train.csv")
    ]
    records = csv_io.read_csv(out / "test.csv")
    assert [(r.image_id, r.caption) for r in records] == [
        (f"{i}.jpg", caption) for i, caption in parse_test(out / "test.csv")
    ]


def test_without_embedded_quotes_standard_csv_reads_it(tmp_path):
    out = tmp_path / "plain"
    make_demo_data(out, n=150, seed=2, n_test=0, embedded_quotes=False)
    rows = parse_train(out / "train.csv")
    assert not any('"' in c for _, _, c in rows)
    with open(out / "train.csv", encoding="utf-8", newline="") as f:
        std = list(csv.DictReader(f))
    assert [(r["ImageID"], r["Labels"].split(), r["Caption"]) for r in std] == [
        (f"{i}.jpg", [str(x) for x in labels], c) for i, labels, c in rows
    ]


def test_shapes_are_distinct():
    """Each class is a different shape: drawn alone at the same place and size, no two masks
    coincide (a model therefore has something to tell them apart by besides colour)."""
    masks = {}
    for lab in DEMO_LABEL_NAMES:
        im = Image.new("L", (80, 80), 0)
        shape = demo.DemoObject(lab, "red", 40, 40, 30, angle=0.3)
        demo._draw_shape(ImageDraw.Draw(im), shape, 1, 255, None)
        masks[lab] = np.asarray(im) > 127
        assert masks[lab].sum() > 400
    labs = list(masks)
    for i, a in enumerate(labs):
        for b in labs[i + 1 :]:
            iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
            assert iou < 0.9, (DEMO_LABEL_NAMES[a], DEMO_LABEL_NAMES[b], iou)


def _colour_features(path: Path) -> np.ndarray:
    """Histogram (4 levels per channel) of the strongly coloured pixels: shapes, not background."""
    with Image.open(path) as im:
        px = np.asarray(im.convert("RGB"), dtype=np.int16).reshape(-1, 3)
    px = px[(px.max(axis=1) - px.min(axis=1)) > 90]
    q = px // 64
    hist = np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64).astype(float)
    return hist / max(1.0, hist.sum())


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    ranks = scores.argsort().argsort() + 1.0
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_images_carry_class_signal(big):
    """A nearest-centroid scorer on colour histograms, fitted on half of the images, ranks the
    other half better than chance for the classes on average: the images are learnable (the
    shapes themselves, which a CNN sees, are checked separately above)."""
    out, _ = big
    train = parse_train(out / "train.csv")
    x = np.stack([_colour_features(out / "data" / f"{i}.jpg") for i, _, _ in train])
    y = {lab: np.array([lab in labels for _, labels, _ in train]) for lab in DEMO_LABEL_NAMES}
    half = len(train) // 2
    aucs = {}
    for lab, pos in y.items():
        fit_pos, fit_neg = x[:half][pos[:half]], x[:half][~pos[:half]]
        direction = fit_pos.mean(axis=0) - fit_neg.mean(axis=0)
        aucs[lab] = _auc(x[half:] @ direction, pos[half:])
    assert np.mean(list(aucs.values())) > 0.6, aucs
    assert min(aucs.values()) > 0.45, aucs
