"""Tests for ``mmtag.data.csv_io``: the exact COMP5329 CSV reader and the submission writer."""

from __future__ import annotations

import csv
import io
import os
import pickle
import re
import stat
import time
from pathlib import Path

import pytest

from mmtag.data.csv_io import CSVFormatError, Record, format_csv, read_csv, write_submission

TRAIN_HEADER = "ImageID,Labels,Caption\n"


def _data_dir() -> Path:
    """The real data: $MMTAG_COMP5329_DIR, else shared/data/comp5329 beside the repository."""
    env = os.environ.get("MMTAG_COMP5329_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "comp5329"


@pytest.fixture
def comp5329() -> Path:
    d = _data_dir()
    if not ((d / "train.csv").is_file() and (d / "test.csv").is_file()):
        pytest.skip(f"real COMP5329 data not found at {d} (set MMTAG_COMP5329_DIR to its folder)")
    return d


def _write(tmp_path: Path, text: str, name: str = "in.csv", newline: str = "\n") -> Path:
    """Write ``text`` exactly (``newline`` replaces each LF) and return the path."""
    path = tmp_path / name
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))
    return path


def _error(path: Path) -> CSVFormatError:
    with pytest.raises(CSVFormatError) as info:
        read_csv(path)
    return info.value


# Kaggle-style rows: quotes inside quoted captions are not escaped. Every row is hand-written
# and the expected captions below are what a human reads between the outer quotes.
KAGGLE_TEXT = (
    TRAIN_HEADER
    + '0.jpg,1,"Plain caption, with a comma."\n'  # line 2
    + '1.jpg,8 1,"A sign that reads "oh no, not beef on the menu again!""\n'  # line 3
    + '2.jpg,3 13,"A red stop sign next to a paper sign that reads "COURT"/"\n'  # line 4
    + '3.jpg,1 18,"Man and his dog inside of a room/"\n'  # line 5
    + '4.jpg,18,"Atop a rug rests a dog and a taller one\n'  # line 6
    + 'full of jeans and tops."\n'
    + '5.jpg,4,"Red motor \n'  # line 8 (trailing space before the line break)
    + "scooter on the sand.\n"
    + '."\n'
    + '6.jpg,1,"Many blank lines follow.\n'  # line 11
    + "\n\n\n\n"
    + 'The end."\n'
    + '7.jpg,2,"A "Gay Pride" bus says "hi"\n'  # line 17: a line ends in " mid-caption
    + 'to everyone."\n'
    + '8.jpg,,"No labels at all"\n'  # line 19
    + '9.jpg,1 2 3,""\n'  # line 20: empty caption
)
KAGGLE_EXPECTED = [
    Record("0.jpg", (1,), "Plain caption, with a comma.", 2),
    Record("1.jpg", (8, 1), 'A sign that reads "oh no, not beef on the menu again!"', 3),
    Record("2.jpg", (3, 13), 'A red stop sign next to a paper sign that reads "COURT"/', 4),
    Record("3.jpg", (1, 18), "Man and his dog inside of a room/", 5),
    Record("4.jpg", (18,), "Atop a rug rests a dog and a taller one\nfull of jeans and tops.", 6),
    Record("5.jpg", (4,), "Red motor \nscooter on the sand.\n.", 8),
    Record("6.jpg", (1,), "Many blank lines follow.\n\n\n\n\nThe end.", 11),
    Record("7.jpg", (2,), 'A "Gay Pride" bus says "hi"\nto everyone.', 17),
    Record("8.jpg", (), "No labels at all", 19),
    Record("9.jpg", (1, 2, 3), "", 20),
]


def test_kaggle_quirks(tmp_path):
    assert read_csv(_write(tmp_path, KAGGLE_TEXT)) == KAGGLE_EXPECTED


def test_crlf_bom_and_no_final_newline(tmp_path):
    path = tmp_path / "crlf.csv"
    path.write_bytes(b"\xef\xbb\xbf" + KAGGLE_TEXT.rstrip("\n").replace("\n", "\r\n").encode())
    records = read_csv(path)
    # Line breaks inside a caption are kept exactly as they are in the file.
    expected = [
        Record(r.image_id, r.labels, r.caption.replace("\n", "\r\n"), r.line)
        for r in KAGGLE_EXPECTED
    ]
    assert records == expected


def test_cr_only_line_endings(tmp_path):
    records = read_csv(_write(tmp_path, KAGGLE_TEXT, newline="\r"))
    assert [r.image_id for r in records] == [r.image_id for r in KAGGLE_EXPECTED]
    assert [r.line for r in records] == [r.line for r in KAGGLE_EXPECTED]
    assert records[4].caption == "Atop a rug rests a dog and a taller one\rfull of jeans and tops."


def test_test_and_submission_layouts_case_insensitive_header(tmp_path):
    test = _write(tmp_path, 'imageid,CAPTION\n30000.jpg,"A "quoted" word"\n30001.jpg,bare text\n')
    assert read_csv(test) == [
        Record("30000.jpg", (), 'A "quoted" word', 2),
        Record("30001.jpg", (), "bare text", 3),
    ]
    sub = _write(tmp_path, '"ImageID","Labels"\n30000.jpg,1 3\n30001.jpg,\n"30002.jpg","19"\n')
    assert read_csv(sub) == [
        Record("30000.jpg", (1, 3), "", 2),
        Record("30001.jpg", (), "", 3),
        Record("30002.jpg", (19,), "", 4),
    ]


def test_blank_lines_between_rows_are_ignored(tmp_path):
    path = _write(tmp_path, TRAIN_HEADER + '0.jpg,1,"a"\n\n  \n1.jpg,2,"b "x""\n\n\n')
    assert read_csv(path) == [Record("0.jpg", (1,), "a", 2), Record("1.jpg", (2,), 'b "x"', 5)]


CSV_CAPTIONS = [
    'He said "hi" to me',
    'ends with a quote"',
    '"starts with a quote',
    '"',
    "a comma, inside",
    "two\nlines",
    "ends with a break\n",
    "many\n\n\n\nblank lines",
    "windows\r\nbreak",
    "slash at the end/",
    'reads "COURT"/',
    "",
    " leading and trailing spaces ",
    'already ""doubled"" text',
    'a line ending in a quote "x"\nthen more',
    "tab\there",
]


@pytest.mark.parametrize("quoting", [csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC])
@pytest.mark.parametrize("lineterminator", ["\r\n", "\n"])
def test_standard_csv_round_trip(tmp_path, quoting, lineterminator):
    # What pandas.to_csv or the csv module write: inner quotes doubled, captions with special
    # characters quoted (or every field quoted).
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=quoting, lineterminator=lineterminator)
    writer.writerow(["ImageID", "Labels", "Caption"])
    for i, caption in enumerate(CSV_CAPTIONS):
        writer.writerow([f"{i}.jpg", f"{i % 19 + 1} 3", caption])
    path = tmp_path / "std.csv"
    path.write_bytes(buffer.getvalue().encode("utf-8"))
    records = read_csv(path)
    assert [r.caption for r in records] == CSV_CAPTIONS
    assert [r.labels for r in records] == [(i % 19 + 1, 3) for i in range(len(CSV_CAPTIONS))]
    # And the same rows as the csv module reads them back.
    with path.open(newline="", encoding="utf-8") as handle:
        expected = list(csv.reader(handle))[1:]
    assert [[r.image_id, " ".join(map(str, r.labels)), r.caption] for r in records] == expected


def test_kaggle_quirk_is_not_unescaped(tmp_path):
    # An undoubled inner quote anywhere means the quotes are literal: "" stays "".
    path = _write(tmp_path, TRAIN_HEADER + '0.jpg,1,"reads "spray."" and ""x"""\n')
    assert read_csv(path)[0].caption == 'reads "spray."" and ""x""'


# --- malformed input: the error names the file, the line and the text ----------------------


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (TRAIN_HEADER + '0.jpg,1,"ok"\n1.txt,1,"bad id"\n', 3, "invalid image id '1.txt'"),
        (TRAIN_HEADER + '0.jpg,1,"ok"\n1.jpg,1 x,"bad label"\n', 3, "not integers"),
        (TRAIN_HEADER + '0.jpg,1,"ok"\n1.jpg,-1,"neg"\n', 3, "not integers"),
        (TRAIN_HEADER + '0.jpg,1,"ok"\n1.jpg,1.5,"float"\n', 3, "not integers"),
        (TRAIN_HEADER + '0.jpg,1,"ok"\n1.jpg,1,"never closed\nmore text\n', 3, "end of the file"),
        (TRAIN_HEADER + '0.jpg,1,"not closed\n1.jpg,1,"b"\n', 2, "next row on line 3"),
        (TRAIN_HEADER + '0.jpg,1,"ok"\n1.jpg,1\n', 3, "too few fields"),
        (TRAIN_HEADER + '0.jpg,1,"ok"\n1.jpg\n', 3, "too few fields"),
        (TRAIN_HEADER + '0.jpg,1,"ok"\n1 x.jpg,1,"a"\n', 3, "invalid image id '1 x.jpg'"),
        (TRAIN_HEADER + '0.jpg,1,"ok"\n"1.jpg,1,"a"\n', 3, "malformed quoted image id"),
        (TRAIN_HEADER + '0.jpg,1,"ok"\n1.jpg,1,a, b\n', 3, "too many fields"),
        (TRAIN_HEADER + '0.jpg,1,"ok"\n1.jpg,1,"a" trailing\n2.jpg,1,"b"\n', 3, "not closed"),
        (TRAIN_HEADER + '0.jpg,1,no quotes\nwraps here\n', 3, "expected a new row"),
        ("ImageID,Labels\n30000.jpg,1\n30001.jpg,1,extra\n", 3, "too many fields"),
        ("ImageID,Caption\n30000.jpg\n", 2, "too few fields"),
        # Stray text after a closed caption reads like its next line: reported as unterminated.
        ("ImageID,Caption\n30000.jpg,\"a\"\nstray text\n", 2, "check lines 2-3"),
        ("ImageID,Labels,Caption\n\n \n0.jpg,1,\"a\"\n0.jpg,2,\"b\"\n", 5,
         "duplicate image id '0.jpg' (first seen on line 4)"),
    ],
)
def test_malformed_rows_name_the_line(tmp_path, text, line, fragment):
    path = _write(tmp_path, text)
    err = _error(path)
    assert err.line == line
    assert err.path == path
    assert f"{path}, line {line}:" in str(err)
    assert fragment in str(err)
    assert err.text and repr(err.text[:20])[1:-1] in str(err)


def test_bad_row_after_closed_caption_is_reported_not_swallowed(tmp_path):
    # The bad line ends in '"', so a reader that only looked for valid rows would glue it
    # onto the caption before it.
    for bad_id in ("6.jpeg2", "6", "x y.jpg"):
        text = TRAIN_HEADER + f'5.jpg,1,"abc"\n{bad_id},1,"def"\n7.jpg,1,"ghi"\n'
        err = _error(_write(tmp_path, text))
        assert err.line == 3, bad_id


def test_long_text_is_truncated_in_message(tmp_path):
    caption = "x" * 5000
    err = _error(_write(tmp_path, TRAIN_HEADER + f'0.jpg,1,"{caption}\n'))
    assert err.line == 2
    assert len(str(err)) < 600
    assert err.text.endswith(caption)


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf", b"\n\n  \r\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_bytes(content)
    err = _error(path)
    assert err.line == 1
    assert "empty" in str(err)
    assert str(path) in str(err)


def test_header_only(tmp_path):
    assert "no rows" in str(_error(_write(tmp_path, TRAIN_HEADER)))


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        ("Image,Labels,Caption", "ImageID,Labels,Caption"),
        ("ImageID,Labels,Caption,Extra", "ImageID,Caption"),
        (",ImageID,Labels,Caption", "index=False"),
        ('0.jpg,1,"no header"', "ImageID,Labels"),
    ],
)
def test_bad_header(tmp_path, header, fragment):
    err = _error(_write(tmp_path, header + '\n0.jpg,1,"a"\n'))
    assert err.line == 1
    assert "line 1:" in str(err)
    assert "unrecognised header" in str(err)
    assert fragment in str(err)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes((TRAIN_HEADER + '0.jpg,1,"ok"\n1.jpg,1,"caf\xe9"\n').encode("latin-1"))
    err = _error(path)
    assert err.line == 3
    assert "UTF-8" in str(err)


def test_error_pickles():
    err = CSVFormatError("a.csv", 7, "text", "problem", "hint")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.path, copy.line, copy.text, str(copy)) == (err.path, 7, "text", str(err))
    assert isinstance(err, ValueError)


# --- write_submission ---------------------------------------------------------------------


def test_write_submission_round_trip(tmp_path):
    import numpy as np

    path = tmp_path / "submission.csv"
    ids = ["30000.jpg", "30001.jpg", "30002.jpg", "30003.jpg"]
    labels = [[3, 1], (), {19}, np.array([13, 2, 1])]
    write_submission(path, ids, labels)
    assert path.read_text() == (
        "ImageID,Labels\n30000.jpg,3 1\n30001.jpg,\n30002.jpg,19\n30003.jpg,13 2 1\n"
    )
    assert read_csv(path) == [
        Record("30000.jpg", (3, 1), "", 2),
        Record("30001.jpg", (), "", 3),
        Record("30002.jpg", (19,), "", 4),
        Record("30003.jpg", (13, 2, 1), "", 5),
    ]
    # Generators work too, and rewriting replaces the file.
    write_submission(path, (i for i in ids[:1]), ([1] for _ in range(1)))
    assert read_csv(path) == [Record("30000.jpg", (1,), "", 2)]
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]  # no temp files left


def test_write_submission_permissions(tmp_path):
    path = tmp_path / "sub.csv"
    write_submission(path, ["1.jpg"], [[1]])
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    path.chmod(0o640)
    write_submission(path, ["1.jpg"], [[2]])
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.parametrize(
    ("ids", "labels", "error"),
    [
        (["1.jpg", "2.jpg"], [[1]], ValueError),
        ([], [], ValueError),
        (["1.jpg", "1.jpg"], [[1], [2]], ValueError),
        (["1 .jpg"], [[1]], ValueError),
        (["a,b.jpg"], [[1]], ValueError),
        (["1"], [[1]], ValueError),
        (["1.jpg"], [[-1]], ValueError),
        (["1.jpg"], [[1.0]], TypeError),
        (["1.jpg"], [["1"]], TypeError),
        (["1.jpg"], ["13"], TypeError),
        (["1.jpg"], [[True]], TypeError),
    ],
)
def test_write_submission_rejects_bad_input_and_keeps_old_file(tmp_path, ids, labels, error):
    path = tmp_path / "sub.csv"
    path.write_text("old\n")
    with pytest.raises(error):
        write_submission(path, ids, labels)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sub.csv"]


# --- the real files -----------------------------------------------------------------------


def test_real_train(comp5329):
    path = comp5329 / "train.csv"
    started = time.perf_counter()
    records = read_csv(path)
    elapsed = time.perf_counter() - started
    assert elapsed < 5  # about 0.1 s in practice; the bound only catches pathological slowness
    assert [r.image_id for r in records] == [f"{i}.jpg" for i in range(20000)]

    raw = path.read_bytes().decode("utf-8")
    # Independent check: every row starts on a line "<digits>.jpg,"; nothing else does.
    physical = raw.split("\n")
    starts = [n + 1 for n, line in enumerate(physical) if re.match(r"\d+\.jpg,", line)]
    assert [r.line for r in records] == starts
    # Writing the records back in the Kaggle style gives the file byte for byte.
    rebuilt = "".join(f'{r.image_id},{" ".join(map(str, r.labels))},"{r.caption}"\n'
                      for r in records)
    assert "ImageID,Labels,Caption\n" + rebuilt == raw
    assert format_csv(records) == raw  # and so does the writer
    assert all(r.labels and all(1 <= x <= 19 and x != 12 for x in r.labels) for r in records)

    by_id = {r.image_id: r for r in records}
    # Expected values copied from the raw file (sed -n LINEp train.csv | cat -A).
    assert by_id["1014.jpg"] == Record(
        "1014.jpg", (18,),
        "Atop an oriental rug rests a dog and two low-lying tables and a taller one\n"
        "full of very tidily arranged piles of jeans and tops.", 1016)
    assert by_id["2259.jpg"] == Record(
        "2259.jpg", (1, 3), "Men loading up a van with bags and suitcases.\n.", 2262)
    assert by_id["6751.jpg"] == Record(
        "6751.jpg", (4,), "Red motor \nscooter parked on the sand with a sunset in background.",
        6755)
    assert by_id["4787.jpg"] == Record(
        "4787.jpg", (1, 18), "Man and his dog laying on the floor inside of a room/", 4791)
    assert by_id["14712.jpg"] == Record(
        "14712.jpg", (8, 1, 3, 6), "A bus stops at a small city bus stop/", 14717)
    assert by_id["14957.jpg"] == Record(
        "14957.jpg", (3, 13), 'A red stop sign next to a paper sign that reads "COURT"/', 14962)
    assert by_id["9508.jpg"] == Record(
        "9508.jpg", (1,), 'A cow in street with writing that reads "oh no, not beef on the menu '
        'again!"', 9513)
    assert by_id["1338.jpg"].caption == 'A man surfing with titling that reads "spray."'
    assert by_id["9084.jpg"].caption == (
        'A street sign labeled "Seltzer Way," with a red fire hydrant in the foreground and a '
        "street stretching into the background.")
    assert by_id["2054.jpg"].caption == (
        "A white truck with an advertisement for \" Buster's 24 HR. Service \" painted on the "
        "passenger door.")
    assert sum('"' in r.caption for r in records) == 57
    assert sum("\n" in r.caption for r in records) == 3
    assert sum(r.caption.endswith("/") for r in records) == 3


def test_real_test(comp5329):
    path = comp5329 / "test.csv"
    records = read_csv(path)
    assert [r.image_id for r in records] == [f"{i}.jpg" for i in range(30000, 40000)]
    assert all(r.labels == () for r in records)
    raw = path.read_bytes().decode("utf-8")
    rebuilt = "".join(f'{r.image_id},"{r.caption}"\n' for r in records)
    assert "ImageID,Caption\n" + rebuilt == raw
    assert format_csv(records, labels=False) == raw
    by_id = {r.image_id: r for r in records}
    assert by_id["37203.jpg"] == Record(
        "37203.jpg", (), 'A stop sign that has been modified to read " stop all war"', 7205)
    assert by_id["30690.jpg"].caption == 'A stop sign with a sticker reading "eating animals."'
    assert sum('"' in r.caption for r in records) == 29


def test_csv_columns_reads_only_the_header(tmp_path):
    from mmtag.data.csv_io import csv_columns

    cases = {"ImageID,Labels,Caption\n": (True, True), "\ufeffimageid,caption\r\n": (False, True),
             "ImageID,Labels\n": (True, False)}
    for i, (text, want) in enumerate(cases.items()):
        f = tmp_path / f"{i}.csv"
        f.write_text(text + "0.jpg,broken row that read_csv would reject\n", encoding="utf-8")
        assert csv_columns(f) == want
    bad = tmp_path / "bad.csv"
    bad.write_text("id,label\n")
    with pytest.raises(CSVFormatError, match="unrecognised header"):
        csv_columns(bad)
    bad.write_text("")
    with pytest.raises(CSVFormatError, match="the file is empty"):
        csv_columns(bad)
