"""Property-based tests (Hypothesis) for ``mmtag.data.csv_io``: what the writers write, the
reader reads back exactly, and what the writers refuse, no written form could carry.

Examples per test: a few hundred by default; HYPOTHESIS_PROFILE=slow runs 10,000 per test.
"""

from __future__ import annotations

import os
import re
import string
from pathlib import Path

import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from mmtag.data.csv_io import (
    CSVFormatError,
    Record,
    format_csv,
    read_csv,
    write_csv,
    write_submission,
)

# Registered here rather than in conftest.py. Hypothesis keeps failing examples in .hypothesis/
# (which it git-ignores itself) and tries them first on the next run.
_COMMON = {"deadline": None}
settings.register_profile("csv-default", max_examples=200, **_COMMON)
settings.register_profile("slow", max_examples=10_000, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "csv-default"))

# name -> keyword arguments of write_csv / format_csv
LAYOUTS = {
    "train": {"labels": True, "captions": True},
    "test": {"labels": False, "captions": True},
    "submission": {"labels": True, "captions": False},
}
HEADERS = {"train": "ImageID,Labels,Caption", "test": "ImageID,Caption",
           "submission": "ImageID,Labels"}

# --- strategies ---------------------------------------------------------------------------

# Characters an image id may hold: anything except whitespace, commas, quotes, path separators
# and NUL (the reader's id syntax plus "plain file name"). Every character for which
# str.isspace() holds is in category Cc, Zs, Zl or Zp; a filter would slow the tests down.
_ID_CHARS = st.characters(
    exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), exclude_characters=',"/\\')
_EXTENSIONS = ["jpg", "JPG", "jpeg", "Jpeg", "png", "PNG", "bmp", "gif", "webp", "tif", "TIFF"]
_STEMS = st.one_of(
    st.integers(0, 10**6).map(str),  # as in the competition: 0.jpg ... 39999.jpg
    st.text(_ID_CHARS, min_size=1, max_size=10),
)
image_ids = st.builds(lambda stem, ext: f"{stem}.{ext}", _STEMS, st.sampled_from(_EXTENSIONS))
label_tuples = st.lists(st.one_of(st.integers(0, 19), st.integers(0, 2**70)), max_size=6).map(
    tuple)

# Pieces that stress the format: quotes (also doubled and at line ends), commas, every kind of
# line break and blank lines, slashes, non-BMP and combining characters, other Unicode
# separators that are not line breaks for the reader, and caption lines that look like rows.
_FRAGMENTS = [
    '"', '""', '"""', ",", ", ", "\n", "\r\n", "\r", "\n\n", "\r\n\r\n", "\n \n", " ", "  ", "/",
    "\\", "COURT", "reads ", "é", "e\u0301", "a\u0308\u0323", "\U0001f600", "\U0001d518", "\u2028",
    "\x85", "\x0c", "\t", "\x00", "\ufeff", "\u3000", ".", "a.jpg", "5.jpg,", "7.jpg,1 2,",
    '"7.jpg",', '8.png,"', "x,1 2,", 'x y,3,"', '\n5.jpg,2,"', "\n12.jpg", '"\n', '\n"9.jpg",',
    "\n3.JPG\n", "\nfoo.txt,",
]
_PIECES = st.one_of(
    st.sampled_from(_FRAGMENTS),
    st.text(alphabet=string.ascii_letters + string.digits + ' ",./\n\r', max_size=6),
    st.text(max_size=4),  # any Unicode except lone surrogates
)
captions = st.one_of(
    st.lists(_PIECES, max_size=12).map("".join),
    st.text(),
    # Endings the competition has (or that sit next to the closing quote): '/', '"', spaces.
    st.tuples(st.lists(_PIECES, max_size=8).map("".join),
              st.sampled_from(["/", '"', '""', " ", "\n", '"/', "\r"])).map("".join),
)
# Captions that every form of writing carries: one line, no quotes.
simple_captions = st.text(string.ascii_letters + " ,./é\U0001f600", max_size=10).map(
    lambda c: c + ".")


def _records(layout: str, draw_labels, draw_caption, ids: list[str]) -> list[Record]:
    """Records valid for ``layout`` (no labels in test.csv, no captions in a submission)."""
    labels = LAYOUTS[layout]["labels"]
    captions_ = LAYOUTS[layout]["captions"]
    return [Record(i, draw_labels() if labels else (), draw_caption() if captions_ else "", 0)
            for i in ids]


@st.composite
def record_lists(draw, layout: str) -> list[Record]:
    ids = draw(st.lists(image_ids, min_size=1, max_size=8, unique=True))
    return _records(layout, lambda: draw(label_tuples), lambda: draw(captions), ids)


# --- helpers ------------------------------------------------------------------------------


def _triples(records) -> list[tuple[str, tuple[int, ...], str]]:
    return [(r.image_id, tuple(r.labels), r.caption) for r in records]


def _expected_lines(records) -> list[int]:
    """Line each row starts on: after the header, one line per row plus its caption's breaks."""
    lines, line = [], 2
    for r in records:
        lines.append(line)
        line += 1 + len(re.findall(r"\r\n|\r|\n", r.caption))
    return lines


def _writable(record: Record, layout: str) -> bool:
    """False if the writer refuses the record's caption (any other refusal fails the test)."""
    try:
        format_csv([record], **LAYOUTS[layout])
    except ValueError as err:
        assert "cannot write caption" in str(err)
        return False
    return True


def _read_text(path: Path, text: str):
    """read_csv of ``text`` written byte for byte, or the CSVFormatError it raises."""
    path.write_bytes(text.encode("utf-8"))
    try:
        return read_csv(path)
    except CSVFormatError as err:
        return err


def _hand_written(layout: str, records, caption_fields: list[str] | None = None) -> str:
    """A file written without csv_io; captions in quotes as they are unless fields are given."""
    rows = [HEADERS[layout]]
    for k, r in enumerate(records):
        fields = [r.image_id]
        if LAYOUTS[layout]["labels"]:
            fields.append(" ".join(map(str, r.labels)))
        if LAYOUTS[layout]["captions"]:
            fields.append(caption_fields[k] if caption_fields else f'"{r.caption}"')
        rows.append(",".join(fields))
    return "\n".join(rows) + "\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    # One folder for all examples (a function-scoped tmp_path is not reset between examples);
    # each example overwrites the same few files.
    return tmp_path_factory.mktemp("csv_properties")


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
@PROFILE
@given(data=st.data())
def test_write_csv_round_trip(workdir, layout, data):
    records = data.draw(record_lists(layout))
    # Keep the rows the writer accepts on their own (the next test checks the ones it refuses);
    # a file of such rows must then be accepted and read back exactly as a whole.
    records = [r for r in records if _writable(r, layout)]
    assume(records)
    path = workdir / f"round_trip_{layout}.csv"
    write_csv(path, records, **LAYOUTS[layout])
    text = path.read_bytes().decode("utf-8")
    assert text == format_csv(records, **LAYOUTS[layout])
    assert text.startswith(HEADERS[layout] + "\n")

    back = read_csv(path)
    assert _triples(back) == _triples(records)
    assert [r.line for r in back] == _expected_lines(records)
    # The competition's quoting: a caption without quotes is written between quotes unchanged.
    for r in records:
        if LAYOUTS[layout]["captions"] and '"' not in r.caption:
            assert f',"{r.caption}"\n' in text


@pytest.mark.parametrize("layout", ["train", "test"])
@PROFILE
@given(caption=captions, ids=st.lists(image_ids, min_size=1, max_size=4, unique=True),
       data=st.data())
def test_writer_refuses_exactly_what_cannot_be_read_back(workdir, layout, caption, ids, data):
    """For any caption: either the writer refuses it (ValueError naming the row), and then no
    form of the row (Kaggle style, quotes doubled, unquoted) reads back exactly; or the file it
    writes reads back exactly."""
    others = [data.draw(simple_captions, label="other caption") for _ in ids[1:]]
    position = data.draw(st.integers(0, len(ids) - 1), label="position")
    event(_check_refuses_exactly(workdir, layout, caption, position, ids, others))


@pytest.mark.parametrize("layout", ["train", "test"])
@pytest.mark.parametrize(("caption", "outcome"), [
    ("", "kaggle"), ('"', "kaggle"), ('ends with a quote"', "kaggle"),
    ("ends with a slash/", "kaggle"), ('reads "COURT"/', "kaggle"),
    (" leading and trailing ", "kaggle"), ("two\nlines", "kaggle"), ("crlf\r\nlines", "kaggle"),
    ("cr\rlines", "kaggle"), ("blank\n\n\nlines", "kaggle"), ("\n", "kaggle"), ("\r\n", "kaggle"),
    ("x\n", "kaggle"), ("e\u0301 \U0001f600 \U0001d518", "kaggle"), ("x\n5.jpg", "kaggle"),
    # Valid standard CSV as it is: the reader would un-double it.
    ('""', "doubled"), ('a""b', "doubled"), ('say ""hi""\nbye', "doubled"),
    # A line that looks like a row in the Kaggle style but not once its quotes are doubled.
    ('x\n"7.jpg",1,"y', "doubled"), ('q\n"8.png","z', "doubled"),
    # A line that looks like a row either way.
    ('x"\n5.jpg,1,"y', "refused"), ('x\n5.jpg,1,"y', "refused"), ("x\n5.jpg\ny", "refused"),
    ('q"\n\n\n12.jpg,"z', "refused"), ("a\r\n3.JPG,\r\nb", "refused"),
])
def test_writer_refuses_exactly_fixed_captions(workdir, layout, caption, outcome):
    ids = ["0.jpg", "1.jpg", "2.jpg"]
    assert _check_refuses_exactly(workdir, layout, caption, 1, ids, ["a", "b"]) == outcome


def _check_refuses_exactly(workdir: Path, layout: str, caption: str, position: int,
                           ids: list[str], others: list[str]) -> str:
    """Check the property for one caption; say how it was written: kaggle, doubled or refused."""
    captions_ = [*others[:position], caption, *others[position:]]
    records = [Record(i, (len(i) % 19,) if layout == "train" else (), c, 0)
               for i, c in zip(ids, captions_, strict=True)]
    path = workdir / f"refuse_{layout}.csv"
    try:
        text = format_csv(records, **LAYOUTS[layout])
    except ValueError as err:
        assert f"row {position} ({ids[position]})" in str(err)
        # Every other row is plain, so the tested row is the one no form can carry.
        forms = ['"' + caption + '"', '"' + caption.replace('"', '""') + '"', caption]
        for form in forms:
            fields = ['"' + c + '"' for c in captions_]
            fields[position] = form
            back = _read_text(path, _hand_written(layout, records, fields))
            assert isinstance(back, CSVFormatError) or _triples(back) != _triples(records), form
        return "refused"
    write_csv(path, records, **LAYOUTS[layout])
    assert path.read_bytes().decode("utf-8") == text
    back = read_csv(path)
    assert _triples(back) == _triples(records)
    assert [r.line for r in back] == _expected_lines(records)
    return "kaggle" if f',"{caption}"\n' in text else "doubled"


@PROFILE
@given(ids=st.lists(image_ids, min_size=1, max_size=10, unique=True), data=st.data())
def test_write_submission_round_trip(workdir, ids, data):
    label_sets = [data.draw(st.one_of(label_tuples, label_tuples.map(list))) for _ in ids]
    path = workdir / "submission.csv"
    write_submission(path, ids, label_sets)
    back = read_csv(path)
    assert [(r.image_id, r.labels, r.caption, r.line) for r in back] == [
        (i, tuple(labels), "", n) for n, (i, labels) in enumerate(zip(ids, label_sets, strict=True), start=2)]
    # Both writers write the same submission file.
    records = [Record(i, tuple(labels), "", 0) for i, labels in zip(ids, label_sets, strict=True)]
    assert path.read_bytes().decode("utf-8") == format_csv(records, captions=False)


# --- refusals -----------------------------------------------------------------------------

_DIRS = st.text(_ID_CHARS, min_size=1, max_size=6) | st.sampled_from(["..", ".", "a/..", "~"])
not_plain_ids = st.one_of(
    st.builds(lambda d, n: f"../{n}" if d == "." else f"../{d}/{n}", _DIRS, image_ids),
    st.builds(lambda d, n: f"/{d}/{n}", _DIRS, image_ids),  # absolute
    st.builds(lambda n: f"/{n}", image_ids),
    st.builds(lambda d, n: f"{d}/{n}", _DIRS, image_ids),
    st.builds(lambda d, n: f"{d}\\{n}", _DIRS, image_ids),
    st.builds(lambda n: f"C:\\{n}", image_ids),  # absolute on Windows
    st.builds(lambda n: f"..\\{n}", image_ids),
    st.builds(lambda n: "\0" + n, image_ids),
)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@PROFILE
@given(bad=not_plain_ids, data=st.data())
def test_ids_that_are_not_plain_file_names_are_refused(workdir, layout, bad, data):
    ids = data.draw(st.lists(image_ids, max_size=3, unique=True), label="ids")
    position = data.draw(st.integers(0, len(ids)), label="position")
    ids.insert(position, bad)
    records = _records(layout, lambda: data.draw(label_tuples),
                       lambda: data.draw(simple_captions), ids)

    # The reader names the line of the row (all rows are one line long here).
    text = _hand_written(layout, records)
    err = _read_text(workdir / "bad_id.csv", text)
    assert isinstance(err, CSVFormatError)
    assert err.line == position + 2
    assert f"line {position + 2}:" in str(err)
    assert "not a plain file name" in err.problem

    # The writers refuse it, naming the row, and leave an existing file as it was.
    path = workdir / "bad_id_out.csv"
    path.write_text("old\n")
    with pytest.raises(ValueError, match=f"row {position}:"):
        write_csv(path, records, **LAYOUTS[layout])
    if layout == "submission":
        with pytest.raises(ValueError, match=f"row {position}:"):
            write_submission(path, ids, [r.labels for r in records])
    assert path.read_text() == "old\n"


@pytest.mark.parametrize("bad", [".", "..", "", "a b.jpg", "a,b.jpg", 'a"b.jpg', "a.txt", 7])
def test_writers_refuse_other_invalid_ids(workdir, bad):
    for layout, kwargs in LAYOUTS.items():
        records = _records(layout, lambda: (1,), lambda: "x", ["0.jpg"])
        records.append(Record(bad, records[0].labels, records[0].caption, 0))
        with pytest.raises(ValueError, match="row 1: invalid image id"):
            format_csv(records, **kwargs)
    with pytest.raises(ValueError, match="row 1: invalid image id"):
        write_submission(workdir / "never.csv", ["0.jpg", bad], [[1], [2]])
    assert not (workdir / "never.csv").exists()


@PROFILE
@given(caption=captions, surrogate=st.characters(categories=["Cs"]), data=st.data())
def test_text_that_is_not_unicode_is_refused(workdir, caption, surrogate, data):
    # A lone surrogate cannot be written as UTF-8: refused up front, naming the row.
    cut = data.draw(st.integers(0, len(caption)))
    records = [Record("0.jpg", (1,), "fine", 0),
               Record("1.jpg", (2,), caption[:cut] + surrogate + caption[cut:], 0)]
    with pytest.raises(ValueError, match=r"row 1 \(1.jpg\): the caption is not valid Unicode"):
        format_csv(records)
    with pytest.raises(ValueError, match="row 0: image id .* is not valid Unicode"):
        format_csv([Record(f"a{surrogate}.jpg", (), "", 0)], captions=False)


def test_layout_mismatches_and_empty_input_are_refused(workdir):
    with pytest.raises(ValueError, match="row 0 .*no Labels column"):
        format_csv([Record("0.jpg", (1,), "x", 0)], labels=False)
    with pytest.raises(ValueError, match="row 0 .*no Caption column"):
        format_csv([Record("0.jpg", (1,), "x", 0)], captions=False)
    with pytest.raises(ValueError, match="Labels or a Caption column"):
        format_csv([Record("0.jpg", (), "", 0)], labels=False, captions=False)
    with pytest.raises(ValueError, match="no rows"):
        write_csv(workdir / "empty.csv", [])
    with pytest.raises(ValueError, match="row 1: duplicate image id '0.jpg'"):
        format_csv([Record("0.jpg", (1,), "x", 0), Record("0.jpg", (2,), "y", 0)])
    with pytest.raises(TypeError, match="row 0 .*caption 3 is not a string"):
        format_csv([Record("0.jpg", (1,), 3, 0)])  # type: ignore[arg-type]
    assert not (workdir / "empty.csv").exists()
