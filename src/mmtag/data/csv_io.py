"""Exact reader and writer for COMP5329-style Kaggle CSV files.

The competition files look like CSV but are not valid CSV: captions are wrapped in double quotes
without escaping the double quotes inside them (``"... reads "COURT"/"``), a few captions span
several physical lines, and some end in ``/``. Generic CSV readers either fail on them or, worse,
silently return wrong rows. This module reads them with a small line-based state machine instead:

* A row starts on a physical line that begins with an image id (a file name such as ``0.jpg``)
  followed by a comma. The labels field (space-separated integers) and the caption field follow.
* A quoted caption ends on the first line that ends with ``"`` and is followed by the start of a
  new row (blank lines in between are allowed) or by the end of the file. Every quote before that
  point is part of the caption, which is exactly how the Kaggle files have to be read.
* If the text between the outer quotes is valid standard CSV (every inner quote doubled, as
  written by pandas or Python's ``csv`` module), the doubled quotes are unescaped; otherwise the
  text is kept exactly as it is (the Kaggle quirk). None of the real captions is valid standard
  CSV with an inner quote, so unescaping never changes them.

Anything that cannot be read unambiguously raises :class:`CSVFormatError` with the file, the
line and the offending text; no row is ever dropped or merged silently.

Known limitation: inside a caption that spans several lines, a line that itself looks like the
start of a row (``12.jpg,3,...``) is taken as a new row. That usually leaves the caption
unterminated and raises an error, but if the caption line before it ends with ``"`` the text is
indistinguishable from two rows and is read as two rows. :func:`write_csv` therefore refuses to
write such captions, so a file it writes always reads back exactly.
"""

from __future__ import annotations

import itertools
import operator
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mmtag.atomic import atomic_write

# File extensions accepted at the end of an image id (compared case-insensitively).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff")

# Accepted headers (lower-cased column names) -> (has a labels column, has a caption column).
_HEADERS = {
    ("imageid", "labels", "caption"): (True, True),  # train.csv
    ("imageid", "caption"): (False, True),  # test.csv
    ("imageid", "labels"): (True, False),  # Kaggle submission
}
_EXPECTED_HEADERS = "'ImageID,Labels,Caption', 'ImageID,Caption' or 'ImageID,Labels'"

# How much of the offending text an error message shows.
_CLIP = 120
_CLOSE_HINT = ('End the caption with a double quote (") at the end of its last line (text after '
               "the closing quote means the row has too many fields)")


@dataclass(frozen=True)
class Record:
    """One row of a competition CSV file.

    Attributes:
        image_id: the image file name, e.g. ``"0.jpg"``.
        labels: the label ids in file order; ``()`` for ``test.csv`` rows and empty label fields.
        caption: the exact caption text (inner quotes, line breaks and a trailing ``/`` kept);
            ``""`` for submission files, which have no caption column.
        line: the 1-based physical line number on which the row starts.
    """

    image_id: str
    labels: tuple[int, ...]
    caption: str
    line: int


class CSVFormatError(ValueError):
    """A CSV file cannot be read exactly.

    Attributes:
        path: the file.
        line: the 1-based line number of the problem.
        text: the offending text (the message shows it truncated).
        problem: what is wrong.
        hint: what to do about it.
    """

    def __init__(self, path: str | os.PathLike[str], line: int, text: str, problem: str,
                 hint: str = "") -> None:
        self.path = Path(path)
        self.line = line
        self.text = text
        self.problem = problem
        self.hint = hint
        shown = text if len(text) <= _CLIP else text[:_CLIP] + "..."
        message = f"{self.path}, line {line}: {problem}; text: {shown!r}"
        if hint:
            message += f". {hint}"
        super().__init__(message)

    def __reduce__(self):  # the default would call __init__ with the message only
        return (type(self), (self.path, self.line, self.text, self.problem, self.hint))


class _Grammar:
    """Row syntax for one header layout; compiled per call so importing the module costs nothing."""

    def __init__(self, has_labels: bool, has_caption: bool) -> None:
        self.has_labels = has_labels
        self.has_caption = has_caption
        self.columns = ",".join(["ImageID", *["Labels"] * has_labels, *["Caption"] * has_caption])
        ext = "|".join(IMAGE_EXTENSIONS)
        self.image_id = re.compile(rf'[^\s,"]+\.(?:{ext})', re.IGNORECASE)
        self.labels = re.compile(r"[0-9 ]*")
        # "Looks like the start of a row" is deliberately looser than "is a valid row": a line
        # with a malformed id or labels must still end the previous caption and then be reported,
        # instead of being swallowed into that caption.
        looks = [
            r'"?[^\s,"]+\.[A-Za-z0-9]+"?,',  # a file name followed by a comma
            rf"[^\s,\"]+\.(?:{ext})\s*$",  # an image file name alone: a row missing its fields
        ]
        if has_labels and has_caption:
            looks += [
                r'"?[^\s,"]+"?,"?[0-9 ]*"?,',  # any id, then a label-like field
                r'"?[^,"]+"?,"?[0-9 ]*"?,"',  # an id with spaces, labels, a quoted caption
            ]
        elif has_caption:
            looks.append(r'"?[^\s,"]+"?,"')  # any id, then a quoted caption
        self.row_like = re.compile("|".join(looks), re.IGNORECASE)

    def looks_like_row(self, line: str) -> bool:
        return self.row_like.match(line) is not None


def is_plain_file_name(image_id: str) -> bool:
    """True when `image_id` names a file directly inside a folder: no path separator, no
    '.'/'..', no NUL byte (so joining it onto the image folder stays inside that folder)."""
    return (bool(image_id) and image_id not in (".", "..")
            and not any(c in image_id for c in ("/", "\\", "\0")))


def csv_columns(path: str | os.PathLike[str]) -> tuple[bool, bool]:
    """(has a Labels column, has a Caption column) of a CSV file, from its header line."""
    path = Path(path)
    with path.open("rb") as f:
        first = f.readline()
    if not first.strip():
        raise CSVFormatError(path, 1, "", "the file is empty" if not first else
                             "the first line is blank",
                             f"Expected a header ({_EXPECTED_HEADERS}) on the first line")
    return _parse_header(path, _split_lines(_decode(first, path))[0][0])


def read_csv(path: str | os.PathLike[str]) -> list[Record]:
    """Read a COMP5329 Kaggle CSV file exactly.

    Accepts the header ``ImageID,Labels,Caption`` (train), ``ImageID,Caption`` (test; labels are
    ``()``) and ``ImageID,Labels`` (submission; captions are ``""``), with column names matched
    case-insensitively. Reads the Kaggle files as published (unescaped quotes inside quoted
    captions, multi-line captions, captions ending in ``/``) as well as standard CSV written by
    pandas or Python's ``csv`` module (doubled quotes, unquoted or fully quoted fields), with LF,
    CRLF or CR line endings, with or without a UTF-8 byte order mark and a final line break.
    Blank lines between rows are ignored.

    Args:
        path: the CSV file.

    Returns:
        The rows in file order.

    Raises:
        CSVFormatError: the file is empty, not UTF-8, has an unknown header, has a row that cannot
            be parsed (bad image id, non-integer label, wrong number of fields, unterminated
            quoted caption) or repeats an image id.
        OSError: the file cannot be read.
    """
    path = Path(path)
    lines, breaks = _split_lines(_decode(path.read_bytes(), path))
    if not any(line.strip() for line in lines):
        raise CSVFormatError(path, 1, "", "the file is empty",
                             f"Expected a header ({_EXPECTED_HEADERS}) followed by one row per image")
    grammar = _Grammar(*_parse_header(path, lines[0]))
    records = _parse_rows(path, lines, breaks, grammar, 1)
    if not records:
        raise CSVFormatError(path, 1, lines[0], "the file has a header but no rows",
                             "Expected one row per image after the header")
    return records


def _parse_rows(path: Path, lines: list[str], breaks: list[str], grammar: _Grammar,
                first: int) -> list[Record]:
    """Parse the rows in ``lines[first:]`` (the rows after the header, for read_csv).

    Separate from read_csv so that the writer can read a single row back with the very same code.
    """
    records: list[Record] = []
    first_line_of: dict[str, int] = {}
    i, n = first, len(lines)
    while i < n:
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        start = i + 1  # 1-based line number of this row
        image_id, labels, caption_field = _parse_row_start(path, start, line, grammar)
        if caption_field is None:
            caption = ""
            i += 1
        elif caption_field.startswith('"'):
            caption, i = _read_quoted_caption(path, lines, breaks, i, caption_field[1:], grammar)
        else:
            if "," in caption_field:
                raise CSVFormatError(
                    path, start, line, "too many fields: the unquoted caption contains a comma",
                    'Put the caption in double quotes ("...") or check the number of columns')
            caption = caption_field
            i += 1
        if image_id in first_line_of:
            raise CSVFormatError(
                path, start, line,
                f"duplicate image id {image_id!r} (first seen on line {first_line_of[image_id]})",
                "Each image may appear only once; remove or merge one of the two rows")
        first_line_of[image_id] = start
        records.append(Record(image_id, labels, caption, start))
    return records


def write_submission(
    path: str | os.PathLike[str],
    image_ids: Iterable[str],
    label_sets: Iterable[Iterable[int]],
) -> None:
    """Write a Kaggle submission file: header ``ImageID,Labels``, one row per image, in order.

    Labels are written space-separated in the order given (an empty set gives an empty field).
    The file is written to a temporary file beside ``path`` and then moved over it, so a reader
    never sees a half-written submission and a failure leaves any previous file untouched.

    Args:
        path: the file to write (its folder must exist).
        image_ids: image file names such as ``"30000.jpg"``; no duplicates.
        label_sets: one iterable of non-negative integer label ids per image.

    Raises:
        ValueError: the two inputs differ in length, are empty, or hold an invalid or duplicate
            image id or a negative label.
        TypeError: a label is not an integer.
    """
    path = Path(path)
    ids = list(image_ids)
    sets = list(label_sets)
    if len(ids) != len(sets):
        raise ValueError(f"got {len(ids)} image ids but {len(sets)} label sets; they must pair up")
    if not ids:
        raise ValueError("refusing to write a submission with no rows")
    rows = zip(ids, sets, itertools.repeat(""))
    atomic_write(path, _format_rows(rows, _Grammar(True, False)))


def write_csv(
    path: str | os.PathLike[str],
    records: Iterable[Record],
    *,
    labels: bool = True,
    captions: bool = True,
) -> None:
    """Write records in the competition's layout so that :func:`read_csv` reads them back exactly.

    The layout is ``ImageID,Labels,Caption`` (the default, as train.csv), ``ImageID,Caption``
    (``labels=False``, as test.csv) or ``ImageID,Labels`` (``captions=False``, a submission).
    Captions are written in double quotes as the competition does, inner quotes kept as they are
    (see :func:`format_csv` for the few that are written as standard CSV instead). Rows end in
    ``\\n``; line breaks inside captions are written unchanged. Like :func:`write_submission`, the
    file is replaced atomically and a failure leaves any previous file untouched.

    Args:
        path: the file to write (its folder must exist).
        records: the rows, in order; their ``line`` is ignored (it is where the row lands).
        labels: write a Labels column.
        captions: write a Caption column.

    Raises:
        ValueError: no rows, both columns switched off, an invalid or duplicate image id, a
            negative label, labels or a caption given for a column the layout does not have,
            text that is not valid Unicode, or a caption that the reader could not give back
            exactly; the message names the row (0-based index and image id) and why.
        TypeError: a label is not an integer or a caption is not a string.
    """
    text = format_csv(records, labels=labels, captions=captions)
    atomic_write(path, text)


def format_csv(records: Iterable[Record], *, labels: bool = True, captions: bool = True) -> str:
    """The text :func:`write_csv` writes, built without touching the disk.

    A caption is written between double quotes with its inner quotes as they are (the Kaggle
    style). Where :func:`read_csv` would read that back differently, every inner quote is doubled
    instead (standard CSV), which the reader un-doubles: that is needed when the caption happens
    to be valid standard CSV itself (``a""b`` would be read as ``a"b``), and it also keeps a
    caption line such as ``"7.jpg",...`` from looking like a new row. A caption that reads back
    wrongly both ways (in practice: a line of it looks like the start of a row) raises ValueError.
    Arguments and errors as for :func:`write_csv`.
    """
    if not (labels or captions):
        raise ValueError("a CSV file needs a Labels or a Caption column (or both)")
    rows = ((r.image_id, r.labels, r.caption) for r in records)
    return _format_rows(rows, _Grammar(labels, captions))


# Stands in for a file name in errors raised while a caption is read back in memory.
_ROW_CHECK = Path("<row being written>")


def _format_rows(rows: Iterable[tuple[str, Iterable[int], str]], grammar: _Grammar) -> str:
    """Header plus one line (or several, for a caption with line breaks) per (id, labels, caption).

    Checks every row so that the text reads back exactly under ``grammar``'s layout.
    """
    out = [grammar.columns + "\n"]
    seen: set[str] = set()
    for index, (image_id, labels, caption) in enumerate(rows):
        _check_image_id(index, image_id, grammar, seen)
        values = _label_values(index, image_id, labels)
        fields = [image_id]
        if grammar.has_labels:
            fields.append(" ".join(map(str, values)))
        elif values:  # the reader would give back () instead
            raise ValueError(f"row {index} ({image_id}): labels {values} given but the layout "
                             "has no Labels column; write with labels=True or drop them")
        if grammar.has_caption:
            row = _row_with_caption(index, fields, values, caption, grammar)
        elif caption != "":  # the reader would give back "" instead
            raise ValueError(f"row {index} ({image_id}): a caption is given but the layout has "
                             "no Caption column; write with captions=True or drop it")
        else:
            row = ",".join(fields)
        out.append(row + "\n")
    if len(out) == 1:  # read_csv rejects a file without rows
        raise ValueError("refusing to write a CSV file with no rows")
    return "".join(out)


def _check_image_id(index: int, image_id: object, grammar: _Grammar, seen: set[str]) -> None:
    """Raise ValueError unless ``image_id`` is an id that read_csv accepts and not yet used."""
    if not isinstance(image_id, str) or not grammar.image_id.fullmatch(image_id):
        raise ValueError(
            f"row {index}: invalid image id {image_id!r}; expected a file name such as "
            f"'30000.jpg' without spaces, commas or quotes")
    if not is_plain_file_name(image_id):  # the reader refuses these: see _parse_row_start
        raise ValueError(
            f"row {index}: image id {image_id!r} is not a plain file name (no '/', '\\', '..' "
            "or absolute path)")
    _check_utf8(image_id, f"row {index}: image id {image_id!r}")
    if image_id in seen:
        raise ValueError(f"row {index}: duplicate image id {image_id!r}")
    seen.add(image_id)


def _label_values(index: int, image_id: str, labels: Iterable[int]) -> tuple[int, ...]:
    """The labels as non-negative Python ints, else TypeError / ValueError naming the row."""
    values = []
    for label in labels:
        # operator.index accepts Python and numpy integers but rejects floats and strings,
        # which would otherwise be written as "3.0" or split into characters.
        if isinstance(label, bool):
            raise TypeError(f"row {index} ({image_id}): label {label!r} is not an integer")
        try:
            value = operator.index(label)
        except TypeError:
            raise TypeError(
                f"row {index} ({image_id}): label {label!r} is not an integer") from None
        if value < 0:
            raise ValueError(f"row {index} ({image_id}): label {value} is negative")
        values.append(value)
    return tuple(values)


def _check_utf8(text: str, what: str) -> None:
    """Lone surrogates cannot be encoded: fail here, naming the row, not in the middle of writing."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode text ({exc.reason} at character "
                         f"{exc.start})") from None


def _row_with_caption(index: int, fields: list[str], labels: tuple[int, ...], caption: str,
                      grammar: _Grammar) -> str:
    """The row: ``fields`` (the id and labels) plus a quoted caption that reads back exactly.

    The reader returns what lies between the quotes either as it is or, if every quote in it is
    doubled, un-doubled; so the Kaggle style and standard CSV are the only two ways to quote a
    caption, and if neither reads back there is none (an unquoted caption has to fit on one line,
    and a one-line caption always reads back in standard CSV).
    """
    image_id, prefix = fields[0], ",".join(fields)
    if not isinstance(caption, str):
        raise TypeError(f"row {index} ({image_id}): caption {caption!r} is not a string")
    _check_utf8(caption, f"row {index} ({image_id}): the caption")
    expected = [(image_id, labels, caption)]
    for content in (caption, caption.replace('"', '""')):
        row = f'{prefix},"{content}"'
        # Reading the row alone is reading it in the file: a caption ends at the first line
        # ending in a quote that is followed by the start of a row or by the end of the file,
        # and every row written here starts like a row.
        if _read_back(row, grammar) == expected:
            return row
    raise ValueError(f"row {index} ({image_id}): cannot write caption {caption[:_CLIP]!r} so that "
                     f"it reads back exactly: {_unreadable_reason(caption, grammar)}")


def _read_back(row: str, grammar: _Grammar) -> list[tuple[str, tuple[int, ...], str]] | None:
    """(id, labels, caption) of each record read_csv reads from ``row``; None if it raises."""
    lines, breaks = _split_lines(row)
    try:
        records = _parse_rows(_ROW_CHECK, lines, breaks, grammar, 0)
    except CSVFormatError:
        return None
    return [(r.image_id, r.labels, r.caption) for r in records]


def _unreadable_reason(caption: str, grammar: _Grammar) -> str:
    """Why a caption cannot be written: the first of its lines that looks like a row."""
    lines = _split_lines(caption)[0]
    for number, line in enumerate(lines[1:], start=2):
        # With quotes doubled (and the closing quote on the last line); both forms failed, and
        # the doubled one reads back un-doubled, so it failed on a line that looks like a row.
        written = line.replace('"', '""') + ('"' if number == len(lines) else "")
        if grammar.looks_like_row(written):
            return (f"its line {number} ({line[:_CLIP]!r}) looks like the start of a new row, "
                    "which the reader cannot tell apart from one")
    return "the reader would not give it back unchanged"  # not expected: see _row_with_caption


def _decode(raw: bytes, path: Path) -> str:
    """Decode UTF-8 (dropping a leading byte order mark); name the line of any bad byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_no = raw.count(b"\n", 0, exc.start) + 1
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        line_end = raw.find(b"\n", exc.start)
        bad = raw[line_start: line_end if line_end >= 0 else len(raw)]
        raise CSVFormatError(path, line_no, bad.decode("utf-8", errors="replace"),
                             f"the file is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                             "Save the file as UTF-8") from None


def _split_lines(text: str) -> tuple[list[str], list[str]]:
    """Split into physical lines and the line break after each ('' after the last line).

    Only CR LF, LF and CR count as line breaks (``str.splitlines`` would also split on form
    feeds, U+2028 and others, which belong to a caption). The breaks are kept so that a caption
    spanning lines gets back exactly the characters it had.
    """
    parts = re.split(r"(\r\n|\r|\n)", text)
    lines = parts[0::2]
    breaks = [*parts[1::2], ""]
    if len(lines) > 1 and lines[-1] == "":  # the file ends with a line break
        lines.pop()
        breaks.pop()
        breaks[-1] = ""
    return lines, breaks


def _parse_header(path: Path, header: str) -> tuple[bool, bool]:
    """Return (has labels, has caption) for an accepted header line, else raise."""
    names = tuple(name.strip().strip('"').strip().lower() for name in header.split(","))
    if names in _HEADERS:
        return _HEADERS[names]
    hint = f"Expected the header {_EXPECTED_HEADERS} on the first line"
    if names and names[0] in ("", "unnamed: 0"):
        hint += " (an extra first column is usually a pandas index: write with index=False)"
    raise CSVFormatError(path, 1, header, "unrecognised header", hint)


def _split_field(text: str) -> tuple[str, str | None] | None:
    """Split off the first field of ``text``, which cannot contain quotes or commas.

    Returns (field, rest after the comma or None at the end of the line), or None if a quoted
    field is not followed by a comma or the end of the line.
    """
    if text.startswith('"'):
        end = text.find('"', 1)
        if end < 0 or (end + 1 < len(text) and text[end + 1] != ","):
            return None
        rest = text[end + 2:] if end + 1 < len(text) else None
        return text[1:end], rest
    comma = text.find(",")
    if comma < 0:
        return text, None
    return text[:comma], text[comma + 1:]


def _parse_row_start(path: Path, line_no: int, line: str, grammar: _Grammar,
                     ) -> tuple[str, tuple[int, ...], str | None]:
    """Parse the image id and labels on the first line of a row.

    Returns (image id, labels, caption field as it starts on this line or None if the layout has
    no caption column).
    """
    field_hint = f"Each row needs the fields {grammar.columns}"

    split = _split_field(line)
    if split is None:
        raise CSVFormatError(path, line_no, line, "malformed quoted image id", field_hint)
    image_id, rest = split
    if grammar.image_id.fullmatch(image_id) and not is_plain_file_name(image_id):
        # One rule for every command: an id is joined onto the image folder, so a path in it
        # would read (or, for a writer, write) a file outside that folder.
        raise CSVFormatError(
            path, line_no, line, f"image id {image_id!r} is not a plain file name",
            "An ImageID names a file directly inside the image folder (e.g. 0.jpg): no '/', "
            "'\\', '..' or absolute path; move the image into the folder and use its name")
    if not grammar.image_id.fullmatch(image_id):
        # Only call it a bad id if the line is shaped like a row; otherwise it is more likely
        # stray text, such as an unquoted caption that continues on a second line.
        problem = (f"invalid image id {image_id!r}" if rest is not None and grammar.looks_like_row(line)
                   else "expected a new row starting with an image id")
        raise CSVFormatError(
            path, line_no, line, problem,
            f"A row starts with an image file name ending in .{', .'.join(IMAGE_EXTENSIONS)} "
            "(e.g. 0.jpg) and a comma; a caption that spans several lines must be quoted")
    if rest is None:
        raise CSVFormatError(path, line_no, line, "too few fields", field_hint)

    labels: tuple[int, ...] = ()
    if grammar.has_labels:
        split = _split_field(rest)
        if split is None:
            raise CSVFormatError(path, line_no, line, "malformed quoted labels field", field_hint)
        label_text, rest = split
        if not grammar.labels.fullmatch(label_text):
            raise CSVFormatError(
                path, line_no, line, f"labels field {label_text!r} is not integers",
                "Labels must be non-negative integers separated by spaces, e.g. '1 3' "
                "(or empty); check also the number of columns")
        labels = tuple(int(part) for part in label_text.split())
        if not grammar.has_caption:
            if rest is not None:
                raise CSVFormatError(path, line_no, line, "too many fields", field_hint)
            return image_id, labels, None
        if rest is None:
            raise CSVFormatError(path, line_no, line, "too few fields: no caption", field_hint)
    return image_id, labels, rest


def _read_quoted_caption(path: Path, lines: list[str], breaks: list[str], index: int,
                         body: str, grammar: _Grammar) -> tuple[str, int]:
    """Read a quoted caption that starts on ``lines[index]`` right after its opening quote.

    Returns (caption, index of the line after the row).
    """
    n = len(lines)
    parts = [body]
    current, j = body, index
    while True:
        if current.endswith('"') and _row_ends_after(lines, j, grammar):
            return _unquote("".join(parts)[:-1]), j + 1
        j += 1
        if j >= n:
            raise CSVFormatError(
                path, index + 1, lines[index],
                "the quoted caption starting on this line is not closed before the end of the file",
                f"{_CLOSE_HINT} and check {_line_range(index + 1, n)} (a quoted caption takes in "
                "every line up to one that ends with a closing quote)")
        if grammar.looks_like_row(lines[j]):
            raise CSVFormatError(
                path, index + 1, lines[index],
                f"the quoted caption starting on this line is not closed before the next row "
                f"on line {j + 1}",
                f"{_CLOSE_HINT} and check {_line_range(index + 1, j)}")
        parts += (breaks[j - 1], lines[j])
        current = lines[j]


def _line_range(first: int, last: int) -> str:
    return f"line {first}" if first == last else f"lines {first}-{last}"


def _row_ends_after(lines: list[str], j: int, grammar: _Grammar) -> bool:
    """True if the next non-blank line after ``lines[j]`` starts a row, or there is none."""
    k = j + 1
    while k < len(lines) and not lines[k].strip():
        k += 1
    return k == len(lines) or grammar.looks_like_row(lines[k])


def _unquote(content: str) -> str:
    """Undo standard CSV quote doubling, but only if the content is valid standard CSV.

    If any inner quote is not doubled the file is a Kaggle-style file whose quotes are literal
    text, so the content is returned unchanged.
    """
    if '"' not in content:
        return content
    if re.fullmatch(r'(?:[^"]|"")*', content, re.DOTALL):
        return content.replace('""', '"')
    return content


def train_csv_path(data_dir: Path) -> Path:
    """data_dir/train.csv, or an error saying what --data must be."""
    csv_path = data_dir / "train.csv"
    if not csv_path.exists():
        raise FileNotFoundError(f"{csv_path} not found: --data must be a Kaggle-layout folder "
                                f"(train.csv, data/*.jpg)")
    return csv_path
