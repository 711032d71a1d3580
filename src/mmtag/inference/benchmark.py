"""`mmtag benchmark`: prediction speed of a trained run on this machine, per engine."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mmtag.data.csv_io import read_csv
from mmtag.data.dataset import ImageRows
from mmtag.data.device_batches import DecodedBatches
from mmtag.inference.base import PredictorBase
from mmtag.inference.predictor import PredictOptions, load_predictor
from mmtag.inference.torch_engine import Predictor
from mmtag.prediction.export_format import ExportError
from mmtag.prediction.passes import EvalPass, evaluate
from mmtag.prediction.timing import bound_by, peak_mb, timed
from mmtag.runtime import machine_info


def rows_with_images(csv_path: Path | str, images: Path | str, n: int) -> ImageRows:
    """The first `n` rows of `csv_path` whose photos are in `images`: what is timed."""
    images = Path(images)
    rows = [r for r in read_csv(csv_path) if (images / r.image_id).exists()][:n]
    if not rows:
        raise ValueError(f"no row of {csv_path} has an image in {images}")
    return ImageRows(rows, images, str(csv_path))


def benchmark(run: Path | str, rows: ImageRows, *, engines: Sequence[str] = ("torch",),
              single: int = 30, options: PredictOptions = PredictOptions()) -> dict:
    """For each engine: batch throughput (JPEG decoding and preprocessing included) over
    `rows` (at options.batch_size), and single-sample latency (median and 90th percentile of
    `single` calls). {'engines': [one dict per engine], 'machine': ...}."""
    results = []
    for engine in engines:
        t_load = time.perf_counter()
        try:
            pred = load_predictor(run, engine, options.device)
        except ExportError as e:
            if len(engines) == 1:
                raise
            # side by side, an engine refused here (no export, a failed check) is reported
            # beside the others instead of ending the comparison
            results.append({"engine": engine, "refused": str(e)})
            continue
        load_s = time.perf_counter() - t_load
        results.append({"engine": engine, "load_seconds": round(load_s, 2),
                        **_measure(pred, rows, single, options)})
    # the machine as the torch engine saw it (its GPU, if it used one); ONNX runs on the CPU
    torch_devices = [torch.device(e["device"]) for e in results if e["engine"] == "torch"]
    dev = torch_devices[0] if torch_devices else torch.device("cpu")
    return {"rows": len(rows.records), "batch_size": options.batch_size, "engines": results,
            "machine": machine_info(dev)}


def _measure(pred: PredictorBase, rows: ImageRows, single: int, o: PredictOptions) -> dict:
    records, images = rows.records, rows.image_dir
    ds = pred.dataset(records[: o.batch_size], images)
    pred.probabilities(ds, o.batch_size, 0)  # warm-up
    ds = pred.dataset(records, images)
    t0 = time.perf_counter()
    pred.probabilities(ds, o.batch_size, o.num_workers)
    batch_s = time.perf_counter() - t0
    pairs = [(images / r.image_id, r.caption) for r in records[:single]]
    pred.predict(pairs[:1])
    lat = []
    for pair in pairs:
        t = time.perf_counter()
        pred.predict([pair])
        lat.append(time.perf_counter() - t)
    return {"device": str(getattr(pred, "device", "cpu")), "threads": torch.get_num_threads(),
            "samples_per_second": round(len(records) / batch_s, 1),
            "single_latency_ms_median": round(1000 * statistics.median(lat), 1),
            "single_latency_ms_p90": round(1000 * sorted(lat)[int(0.9 * (len(lat) - 1))], 1),
            "tta_flip": pred.tta_flip, "image_sizes": [pred.image_size]}


def bench_predict(run: Path | str, rows: ImageRows, *, batch_size: int = 256,
                  device: str = "auto", warmup: int = 2) -> dict:
    """Batch prediction's rates in images/s at data.image_size, as `mmtag bench train`
    reports training's: decoding + resizing alone (nvJPEG on a GPU, PIL elsewhere), the model
    alone (one batch already on the device, flip TTA as the run predicts), and both, over
    `rows`."""
    pred = Predictor.load(run, device)
    if not pred.reads_images:
        raise ValueError("benchmark --parts needs a model that reads images")
    spec = pred.transform_spec()
    # the batches `mmtag predict` makes on this device (decoded there on a GPU)
    batches = DecodedBatches(pred.dataset(rows.records, rows.image_dir, rows.source,
                                          with_targets=False), spec, batch_size, pred.device)
    if pred.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pred.device)

    def model(loader) -> None:
        for m in pred.models:
            evaluate(m, loader, None, pred.device, EvalPass(
                dtype=pred.precision.dtype, channels_last=True, tta=pred.tta_flip))

    one = next(iter(batches))
    model([one] * warmup)
    t_decode = timed(pred.device, lambda: list(batches))
    t_model = timed(pred.device, lambda: model([one] * len(batches)))
    t_whole = timed(pred.device, lambda: model(batches))  # streamed, batch by batch
    k = len(batches) * len(one[0])  # the model alone ran full batches
    n = len(rows.records)
    rates = {"data": round(n / t_decode, 1), "step": round(k / t_model, 1),
             "whole": round(n / t_whole, 1)}
    ratio = rates["whole"] / rates["step"]
    return {"device": str(pred.device), "machine": machine_info(pred.device),
            "batch_size": batch_size, "image_size": spec.size, "rows": n,
            "pipeline": "nvJPEG" if pred.device.type == "cuda" else "PIL",
            "amp": pred.precision.name,
            "tta_flip": pred.tta_flip, "members": len(pred.models), "images_per_second": rates,
            "whole_over_step": round(ratio, 3), "bound_by": bound_by(rates),
            "peak_memory_mb": peak_mb(pred.device)}

