"""Atomic, durable file writes: the one way mmtag writes a file that a later command reads.

Each file is written to a temporary name in its own folder, flushed to disk (fsync), renamed
over the target (atomic on POSIX), and the folder is fsynced so the rename itself survives a
power cut. A reader, or a run resumed after a crash at any moment, therefore sees either the
previous complete file or the new complete one, never a part of one; a failure (a full disk, a
kill) leaves at most a `.name.*.tmp` file that nothing reads and the next write replaces.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

# what to write: bytes, text (UTF-8, written as given) or a function that writes to a binary file
Payload = bytes | bytearray | memoryview | str | Callable[[BinaryIO], None]

_NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class WriteError(OSError):
    """A file could not be written; the message names it and says what to do."""


def atomic_write(path: Path | str, payload: Payload) -> None:
    """Write `payload` to `path` atomically and durably (see the module docstring)."""
    atomic_write_many([(path, payload)])


def atomic_write_many(items: Sequence[tuple[Path | str, Payload]]) -> None:
    """Write several files that belong together: every one is staged (written and fsynced)
    before any is renamed into place, so a failure while writing (a full disk, an error) leaves
    all of them as they were, not one new and one old. The renames then follow one another at
    once; only a crash in the microseconds between two of them could separate the files."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, payload in items:
            staged.append((_stage(Path(path), payload), Path(path)))
        for tmp, path in staged:
            os.replace(tmp, path)
    except OSError as e:
        raise _explain(e, [Path(p) for p, _ in items]) from None
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    for folder in {path.parent for _, path in staged}:
        fsync_dir(folder)


def read_json(path: Path | str, hint: str = "use an intact copy of the run folder"):
    """A JSON file written through this module; a missing or damaged one is an error naming
    it and `hint` (what to do)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: {hint}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}); {hint}") from None


def is_temp_file(path: Path | str) -> bool:
    """A temporary file this module left behind when its process was killed mid-write:
    never read, replaced by the next write (`.name.XXXX.tmp`)."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(".tmp")


def fsync_dir(folder: Path | str) -> None:
    """Make a rename or a new file in `folder` durable (a no-op where folders cannot be
    opened, e.g. on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the file itself is already synced
    finally:
        os.close(fd)


def _stage(path: Path, payload: Payload) -> str:
    """The temporary file beside `path`, holding `payload`, synced to disk."""
    mode = _mode_for(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(payload, str):
                f.write(payload.encode("utf-8"))
            elif isinstance(payload, (bytes, bytearray, memoryview)):
                f.write(payload)
            else:
                payload(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def _read_umask() -> int:
    umask = os.umask(0)  # the umask can only be read by setting it; set it back at once
    os.umask(umask)
    return umask


# read once: os.umask is process-wide, so flipping it per write could race with other threads
_UMASK = _read_umask()


def _mode_for(path: Path) -> int:
    """The file's current permissions, or the usual ones for a new file (mkstemp's are 0600)."""
    with contextlib.suppress(FileNotFoundError):
        return path.stat().st_mode & 0o777
    return 0o666 & ~_UMASK


def _explain(e: OSError, paths: list[Path]) -> WriteError:
    if isinstance(e, WriteError):
        return e
    what = ", ".join(str(p) for p in paths)
    reason = e.strerror or str(e)
    if e.errno in _NO_SPACE:
        hint = ("free some disk space (or write somewhere else) and run the command again; "
                "nothing half-written was kept")
    else:
        hint = "check that the folder exists and is writable; nothing half-written was kept"
    err = WriteError(f"could not write {what}: {reason}; {hint}")
    err.errno = e.errno  # callers may still tell a full disk from other failures
    return err
