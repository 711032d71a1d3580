"""Process-wide settings mmtag's commands run with, made by an explicit call (the CLI's first
step), never as a side effect of importing or training. No torch import at module level: the
OpenMP setting must be in the environment before torch loads."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger("mmtag")
_ALLOCATOR_TUNED = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system.

    By default every allocation over 128 KB is a fresh mmap that is unmapped again when freed, so
    each training step on the CPU maps, page-faults (zeroes) and unmaps its large activations
    anew: measured here on the cpu recipe's step (PyTorch on Linux), 5.6 of 19 CPU-seconds went to
    the kernel and a step took 0.49 s; with allocations up to 256 MB served from the heap and no
    trimming, 0.4 s of kernel time and 0.34 s per step (docs/experiments.md). The cost: the
    process keeps its peak heap instead of shrinking after it. Only on Linux with glibc; a no-op
    elsewhere or with MMTAG_MALLOC=default in the environment. Returns whether it applied.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("MMTAG_MALLOC") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    ok = mallopt(m_mmap_threshold, 256 << 20) == 1 and mallopt(m_trim_threshold, 1 << 30) == 1
    _ALLOCATOR_TUNED = ok
    log.debug("malloc: keep freed memory %s", "on" if ok else "not available")
    return ok


def configure_process() -> None:
    """What `mmtag` sets for itself before anything else (no torch import: `mmtag --help` and
    check-data stay instant); library users may call it first too.

    - OMP_WAIT_POLICY=PASSIVE (unless set): OpenMP threads that spin while waiting make torch
      many times slower when DataLoader workers share a small machine's cores. Applies only if
      torch has not been imported yet.
    - `keep_freed_memory()`: large CPU tensors reuse heap memory.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    keep_freed_memory()


def configure_training() -> None:
    """For a process that trains (`mmtag train`, `mmtag demo`; API users call it themselves):
    `configure_process()`, and cuDNN autotuning (`torch.backends.cudnn.benchmark`), since the
    training inputs have fixed sizes, so the fastest convolution kernels are found once and
    reused. A run with `deterministic: true` turns autotuning off again."""
    configure_process()
    import torch

    torch.backends.cudnn.benchmark = True
