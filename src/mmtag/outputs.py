"""Where a command may write: the one rule every mmtag command applies to the paths it is given.

An output is a regular file (or a path that does not exist yet) that is not one of the command's
inputs, not a file of a run folder or of an export, and not a special file (a device, a FIFO, a
socket). A symlink is followed: the file it points to is checked by the same rule and written
(as `cp` does); the link itself is never replaced. Checked before any work starts, so a refused
command has written nothing.

The names of a run folder's files are mmtag.run_files'; an export folder's and a report's are
listed here, so that this rule, `mmtag demo` and the code writing them agree on them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from mmtag.run_files import RUN_FILES, is_run_folder

REPORT_FILES = frozenset({"report.md", "report.html"})
EXPORT_FILES = frozenset({"model.json", "model.onnx", "model-int8.onnx"})
# the files of an input image folder that an output may never replace
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff",
                            ".mpo", ".heic"})


class OutputPathError(ValueError):
    """An output path that would destroy something: the message names it and says why."""


def check_output(path: Path | str, flag: str, inputs: dict[str, Path | str] | None = None,
                 input_dirs: Iterable[Path | str] = ()) -> Path:
    """The file to write for the output `path` (given as `flag`, e.g. '--out'): `path` itself, or
    what it links to. Refused (OutputPathError) when it is a folder or a special file, one of
    `inputs` ({what it is, e.g. '--csv': path}), a file already in one of `input_dirs` (e.g. a
    photo of the image folder), or a file of a run or export folder."""
    given = Path(path)
    target = Path(os.path.realpath(given))
    via = f" (the link {given} points to it)" if given.is_symlink() else ""
    try:
        st = target.stat()
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputPathError(f"{flag} {given} cannot be checked: {e.strerror}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputPathError(f"{flag} {given} is a folder{via}; give a file path for {flag}")
        if not stat.S_ISREG(st.st_mode):
            raise OutputPathError(f"{flag} {given}{via} is a special file ({_kind(st.st_mode)}), "
                                  f"not a regular one; give a file path for {flag}")
        for what, inp in (inputs or {}).items():
            if _same_file(st, inp):
                raise OutputPathError(f"{flag} {given}{via} is also {what} {inp}, an input: "
                                      f"writing it would replace that file; give {flag} "
                                      f"another path")
        for folder in input_dirs:
            if _is_inside(target, folder) and target.suffix.lower() in IMAGE_SUFFIXES:
                raise OutputPathError(f"{flag} {given}{via} is a photo of the input folder "
                                      f"{folder}: writing it would replace it; give another "
                                      f"path")
        guarded = guarded_by(target)
        if guarded:
            raise OutputPathError(f"{flag} {given}{via} is a file of {guarded}: writing it would "
                                  f"break it; give a path outside it")
    return target


def guarded_by(path: Path) -> str:
    """What `path` (a file) belongs to when it is a run's or an export's own file: "the run
    folder X", "the export X", or ""."""
    folder, name = path.parent, path.name
    if name in RUN_FILES | REPORT_FILES and is_run_folder(folder):
        return f"the run folder {folder}"
    if name in EXPORT_FILES and (folder / "model.json").exists():
        return f"the export {folder}"
    if name in EXPORT_FILES | {"tokenizer.json", "vocab.txt"} and folder.parent.name == "export":
        return f"the export {folder.parent}"
    return ""


def _same_file(st: os.stat_result, other: Path | str) -> bool:
    try:
        o = os.stat(other)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (o.st_dev, o.st_ino)  # hard links and symlinks too


def _is_inside(target: Path, folder: Path | str) -> bool:
    root = Path(os.path.realpath(folder))
    return root in target.parents


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_distinct(outputs: dict[str, Path | None]) -> None:
    """Two outputs of one command that are the same file: the second would replace the first."""
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        key = Path(os.path.realpath(path))
        if key in seen:
            raise OutputPathError(f"{flag} {path} is also {seen[key]}: give {flag} another path")
        seen[key] = flag


def check_output_folder(folder: Path | str, flag: str, inputs: Iterable[Path | str] = ()) -> Path:
    """A folder a command writes its files into (report, compare, export): not a file or a
    special file, and not one of the command's input folders."""
    given = Path(folder)
    target = Path(os.path.realpath(given))
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{flag} {given} is a file, not a folder; give a folder for {flag}")
    for inp in inputs:
        if target == Path(os.path.realpath(inp)):
            raise OutputPathError(f"{flag} {given} is an input folder of this command ({inp}); "
                                  f"give another folder")
    return target


def is_regular_file(path: Path | str) -> bool:
    """Whether `path` is a regular file (a symlink to one counts): what mmtag ever opens to
    read. A FIFO would block the reader forever, a device would be read without end."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False
