"""Seeds, devices and mixed precision: the few places that touch global torch state."""

from __future__ import annotations

import contextlib
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch

_IMPORTED = time.time()  # seconds_since_start's fallback where /proc is missing


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic() -> None:
    """Deterministic kernels where torch has them (slower; warns instead of failing otherwise),
    for the rest of the process: a run with `deterministic: true` asks for it."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def set_cudnn_autotuning(on: bool) -> None:
    """cuDNN's autotuning (`torch.backends.cudnn.benchmark`) for the rest of the process, as a
    run's `cudnn_benchmark` asks (the CLI's configure_training turns it on)."""
    torch.backends.cudnn.benchmark = on


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use device=cpu or auto")
    return dev


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: 'auto' is bf16 on CUDA and off elsewhere."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matrix maths natively (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_name() -> str:
    """The processor's marketing name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: torch.device) -> dict:
    """What a timing depends on, saved beside it (summary.json, the benchmark, the report): the
    same recipe caches and trains at different speeds on different CPUs of the same core
    count."""
    gpu = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    return {"cpu": cpu_name(), "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "fast_bf16": cpu_has_fast_bf16(),
            "device": str(device),
            "gpu": gpu.name if gpu is not None else None,
            "gpu_memory_gb": round(gpu.total_memory / 2**30, 1) if gpu is not None else None,
            "memory_gb": _memory_gb(), "os": platform.platform(),
            "torch": torch.__version__, "python": platform.python_version(),
            "packages": package_versions()}


# the packages whose versions a result depends on (torch is recorded on its own)
KEY_PACKAGES = ("mmtag", "torchvision", "transformers", "numpy", "pillow", "scipy",
                "lemminflect", "efficientnet-lite-pytorch")


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in KEY_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # not POSIX (Windows)
        return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def rng_state() -> dict:
    """Python, numpy and torch RNG states as plain data (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, key.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seconds_since_start() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere since mmtag.runtime was
    imported): the time a user waits from typing the command."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return time.time() - (boot + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time() - _IMPORTED
