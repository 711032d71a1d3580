"""`mmtag benchmark`: prediction speed of a trained run on this machine."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mmtag.data.csv_io import read_csv
from mmtag.inference.predictor import Predictor
from mmtag.runtime import machine_info


def benchmark(run: Path | str, csv_path: Path | str, images: Path | str, *, n: int = 512,
              batch_size: int = 64, single: int = 30, num_workers: int = 0,
              device: str = "auto", tta_sizes: Sequence[int] | None = None) -> dict:
    """Batch throughput (JPEG decoding and preprocessing included) over the first `n` rows
    whose images exist, and single-sample latency (median of `single` calls)."""
    images = Path(images)
    rows = [r for r in read_csv(csv_path) if (images / r.image_id).exists()][:n]
    if not rows:
        raise ValueError(f"no row of {csv_path} has an image in {images}")
    t_load = time.perf_counter()
    pred = Predictor.load(run, device, tta_sizes)
    load_s = time.perf_counter() - t_load
    ds = pred.dataset(rows[: min(len(rows), batch_size)], images)
    pred.probabilities(ds, batch_size, 0)  # warm-up
    ds = pred.dataset(rows, images)
    t0 = time.perf_counter()
    pred.probabilities(ds, batch_size, num_workers)
    batch_s = time.perf_counter() - t0
    pairs = [(images / r.image_id, r.caption) for r in rows[:single]]
    pred.predict(pairs[:1])
    lat = []
    for pair in pairs:
        t = time.perf_counter()
        pred.predict([pair])
        lat.append(time.perf_counter() - t)
    return {"rows": len(rows), "batch_size": batch_size, "threads": torch.get_num_threads(),
            "device": str(pred.device), "load_seconds": round(load_s, 2),
            "samples_per_second": round(len(rows) / batch_s, 1),
            "single_latency_ms_median": round(1000 * statistics.median(lat), 1),
            "single_latency_ms_p90": round(1000 * sorted(lat)[int(0.9 * (len(lat) - 1))], 1),
            "tta_flip": pred.config.tta_flip, "image_sizes": pred.image_sizes,
            "machine": machine_info(pred.device)}
