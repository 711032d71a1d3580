"""Decoded, resized pixels of a dataset, kept on disk as one memory-mapped uint8 array.

Once the network runs on a GPU, decoding JPEGs every epoch is what limits training. Here each
image is decoded once, resized to `size` x `size` exactly as the eval transform's
`T.Resize((size, size), antialias=True)` does, and stored as row i of an (N, 3, size, size)
uint8 `.npy` file that a training loop can copy into GPU memory (or read from the page cache)
and augment on the GPU:

    <cache dir>/pixels-<size>px-<N>-<digest>.npy

* The name hashes the size, the format version and every image's resolved path, byte size and
  mtime: an edited, touched or replaced image makes a new file, never stale pixels. (A rewrite
  that keeps both the byte size and the mtime, as `cp -p` of a same-size file can, is not seen.)
* A build writes `.<name>.XXXX.tmp` beside the target, reserves its disk space first (so a full
  disk is an error before any decoding, not a SIGBUS from a memory-mapped write), fsyncs it and
  renames it into place: a killed build never leaves a file that looks like a cache, and the
  temp file of a dead build is removed by the next build in that folder. Processes building
  the same cache at once each rename a complete file; the last rename wins.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import math
import multiprocessing
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from mmtag.atomic import WriteError, fsync_dir
from mmtag.data.images import ImageReadError, load_image, to_rgb
from mmtag.outputs import is_regular_file

if TYPE_CHECKING:
    import torch

try:  # advisory locks mark a temp file whose builder is alive (POSIX only)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger("mmtag.data")

# bump when the stored pixels would change (resize method, layout); 2: EXIF orientation applied
PIXEL_FORMAT = 2
_CHUNK = 64               # images per task: IPC cost well below the decode time of 64 images
_GPU_BATCH = 64           # JPEG files decoded together on the GPU (bounds full-size memory)
_PROGRESS_EVERY_S = 10.0
_DEAD_TEMP_AGE_S = 60.0   # a newer temp may belong to a build that has not locked it yet
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST}


def default_pixel_dir() -> Path:
    """$MMTAG_CACHE_DIR/pixels if set, else ~/.cache/mmtag/pixels (beside the feature cache)."""
    env = os.environ.get("MMTAG_CACHE_DIR")
    return Path(env) / "pixels" if env else Path.home() / ".cache" / "mmtag" / "pixels"


def cache_bytes(n: int, size: int) -> int:
    """Bytes of the pixels of `n` images at `size` (the .npy header adds about 128 more)."""
    return n * 3 * size * size


def resize_uint8(image: Image.Image, size: int) -> np.ndarray:
    """RGB uint8 (3, size, size) of `image`, resized exactly as build_transform's
    `T.Resize((size, size), antialias=True)` resizes a PIL image, so these pixels are what the
    per-image pipeline feeds ToTensor."""
    if image.mode != "RGB":
        image = to_rgb(image)
    # torchvision hands a PIL image to PIL's bilinear filter, whose support widens when it
    # shrinks (that is its antialiasing), and returns an image already at the size unchanged
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))  # (H, W, 3) -> (3, H, W)


def pixel_cache(paths: Sequence[Path], where: Sequence[str], size: int,
                cache_dir: Path | None = None, *, workers: int = 0,
                progress: bool = False) -> np.ndarray:
    """Read-only uint8 memmap (N, 3, size, size) of the images at `paths`, in order.

    Built once into `cache_dir` (default: default_pixel_dir()) and reused while no image
    changes; see the module docstring for the file's name and how it is written. `workers` > 0
    decodes in that many processes, each writing its own rows of the file; 0 decodes here.
    `where[i]` says where paths[i] came from (e.g. 'train.csv line 12, 3.jpg'): a missing or
    undecodable image raises ImageReadError naming both, and leaves no cache file. `progress`
    logs a line every ~10 s while building."""
    paths, where = [Path(p) for p in paths], list(where)
    _check_args(paths, where, size, workers)
    shape = (len(paths), 3, size, size)
    if not paths:  # a memory map cannot be empty
        empty = np.empty(shape, np.uint8)
        empty.flags.writeable = False
        return empty
    folder = Path(cache_dir) if cache_dir is not None else default_pixel_dir()
    target = folder / _cache_name(size, paths, where)
    cached = _open_valid(target, shape)
    if cached is not None:
        return cached
    _build(target, paths, where, size, workers=workers, progress=progress)
    return np.lib.format.open_memmap(target, mode="r")


def decode_resized(paths: Sequence[Path], where: Sequence[str], size: int,
                   device: torch.device | str) -> torch.Tensor:
    """uint8 (N, 3, size, size) on `device`, for fast batch prediction. On CUDA, JPEG files are
    decoded with nvJPEG and resized on the GPU (bilinear, antialiased: another decoder and
    kernel, so close to PIL's pixels rather than equal); other formats, and every file on other devices, go
    through PIL and resize_uint8 (equal to pixel_cache's rows). Errors as pixel_cache."""
    import torch  # here, not at the top: building a pixel cache needs only numpy and PIL

    paths, where = [Path(p) for p in paths], list(where)
    _check_args(paths, where, size, workers=0)
    device = torch.device(device)
    if device.type == "cuda":
        return _decode_batched(paths, where, size, device)
    rows = np.empty((len(paths), 3, size, size), np.uint8)
    for i, (p, w) in enumerate(zip(paths, where, strict=True)):
        rows[i] = resize_uint8(load_image(p, w), size)
    return torch.from_numpy(rows).to(device)


# ---------------------------------------------------------------------------------------------
# The cache file: name, lookup, build
# ---------------------------------------------------------------------------------------------


def _check_args(paths: Sequence[Path], where: Sequence[str], size: int, workers: int) -> None:
    if len(where) != len(paths):
        raise ValueError(f"got {len(paths)} paths but {len(where)} `where` texts; "
                         f"give one per image")
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"image size must be a positive integer, got {size!r}")
    if workers < 0:
        raise ValueError(f"workers must be 0 (decode in this process) or more, got {workers}")


def _cache_name(size: int, paths: Sequence[Path], where: Sequence[str]) -> str:
    """The file name: a digest of the format, the size and each image's identity on disk.
    Stat is cheap where hashing every image's bytes (as the feature cache does) would read the
    whole dataset on each call. A missing image is an error naming it and `where`."""
    h = hashlib.sha1(f"mmtag pixels v{PIXEL_FORMAT} {size}\n".encode())
    for p, w in zip(paths, where, strict=True):
        real = p.resolve()
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise ImageReadError(f"image {p} ({w}) does not exist") from None
        except OSError as e:
            raise ImageReadError(f"image {p} ({w}) cannot be read: {e}") from None
        h.update(os.fsencode(real) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"pixels-{size}px-{len(paths)}-{h.hexdigest()[:20]}.npy"


def _open_valid(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cache at `path` opened read-only, or None when absent or not of `shape` (only a
    damaged disk or a hand-edited file can make one so: builds rename complete files)."""
    try:
        rows = np.lib.format.open_memmap(path, mode="r")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("pixel cache %s is unreadable (%s); building it again", path, e)
        return None
    if rows.shape != shape or rows.dtype != np.uint8:
        log.warning("pixel cache %s holds %s %s, not uint8 %s; building it again",
                    path, rows.dtype, rows.shape, shape)
        return None
    return rows


def _build(target: Path, paths: Sequence[Path], where: Sequence[str], size: int, *,
           workers: int, progress: bool) -> None:
    """Decode every image into a locked temp file beside `target`, then rename it into place."""
    folder, n, t0 = target.parent, len(paths), time.perf_counter()
    fd, tmp = _new_temp(folder, target.name)
    try:
        _allocate(tmp, fd, (n, 3, size, size))
        _fill(tmp, paths, where, size, workers, progress)
        os.fsync(fd)  # the pixels reach the disk before the name does
        os.replace(tmp, target)
    except ImageReadError:
        raise
    except OSError as e:
        raise _write_error(e, folder, cache_bytes(n, size)) from None
    finally:
        os.close(fd)  # releases the lock
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a failed build's temp; gone already after the rename
    fsync_dir(folder)
    dt = time.perf_counter() - t0
    log.info("cached %d images at %d px (%.0f MB) in %.1f s (%.0f images/s) into %s",
             n, size, cache_bytes(n, size) / 1e6, dt, n / max(dt, 1e-9), target)


def _new_temp(folder: Path, name: str) -> tuple[int, str]:
    """A new temp file for `name` in `folder`, locked while this process lives; temp files left
    by dead builds are removed first (each reserved a whole cache's worth of disk)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_dead_temps(folder)
        # not mkstemp: its files are 0600, and a cache folder may be shared; umask applies here
        tmp = str(folder / f".{name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise _write_error(e, folder, 0) from None
    if fcntl is not None:
        with contextlib.suppress(OSError):  # a filesystem without locks: nothing is cleaned up
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd, tmp


def _remove_dead_temps(folder: Path) -> None:
    """Delete the pixel-cache temp files in `folder` that no live process holds locked."""
    if fcntl is None:
        return
    for tmp in folder.glob(".pixels-*.npy.*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime < _DEAD_TEMP_AGE_S:
                continue
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken: its builder is gone
        except OSError:
            continue  # held by a build still running
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        log.info("removed %s, left by an interrupted pixel-cache build", tmp)


def _allocate(tmp: str, fd: int, shape: tuple[int, ...]) -> None:
    """Write the .npy header and reserve the file's blocks. Pages of a memory map get their
    blocks when first written, and a full disk then kills the process with SIGBUS instead of
    raising; reserving up front turns it into an OSError before any decoding."""
    np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    nbytes = os.fstat(fd).st_size
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, nbytes)
            return
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
    # the filesystem cannot reserve space: at least refuse a build that cannot fit
    if shutil.disk_usage(os.path.dirname(tmp)).free < nbytes:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)


def _fill(tmp: str, paths: Sequence[Path], where: Sequence[str], size: int, workers: int,
          progress: bool) -> None:
    """Decode every image into its row of the temp file, here or in `workers` processes."""
    n = len(paths)
    chunk = _CHUNK if workers == 0 else max(1, min(_CHUNK, math.ceil(n / (4 * workers))))
    tasks = [(tmp, s, [str(p) for p in paths[s:s + chunk]], where[s:s + chunk], size)
             for s in range(0, n, chunk)]
    tick = _Progress(n, progress)
    if workers == 0 or len(tasks) == 1:
        for task in tasks:
            tick(_decode_rows(task))
        return
    # the platform's default start method, as torch's DataLoader: workers use only numpy and
    # PIL, so a fork is safe even from a process holding CUDA, and unlike spawn it does not
    # re-run a calling script that lacks an `if __name__ == "__main__":` guard
    with multiprocessing.Pool(min(workers, len(tasks))) as pool:
        for done in pool.imap_unordered(_decode_rows, tasks):
            tick(done)


def _decode_rows(task: tuple[str, int, list[str], list[str], int]) -> int:
    """Decode a run of images into rows [start, start + len) of the file; their count. Runs in
    worker processes too: each maps the file itself, so no pixels are pickled."""
    file, start, paths, where, size = task
    rows = np.lib.format.open_memmap(file, mode="r+")
    for i, (p, w) in enumerate(zip(paths, where, strict=True)):
        rows[start + i] = resize_uint8(load_image(p, w), size)
    rows.flush()
    return len(paths)


class _Progress:
    """Counts decoded images; with `enabled`, logs the count, rate and ETA every ~10 s."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done = total, enabled, 0
        self.t0 = self.last = time.perf_counter()

    def __call__(self, k: int) -> None:
        self.done += k
        now = time.perf_counter()
        if self.enabled and self.done < self.total and now - self.last >= _PROGRESS_EVERY_S:
            rate = self.done / max(now - self.t0, 1e-9)
            log.info("pixel cache: %d/%d images (%.1f/s, ETA %.0f s)", self.done, self.total,
                     rate, (self.total - self.done) / rate)
            self.last = now


def _write_error(e: OSError, folder: Path, nbytes: int) -> WriteError:
    """A failure to write the cache, as a message that names the folder and the way out."""
    reason = e.strerror or str(e)
    elsewhere = "or choose another folder with $MMTAG_CACHE_DIR (or cache_dir)"
    if e.errno in _NO_SPACE:
        need = f" ({nbytes:,} bytes, {nbytes / 1e6:.0f} MB)" if nbytes else ""
        msg = (f"not enough disk space in {folder} for the pixel cache{need}: {reason}; free "
               f"some space {elsewhere}; nothing half-written was kept")
    elif e.errno in _NOT_WRITABLE:
        msg = (f"cannot write the pixel cache in {folder}: {reason}; make the folder "
               f"writable {elsewhere}")
    else:
        msg = f"could not write the pixel cache in {folder}: {reason}; nothing half-written was kept"
    err = WriteError(msg)
    err.errno = e.errno  # callers may still tell a full disk from other failures
    return err


# ---------------------------------------------------------------------------------------------
# Batch decoding on a device (prediction)
# ---------------------------------------------------------------------------------------------


def _decode_batched(paths: Sequence[Path], where: Sequence[str], size: int, device):
    """(N, 3, size, size) uint8 on `device`: JPEG files through torchvision's decode_jpeg on
    `device` (nvJPEG on CUDA) in batches, the rest through PIL; resized on `device`."""
    import torch

    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8, device=device)
    for s in range(0, len(paths), _GPU_BATCH):
        jpegs = []  # (row, file bytes); bytes read per batch to bound host memory
        for i in range(s, min(s + _GPU_BATCH, len(paths))):
            data = _read_bytes(paths[i], where[i])
            # the JPEG signature, whatever the name; one with EXIF data goes through PIL, which
            # turns it upright and bounds its decoding (nvJPEG on CUDA ignores orientation)
            if (data[:3].tolist() == [0xFF, 0xD8, 0xFF]
                    and b"exif" not in data[:1 << 16].numpy().tobytes().lower()):
                jpegs.append((i, data))
            else:
                out[i] = torch.from_numpy(resize_uint8(load_image(paths[i], where[i]), size))
        images = _decode_jpegs(jpegs, paths, where, device)
        for (i, _), image in zip(jpegs, images, strict=True):
            out[i] = _resize_tensor(image, size)
    return out


def _read_bytes(path: Path, where: str):
    """A file's bytes as a uint8 tensor, or ImageReadError naming it and `where`."""
    import torch

    if path.exists() and not is_regular_file(path):  # a FIFO would block the read forever
        raise ImageReadError(f"image {path} ({where}) is not a regular file (a folder, FIFO, "
                             f"device or socket); it was not opened")
    try:
        return torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    except FileNotFoundError:
        raise ImageReadError(f"image {path} ({where}) does not exist") from None
    except OSError as e:
        raise ImageReadError(f"image {path} ({where}) cannot be read: {e}") from None


def _decode_jpegs(jpegs, paths: Sequence[Path], where: Sequence[str], device) -> list:
    """(3, H, W) uint8 RGB tensors on `device` of the (row, bytes) JPEG files."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not jpegs:
        return []
    try:
        return decode_jpeg([d for _, d in jpegs], mode=ImageReadMode.RGB, device=device,
                           apply_exif_orientation=True)
    except RuntimeError:
        pass  # one bad file fails the whole batch: decode them one by one to find it
    images = []
    for i, data in jpegs:
        try:
            images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device,
                                      apply_exif_orientation=True))
        except RuntimeError:
            # nvJPEG refuses some files PIL reads (CMYK, 12-bit); PIL names a really bad one
            images.append(_pil_tensor(load_image(paths[i], where[i])).to(device))
    return images


def _pil_tensor(image: Image.Image):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))


def _resize_tensor(image, size: int):
    """(3, H, W) uint8 -> (3, size, size) uint8 by antialiased bilinear interpolation, on the
    tensor's device; rounded like torchvision's tensor Resize."""
    import torch.nn.functional as F

    if tuple(image.shape[-2:]) == (size, size):
        return image
    x = F.interpolate(image[None].float(), size=(size, size), mode="bilinear",
                      align_corners=False, antialias=True)
    return x[0].round_().clamp_(0, 255).to(image.dtype)
