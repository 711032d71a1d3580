"""Seeds, devices and mixed precision: the few places that touch global torch state."""

from __future__ import annotations

import contextlib
import os
import platform
import random
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Precision:
    """The autocast dtype a run or a prediction computes in, and why it was chosen."""

    setting: str               # the config's amp: 'auto', 'bf16', 'fp16' or 'none'
    dtype: torch.dtype | None  # None: fp32 (no autocast)
    reason: str

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.dtype]

    def to_dict(self) -> dict:
        return {"amp": self.setting, "dtype": self.name, "reason": self.reason}


_NO_BF16 = "this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 runs slower than fp32"


def choose_precision(amp: str, device: torch.device) -> Precision:
    """What `amp` means on `device`. 'auto' never picks a mode measured slower than fp32:
    bf16 on CUDA and on CPUs with AMX (bf16 matrix tiles); fp32 on other CPUs: emulated bf16
    ran 2-10x slower than fp32 on an AVX2 CPU, and on a CPU with AVX512-BF16 but no AMX a bf16
    training step of the cpu recipe ran at 0.68x fp32's speed (docs/performance.md); and on
    MPS."""
    if amp == "auto":
        if device.type == "cuda":
            return Precision(amp, torch.bfloat16, "auto: bf16 on a CUDA GPU")
        if device.type != "cpu":
            return Precision(amp, None, f"auto: fp32 on {device.type}")
        kind = cpu_bf16_kind()
        if kind == "amx":
            return Precision(amp, torch.bfloat16, "auto: bf16, this CPU has AMX (bf16 matrix "
                                                  "tiles)")
        if kind == "avx512_bf16":
            return Precision(amp, None, "auto: fp32, this CPU has AVX512-BF16 but no AMX, where "
                                        "a bf16 training step measured 0.68x fp32's speed")
        return Precision(amp, None, f"auto: fp32, {_NO_BF16}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
    reason = f"amp={amp} set by the recipe"
    if device.type == "cpu" and dtype is not None and not cpu_has_fast_bf16():
        reason += " on a CPU without native bf16 (AVX512-BF16 or AMX): slower than fp32 here"
    return Precision(amp, dtype, reason)


def slow_precision_warning(precision: Precision, device: torch.device) -> str | None:
    """The warning for an explicit half precision on a CPU that only emulates it."""
    if device.type != "cpu" or precision.dtype is None or cpu_has_fast_bf16():
        return None
    return (f"amp={precision.setting} on a CPU without native bf16 (AVX512-BF16 or AMX): it "
            f"will run slower than fp32 here; use --set amp=auto (fp32 here) or amp=none")


def inference_precision(saved: str, device: torch.device) -> Precision:
    """The precision a prediction computes in, from the run's saved `amp`: a half precision
    chosen for the training machine is dropped where this machine would only emulate it, so
    a run trained with bf16 on an AMX server does not crawl on a laptop (fp32 is also the
    more exact of the two)."""
    chosen = choose_precision(saved, device)
    if slow_precision_warning(chosen, device) is None:
        return chosen
    return Precision(saved, None, f"the run's amp={saved} dropped for prediction: fp32, {_NO_BF16}")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `amp` on `device` (choose_precision says why)."""
    return choose_precision(amp, device).dtype


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matrix maths natively (AVX512-BF16 or AMX) and oneDNN may use
    it: explicit bf16 elsewhere is only emulated."""
    return bool(cpu_bf16_kind())


def cpu_bf16_kind() -> str:
    """'amx' (AMX bf16 tiles), 'avx512_bf16' (bf16 dot products, no AMX) or '' (bf16 is
    emulated) for this CPU, as oneDNN may use it. torch's own check alone is not enough: it is
    true on every AVX-512 CPU, where oneDNN only emulates bf16."""
    try:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return ""
    flags = _cpu_flags()
    if not supported:
        return ""
    if flags is None:  # no /proc/cpuinfo (macOS, Windows): torch's word, without AMX
        return "avx512_bf16"
    # ONEDNN_MAX_CPU_ISA caps what oneDNN runs (AVX2, AVX512_CORE, AVX512_CORE_BF16, ...)
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if "amx_bf16" in flags and (cap == "ALL" or "AMX" in cap):
        return "amx"
    if "avx512_bf16" in flags and (cap == "ALL" or any(k in cap for k in ("BF16", "FP16", "AMX"))):
        return "avx512_bf16"
    return ""


def _cpu_flags() -> set[str] | None:
    """The x86 feature flags of /proc/cpuinfo; None where it has none (not Linux, not x86)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


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
            "bf16_kind": cpu_bf16_kind() or "emulated",
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
