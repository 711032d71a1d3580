"""Atomic, durable file writes: the one way mmtag writes a file that a later command reads.

Each file is written to a temporary name in its own folder, flushed to disk (fsync), renamed
over the target (atomic on POSIX), and the folder is fsynced so the rename itself survives a
power cut. A reader, or a run resumed after a crash at any moment, therefore sees either the
previous complete file or the new complete one, never a part of one; a failure (a full disk, a
kill) leaves at most a `.name.PID-XXXX.tmp` file that nothing reads and the next write of that
file deletes (`remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import stat
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
            target = _target(Path(path))
            remove_stale_temps(target)
            staged.append((_stage(target, payload), target))
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


def _target(path: Path) -> Path:
    """Where a write to `path` lands: a symlink is followed (the file it points to is replaced,
    never the link); a folder or a special file (a device, a FIFO) is refused, never replaced by
    a regular file."""
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(mode):
        what = ("a folder" if stat.S_ISDIR(mode)
                else "a special file (a device, FIFO or socket)")
        err = WriteError(f"could not write {path}: it is {what}, not a regular file; give a "
                         f"file path")
        err.errno = errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL
        raise err
    return path


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


def remove_stale_temps(path: Path) -> None:
    """Delete the temporary files of `path` that writers killed mid-write left behind (their
    process is gone), so that the next write of a file cleans up after the last."""
    prefix = f".{path.name}."
    with contextlib.suppress(OSError):
        for p in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
            pid = p.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


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
    # the writer's process id in the name tells a file left by a killed process from one
    # being written (remove_stale_temps)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp",
                               dir=path.parent)
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


def new_file_mode() -> int:
    """The permissions of a new file under the user's umask (what `open` would give)."""
    return 0o666 & ~_UMASK


def _mode_for(path: Path) -> int:
    """The file's current permissions, or the usual ones for a new file (mkstemp's are 0600)."""
    with contextlib.suppress(FileNotFoundError):
        return path.stat().st_mode & 0o777
    return new_file_mode()


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


# -- folders written whole: staged beside their place, then swapped in --------------------------

_STAGE_TAG = ".stage-"


def staging_folder(out: Path | str) -> Path:
    """A new, empty folder beside `out` to build `out`'s files in (its name carries this
    process's id, so that a later command can tell a stage left by a killed process from one
    in use). Made with the user's umask, as `mkdir` would (mkdtemp alone gives 0700)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_stages(out)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}{_STAGE_TAG}{os.getpid()}-",
                                  dir=out.parent))
    os.chmod(stage, 0o777 & ~_UMASK)
    return stage


def remove_stale_stages(out: Path | str) -> list[Path]:
    """Delete the staging folders of `out` that processes killed mid-way left behind (their
    process is gone); returns them."""
    import shutil

    out = Path(out)
    gone = []
    if not out.parent.is_dir():
        return gone
    for p in out.parent.glob(f".{out.name}{_STAGE_TAG}*"):
        pid = p.name[len(out.name) + 1 + len(_STAGE_TAG):].split("-")[0]
        if p.is_dir() and not p.is_symlink() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def swap_in(stage: Path, out: Path) -> None:
    """`stage` (a complete folder) becomes `out` in one step; an earlier `out` is deleted
    after. On Linux the two folders are exchanged atomically (renameat2 RENAME_EXCHANGE), so
    a kill at any moment leaves the old folder or the new one, never neither; elsewhere two
    renames, with a moment between them in which `out` is missing."""
    import shutil

    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(stage, out)  # rename(2) replaces an empty folder
    elif _exchange(stage, out):
        shutil.rmtree(stage)  # it holds the earlier folder now
        return
    else:
        old = out.with_name(f".{out.name}{_STAGE_TAG}{os.getpid()}-old")
        os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old)
    fsync_dir(out.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2; False where it is not available."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        fsync_dir(b.parent)
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False  # a filesystem or kernel without it
    raise OSError(err, os.strerror(err), str(b))
