"""`mmtag benchmark`: prediction speed of a trained run on this machine, per engine."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mmtag.data.csv_io import read_csv
from mmtag.inference.predictor import PredictorBase, load_predictor
from mmtag.runtime import machine_info


def benchmark(run: Path | str, csv_path: Path | str, images: Path | str, *, n: int = 512,
              batch_size: int = 64, single: int = 30, num_workers: int = 0,
              device: str = "auto", tta_sizes: Sequence[int] | None = None,
              engines: Sequence[str] = ("torch",)) -> dict:
    """For each engine: batch throughput (JPEG decoding and preprocessing included) over the
    first `n` rows whose images exist, and single-sample latency (median and 90th percentile of
    `single` calls). {'engines': [one dict per engine], 'machine': ...}."""
    images = Path(images)
    rows = [r for r in read_csv(csv_path) if (images / r.image_id).exists()][:n]
    if not rows:
        raise ValueError(f"no row of {csv_path} has an image in {images}")
    results = []
    for engine in engines:
        t_load = time.perf_counter()
        pred = load_predictor(run, engine, device, tta_sizes)
        load_s = time.perf_counter() - t_load
        results.append({"engine": engine, "load_seconds": round(load_s, 2),
                        **_measure(pred, rows, images, batch_size, single, num_workers)})
    # the machine as the torch engine saw it (its GPU, if it used one); ONNX runs on the CPU
    torch_devices = [torch.device(e["device"]) for e in results if e["engine"] == "torch"]
    dev = torch_devices[0] if torch_devices else torch.device("cpu")
    return {"rows": len(rows), "batch_size": batch_size, "engines": results,
            "machine": machine_info(dev)}


def _measure(pred: PredictorBase, rows, images: Path, batch_size: int, single: int,
             num_workers: int) -> dict:
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
    return {"device": str(getattr(pred, "device", "cpu")), "threads": torch.get_num_threads(),
            "samples_per_second": round(len(rows) / batch_s, 1),
            "single_latency_ms_median": round(1000 * statistics.median(lat), 1),
            "single_latency_ms_p90": round(1000 * sorted(lat)[int(0.9 * (len(lat) - 1))], 1),
            "tta_flip": pred.tta_flip, "image_sizes": pred.image_sizes}
