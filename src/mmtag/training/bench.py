"""`mmtag bench train`: where a recipe's training time goes on this machine.

Three rates in images/s at the recipe's batch: the data pipeline alone (batches made and moved
to the device, no model), the model step alone (forward + backward + optimizer on one batch
already on the device), and the whole pipeline (what `mmtag train` runs); their ratio says how
much of the model's own speed the run keeps, and the slower part bounds it. Also the set-up
time, the time from the command to the first step, and the peak memory.
"""

from __future__ import annotations

import itertools
import tempfile
import time
import warnings
from pathlib import Path

import torch

from mmtag.config import TrainConfig
from mmtag.data.sources import Source, open_data
from mmtag.prediction.passes import batch_to
from mmtag.prediction.timing import bound_by, peak_mb, timed
from mmtag.runtime import resolve_device, seconds_since_start, seed_everything
from mmtag.training.engine import train_one_epoch
from mmtag.training.loop import step_options
from mmtag.training.pipelines import pipeline, train_batches
from mmtag.training.setup import setup
from mmtag.training.state import Job, runtime


class Batches:
    """`n` batches, as a loader: the next ones of the iterator `source`, or one `batch`
    repeated."""

    def __init__(self, n: int, source=None, batch=None):
        self.n, self.source, self.batch = n, source, batch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if self.batch is not None:
            return itertools.repeat(self.batch, self.n)
        return itertools.islice(self.source, self.n)


def _epochs_of(cfg: TrainConfig, sets, rt, first: int = 1):
    """Training batches, epoch after epoch from epoch `first`."""
    for epoch in itertools.count(first):
        yield from train_batches(cfg, sets, rt, epoch)


def bench_train(cfg: TrainConfig, data_dir: Path | str, *, steps: int = 30,
                warmup: int = 5) -> dict:
    """The rates of `cfg` on the rows of data_dir/train.csv: `warmup` untimed steps (cuDNN
    autotuning, compilation), then `steps` timed ones for each part."""
    if steps < 1 or warmup < 1:
        raise ValueError("bench train needs --steps and --warmup of at least 1")
    source = data_dir if isinstance(data_dir, Source) else open_data(data_dir)
    rows = source.read(need_labels=True)
    rt = runtime(cfg, resolve_device(cfg.device))
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    seed_everything(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="mmtag-bench-") as tmp:
        t0 = time.perf_counter()
        s = setup(Job(cfg, source, Path(tmp), rt, progress=False, started=time.time()), rows,
                  resume=False)
        setup_s = time.perf_counter() - t0
    state, b = s.state, cfg.optim.batch_size
    opts = step_options(s, 1, first=True)
    source = _epochs_of(cfg, s.sets, rt)

    def run(loader) -> None:
        train_one_epoch(s.model, loader, state.loss_fn, state.optimizer, opts)

    run(Batches(warmup, source))  # the first steps: what a user waits for
    first_step = state.first_step_seconds
    opts.on_first_step = None
    whole = timed(rt.device, lambda: run(Batches(steps, source)))
    syncs = count_host_syncs(rt.device, lambda: run(Batches(steps, source)))
    data_rate = _data_alone(cfg, s.sets, rt, steps, warmup)
    one = batch_to(next(source), rt.device, cfg.channels_last)
    run(Batches(warmup, batch=one))
    step = timed(rt.device, lambda: run(Batches(steps, batch=one)))
    rates = {"data": round(data_rate, 1), "step": round(steps * b / step, 1),
             "whole": round(steps * b / whole, 1)}
    return {"device": str(rt.device), "machine": rt.machine, "batch_size": b,
            "image_size": cfg.data.image_size, "pipeline": pipeline(cfg, rt.device),
            "compile": cfg.compile, "amp": rt.precision.name, "steps": steps, "warmup": warmup,
            "images_per_second": rates, "whole_over_step": round(rates["whole"] / rates["step"], 3),
            "bound_by": bound_by(rates), "setup_seconds": round(setup_s, 1),
            "host_syncs": syncs,
            "first_step_seconds": first_step, "peak_memory_mb": peak_mb(rt.device),
            "seconds_since_start": round(seconds_since_start(), 1)}


def _data_alone(cfg: TrainConfig, sets, rt, steps: int, warmup: int) -> float:
    """Images/s of one fresh pass's batches with nothing else running, timed within the pass
    (no worker start-up inside the clock): after `warmup` batches, or one per DataLoader
    worker if more (the workers' first batches were made in parallel before the clock)."""
    loader = train_batches(cfg, sets, rt, epoch=1000)
    skip = max(warmup, sets.workers)
    n = min(steps, len(loader) - skip)
    if n < 1:
        raise ValueError(f"an epoch has {len(loader)} batches: too few to time the data alone "
                         f"after {skip}; use a smaller optim.batch_size or more rows")
    batches = iter(loader)
    for _ in range(skip):
        next(batches)
    seconds = timed(rt.device, lambda: [batch_to(next(batches), rt.device, cfg.channels_last)
                                        for _ in range(n)])
    return n * cfg.optim.batch_size / seconds


def count_host_syncs(device: torch.device, fn) -> int | None:
    """How often fn() made the host wait for the GPU (CUDA's sync debug mode counts them);
    None on other devices. A training pass has a few at its end, none per step."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


def format_bench(res: dict, what: str) -> str:
    """The table `mmtag bench` prints."""
    r = res["images_per_second"]
    gpu = res["machine"].get("gpu")
    lines = [f"mmtag bench {what}: {res['image_size']} px, batch {res['batch_size']}, "
             f"{res['device']}{f' ({gpu})' if gpu else ''}, {res['pipeline']} pipeline, "
             f"amp {res['amp']}{', compiled' if res.get('compile') else ''}",
             f"  {'part':<40}{'images/s':>12}"]
    names = {"data": "data alone (batches on the device)" if what == "train"
             else "decoding + resizing alone", "step": "model alone (one batch, on the device)",
             "whole": "whole pipeline"}
    for key, name in names.items():
        lines.append(f"  {name:<40}{r[key]:>12,.1f}")
    lines.append(f"  whole / model: {res['whole_over_step']:.0%}; bound by the "
                 f"{res['bound_by']}; peak memory {res['peak_memory_mb']:,.0f} MB")
    if res.get("host_syncs") is not None:
        lines.append(f"  the host waited for the GPU {res['host_syncs']} times in "
                     f"{res['steps']} steps (a pass ends with a few)")
    if "setup_seconds" in res:
        lines.append(f"  set-up {res['setup_seconds']:.1f} s; first step "
                     f"{res['first_step_seconds']:.1f} s after the command started")
    return "\n".join(lines)
