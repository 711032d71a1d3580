"""Timing and memory figures shared by `mmtag bench` and `mmtag benchmark`."""

from __future__ import annotations

import resource
import time

import torch

# the pipeline keeps this share of the model step's rate or more: the model bounds the run
AT_THE_LIMIT = 0.85


def sync_device(device: torch.device) -> None:
    """Wait for the GPU's queued work (nothing on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn) -> float:
    sync_device(device)
    t = time.perf_counter()
    fn()
    sync_device(device)
    return time.perf_counter() - t


def bound_by(rates: dict) -> str:
    """What limits the whole pipeline: the model when it keeps AT_THE_LIMIT of the step's
    rate, else the data when loading alone is slower than the step, else the overhead between
    them (host synchronisation, launch latency, Python)."""
    if rates["whole"] >= AT_THE_LIMIT * rates["step"]:
        return "model"
    return "data" if rates["data"] < rates["step"] else "overhead"


def peak_mb(device: torch.device) -> float:
    """The device's peak allocated memory (CUDA), else the process's peak resident memory."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
