"""The decoded-pixel cache: pixels equal to the per-image pipeline's, built once, never stale,
never half-written, and errors that name the image and the folder."""

import errno
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mmtag.atomic import WriteError
from mmtag.data import pixel_cache as pc
from mmtag.data.images import ImageReadError, load_image

SIZE = 16


def _write_images(folder):
    """Tiny images of the kinds a dataset holds: RGB and greyscale JPEG, RGB, greyscale,
    16-bit and RGBA PNG, and one already at the cache size (no resize)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    grey = rng.integers(0, 256, (40, 33), dtype=np.uint8)
    images = {
        "a.jpg": Image.fromarray(rgb(23, 37)),
        "b.png": Image.fromarray(rgb(30, 20)),
        "grey.jpg": Image.fromarray(grey, "L"),
        "grey.png": Image.fromarray(grey, "L"),
        "deep.png": Image.fromarray(rng.integers(0, 65536, (24, 18), dtype=np.uint16)),
        "alpha.png": Image.fromarray(rng.integers(0, 256, (12, 9, 4), dtype=np.uint8), "RGBA"),
        "exact.png": Image.fromarray(rgb(SIZE, SIZE)),
    }
    for name, im in images.items():
        im.save(folder / name)
    paths = [folder / name for name in images]
    return paths, [f"train.csv line {i + 2}, {p.name}" for i, p in enumerate(paths)]


@pytest.fixture
def data(tmp_path):
    return _write_images(tmp_path / "images")


def _reference(path, size=SIZE):
    """What the per-image pipeline feeds ToTensor, as (3, H, W) uint8."""
    return np.asarray(T.Resize((size, size), antialias=True)(load_image(path))).transpose(2, 0, 1)


def _files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_rows_equal_the_per_image_pipeline(data, tmp_path):
    paths, where = data
    assert Image.open(paths[4]).mode.startswith("I")  # the 16-bit PNG really is 16-bit
    rows = pc.pixel_cache(paths, where, SIZE, tmp_path / "cache")
    assert rows.shape == (len(paths), 3, SIZE, SIZE) and rows.dtype == np.uint8
    assert rows.nbytes == pc.cache_bytes(len(paths), SIZE)
    for p, row in zip(paths, rows, strict=True):
        np.testing.assert_array_equal(row, _reference(p), err_msg=p.name)
    files = _files(tmp_path / "cache")
    assert len(files) == 1 and files[0].endswith(".npy") and not files[0].startswith(".")
    with pytest.raises(ValueError, match="read-only"):
        rows[0, 0, 0, 0] = 1


def test_built_once_then_reused_until_an_image_changes(data, tmp_path, monkeypatch, caplog):
    paths, where = data
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="mmtag.data"):
        first = np.array(pc.pixel_cache(paths, where, SIZE, cache))
    assert any(f"cached {len(paths)} images at {SIZE} px" in m for m in caplog.messages)
    (built,) = cache.iterdir()
    stamp = built.stat().st_mtime_ns

    def no_decoding(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(pc, "load_image", no_decoding)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mmtag.data"):
        np.testing.assert_array_equal(pc.pixel_cache(paths, where, SIZE, cache), first)
    assert not caplog.messages and built.stat().st_mtime_ns == stamp
    monkeypatch.undo()

    # a touched image: same pixels, new file (mtime is part of the key)
    st = paths[1].stat()
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    np.testing.assert_array_equal(pc.pixel_cache(paths, where, SIZE, cache), first)
    assert len(_files(cache)) == 2
    # a replaced image: new file, new pixels in its row only
    Image.new("RGB", (50, 10), (255, 0, 0)).save(paths[0])
    third = pc.pixel_cache(paths, where, SIZE, cache)
    assert len(_files(cache)) == 3
    np.testing.assert_array_equal(third[0], _reference(paths[0]))
    np.testing.assert_array_equal(third[1:], first[1:])
    # another size: another file
    assert pc.pixel_cache(paths, where, 8, cache).shape == (len(paths), 3, 8, 8)


def test_workers_give_the_same_rows(data, tmp_path, monkeypatch, caplog):
    paths, where = data
    monkeypatch.setattr(pc, "_CHUNK", 2)
    monkeypatch.setattr(pc, "_PROGRESS_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="mmtag.data"):
        serial = pc.pixel_cache(paths, where, SIZE, tmp_path / "serial", progress=True)
    assert any("pixel cache: 2/7 images" in m for m in caplog.messages)  # progress lines
    parallel = pc.pixel_cache(paths, where, SIZE, tmp_path / "parallel", workers=2)
    np.testing.assert_array_equal(parallel, serial)
    assert _files(tmp_path / "serial") == _files(tmp_path / "parallel")  # same key, same name


@pytest.mark.parametrize("workers", [0, 2])
def test_missing_or_corrupt_image_names_its_row_and_leaves_nothing(data, tmp_path, workers):
    paths, where = data
    cache = tmp_path / "cache"
    with pytest.raises(ImageReadError, match=r"gone\.jpg \(train\.csv line 9, gone\.jpg\) does not exist"):
        pc.pixel_cache([*paths, paths[0].with_name("gone.jpg")], [*where, "train.csv line 9, gone.jpg"],
                       SIZE, cache, workers=workers)
    bad = paths[0].with_name("bad.jpg")
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageReadError, match=r"bad\.jpg \(val\.csv line 4, bad\.jpg\) cannot be decoded"):
        pc.pixel_cache([*paths, bad], [*where, "val.csv line 4, bad.jpg"], SIZE, cache,
                       workers=workers)
    assert _files(cache) == []  # no cache, no temp file


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_interrupted_build_leaves_no_cache_and_next_builds_fully(data, tmp_path, monkeypatch,
                                                                failure):
    paths, where = data
    cache = tmp_path / "cache"
    monkeypatch.setattr(pc, "_CHUNK", 2)  # rows of the first chunks reach the file first
    calls = []

    def dies_midway(path, where=""):
        calls.append(path)
        if len(calls) == 4:
            raise failure("decoder died")  # a bug, or Ctrl-C: no error the module handles
        return load_image(path, where)

    monkeypatch.setattr(pc, "load_image", dies_midway)
    with pytest.raises(failure):
        pc.pixel_cache(paths, where, SIZE, cache)
    assert _files(cache) == []
    monkeypatch.undo()
    rows = pc.pixel_cache(paths, where, SIZE, cache)
    for p, row in zip(paths, rows, strict=True):
        np.testing.assert_array_equal(row, _reference(p))


def test_temp_files_of_dead_builds_are_removed_live_ones_kept(data, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    paths, where = data
    cache = tmp_path / "cache"
    cache.mkdir()
    dead, live, young = (cache / f".pixels-8px-1-abc.npy.{k}.tmp" for k in ("dead", "live", "young"))
    for f in (dead, live, young):
        f.write_bytes(b"\0" * 100)
    for f in (dead, live):
        os.utime(f, (1e9, 1e9))  # 2001: long past the grace period
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a build still running holds its temp locked
        pc.pixel_cache(paths, where, SIZE, cache)
        names = _files(cache)
    finally:
        os.close(fd)
    assert dead.name not in names and live.name in names and young.name in names


def test_concurrent_builds_both_end_with_a_valid_cache(data, tmp_path, monkeypatch):
    paths, where = data
    cache = tmp_path / "cache"
    both_filled = threading.Barrier(2, timeout=20)
    fill = pc._fill

    def fill_then_wait(*args):
        fill(*args)
        both_filled.wait()  # both builds are complete but neither renamed yet: a real race

    monkeypatch.setattr(pc, "_fill", fill_then_wait)
    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda _: np.array(pc.pixel_cache(paths, where, SIZE, cache)), [0, 1]))
    for rows in results:
        for p, row in zip(paths, rows, strict=True):
            np.testing.assert_array_equal(row, _reference(p))
    assert len(_files(cache)) == 1  # one cache, no temp file of the loser


@pytest.mark.parametrize("reserve", ["fallocate", "no fallocate"])
def test_full_disk_is_a_clear_error_and_leaves_nothing(data, tmp_path, monkeypatch, reserve):
    paths, where = data
    cache = tmp_path / "cache"

    def fallocate(fd, offset, length):
        raise OSError(errno.ENOSPC if reserve == "fallocate" else errno.EOPNOTSUPP, "no")

    monkeypatch.setattr(pc.os, "posix_fallocate", fallocate, raising=False)
    monkeypatch.setattr(pc.shutil, "disk_usage", lambda p: SimpleNamespace(free=100))
    with pytest.raises(OSError, match="not enough disk space") as e:
        pc.pixel_cache(paths, where, SIZE, cache)
    msg = str(e.value)
    assert f"{pc.cache_bytes(len(paths), SIZE):,} bytes" in msg and str(cache) in msg
    assert "MMTAG_CACHE_DIR" in msg and e.value.errno == errno.ENOSPC
    assert _files(cache) == []


def test_unwritable_folder_is_a_clear_error(data, tmp_path):
    paths, where = data
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(WriteError, match=r"cannot write the pixel cache in .*not-a-folder.*MMTAG_CACHE_DIR"):
        pc.pixel_cache(paths, where, SIZE, blocker / "pixels")


def test_damaged_cache_file_is_rebuilt(data, tmp_path, caplog):
    paths, where = data
    cache = tmp_path / "cache"
    first = np.array(pc.pixel_cache(paths, where, SIZE, cache))
    (built,) = cache.iterdir()
    built.write_bytes(built.read_bytes()[:500])  # truncated by a failing disk
    with caplog.at_level(logging.WARNING, logger="mmtag.data"):
        np.testing.assert_array_equal(pc.pixel_cache(paths, where, SIZE, cache), first)
    assert any("building it again" in m for m in caplog.messages)


def test_default_folder_follows_mmtag_cache_dir(data, tmp_path, monkeypatch):
    monkeypatch.setenv("MMTAG_CACHE_DIR", str(tmp_path / "store"))
    assert pc.default_pixel_dir() == tmp_path / "store" / "pixels"
    paths, where = data
    pc.pixel_cache(paths[:2], where[:2], SIZE)
    assert len(_files(tmp_path / "store" / "pixels")) == 1
    monkeypatch.delenv("MMTAG_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert pc.default_pixel_dir() == tmp_path / "home" / ".cache" / "mmtag" / "pixels"


def test_bad_arguments_and_empty_input(data, tmp_path):
    paths, where = data
    with pytest.raises(ValueError, match="7 paths but 6"):
        pc.pixel_cache(paths, where[:-1], SIZE, tmp_path)
    with pytest.raises(ValueError, match="positive integer"):
        pc.pixel_cache(paths, where, 0, tmp_path)
    with pytest.raises(ValueError, match="workers"):
        pc.pixel_cache(paths, where, SIZE, tmp_path, workers=-1)
    empty = pc.pixel_cache([], [], SIZE, tmp_path / "cache")
    assert empty.shape == (0, 3, SIZE, SIZE) and not empty.flags.writeable
    assert pc.cache_bytes(10, 256) == 10 * 3 * 256 * 256


def test_decode_resized_on_cpu_equals_the_cache(data, tmp_path):
    paths, where = data
    rows = pc.pixel_cache(paths, where, SIZE, tmp_path / "cache")
    x = pc.decode_resized(paths, where, SIZE, torch.device("cpu"))
    assert x.dtype == torch.uint8 and x.device.type == "cpu"
    np.testing.assert_array_equal(x.numpy(), rows)
    png = pc.decode_resized(paths[1:2], where[1:2], SIZE, "cpu")  # a PNG alone
    np.testing.assert_array_equal(png.numpy()[0], _reference(paths[1]))
    with pytest.raises(ImageReadError, match=r"\(test\.csv line 3, x\.jpg\) does not exist"):
        pc.decode_resized([tmp_path / "x.jpg"], ["test.csv line 3, x.jpg"], SIZE, "cpu")


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29
def test_batched_decoder_is_close_to_pil(data, tmp_path, monkeypatch):
    """The CUDA path's logic (batched decode_jpeg, tensor resize), run here on the CPU:
    another JPEG decoder and resize kernel, so close to PIL's pixels rather than equal."""
    paths, where = data
    monkeypatch.setattr(pc, "_GPU_BATCH", 3)  # several batches, mixing JPEG and PNG
    x = pc._decode_batched(paths, where, SIZE, torch.device("cpu"))
    ref = np.stack([_reference(p) for p in paths]).astype(int)
    diff = np.abs(x.numpy().astype(int) - ref)
    assert diff.mean() < 0.5 and diff.max() <= 2, (diff.mean(), diff.max())  # measured: 0.18, 1
    bad = paths[0].with_name("bad.jpg")
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageReadError, match=r"\(row 5\) cannot be decoded"):
        pc._decode_batched([paths[0], bad], ["row 4", "row 5"], SIZE, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29
def test_decode_resized_on_cuda_is_close_to_the_cache(data, tmp_path):
    paths, where = data
    rows = pc.pixel_cache(paths, where, SIZE, tmp_path / "cache")
    x = pc.decode_resized(paths, where, SIZE, torch.device("cuda"))
    assert x.dtype == torch.uint8 and x.device.type == "cuda" and x.shape == rows.shape
    # nvJPEG's IDCT and chroma upsampling differ from libjpeg's, most on these noise images;
    # a swapped channel, a transposed or mis-scaled image would be off by tens on average
    diff = np.abs(x.cpu().numpy().astype(int) - rows.astype(int))
    assert diff.mean() < 3.0, (diff.mean(), diff.max())
    np.testing.assert_array_equal(x.cpu().numpy()[1], rows[1])  # a PNG goes through PIL
