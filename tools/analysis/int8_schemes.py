"""Which int8 quantisation of an exported model is fastest here for the least accuracy lost.

    python tools/analysis/int8_schemes.py RUN --data ../shared/data/comp5329 --rows 1000

RUN needs export/model.onnx (`mmtag export RUN`). Each scheme is written to
RUN/int8-schemes/<name>.onnx; for each: file size, single-sample latency (one image and its
caption, median of 20 calls, model only: preprocessed inputs), batch throughput (batch 32,
model only), and micro-F1 / samples-F1 on the first --rows validation rows by the run's rule,
with the largest probability difference from fp32. The schemes:

- dynamic: every MatMul / Gemm int8 with ranges measured per call; convolutions stay fp32
- dynamic+gather: the same and the embedding tables in int8 (what `mmtag export --int8`
  writes: a smaller file)
- static-conv+dynamic: convolutions int8 with ranges calibrated on 200 training photos (QDQ,
  per channel, min-max), the matrix products dynamic
- static-all: convolutions and matrix products calibrated (QDQ)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmtag.data.csv_io import read_csv
from mmtag.data.dataset import Split
from mmtag.data.images import load_image
from mmtag.evaluation.metrics import multilabel_metrics
from mmtag.inference.onnx_engine import OnnxPredictor, feeds_for
from mmtag.inference.predictor import Predictor


class CalibrationFeeds:
    """onnxruntime's CalibrationDataReader protocol over an iterable of input dicts."""

    def __init__(self, feeds):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        pass


def calibration_feeds(pred: Predictor, names: list[str], rows, images: Path, batch: int = 8):
    """Batches of the first training rows, preprocessed as prediction does."""
    ds = pred.dataset(rows, images, with_targets=False)
    for s in range(0, len(ds), batch):
        items = [ds[i] for i in range(s, min(s + batch, len(ds)))]
        yield feeds_for(names, *(torch.stack([it[k] for it in items]).numpy() for k in range(3)))


def build(name: str, fp32: Path, out: Path, feeds) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from mmtag.inference.quantize import quantize_model

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        if name == "dynamic":
            quantize_dynamic(str(pre), str(out), op_types_to_quantize=["MatMul", "Gemm"],
                             weight_type=QuantType.QInt8)
        elif name == "dynamic+gather":
            quantize_model(fp32, out)
        elif name in ("static-conv+dynamic", "static-all"):
            ops = ["Conv"] if name == "static-conv+dynamic" else ["Conv", "MatMul", "Gemm"]
            static = Path(tmp) / "static.onnx"
            quantize_static(str(pre), str(static), CalibrationFeeds(feeds),
                            quant_format=QuantFormat.QDQ, op_types_to_quantize=ops,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"CalibMaxIntermediateOutputs": 4})
            if name == "static-all":
                os.replace(static, out)
            else:
                quantize_dynamic(str(static), str(out), op_types_to_quantize=["MatMul", "Gemm"],
                                 weight_type=QuantType.QInt8)


def speed(path: Path, names, size: int, ids, lengths) -> tuple[float, float]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    one = feeds_for(names, rng.standard_normal((1, 3, size, size)), ids[:1], lengths[:1])
    sess.run(None, one)
    lat = []
    for _ in range(20):
        t = time.perf_counter()
        sess.run(None, one)
        lat.append(time.perf_counter() - t)
    batch = feeds_for(names, rng.standard_normal((32, 3, size, size)),
                      np.repeat(ids[:1], 32, 0), np.repeat(lengths[:1], 32, 0))
    sess.run(None, batch)
    t = time.perf_counter()
    sess.run(None, batch)
    return 1000 * statistics.median(lat), 32 / (time.perf_counter() - t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--rows", type=int, default=1000, help="0: speed only, reusing the files "
                                                           "built by an earlier call")
    p.add_argument("--schemes", default="dynamic,dynamic+gather,static-conv+dynamic,static-all")
    args = p.parse_args()
    export = args.run / "export"
    schemes = args.run / "int8-schemes"
    schemes.mkdir(exist_ok=True)
    fp32 = OnnxPredictor.load(export, "onnx")
    pred = Predictor.load(args.run, "cpu")
    _, rows = Split.load(args.run / "split.json").apply(read_csv(args.data / "train.csv"))
    rows = rows[: args.rows] if args.rows else []
    images = [load_image(args.data / "data" / r.image_id) for r in rows]
    inputs = [fp32.inputs_for(images[s:s + 32], [r.caption for r in rows[s:s + 32]])
              for s in range(0, len(rows), 32)]
    y = np.stack([pred.label_map.encode(r.labels) for r in rows]).astype(int) if rows else None
    names = fp32.meta["inputs"]
    size = fp32.image_sizes[0]
    ids, lengths = (inputs[0][1], inputs[0][2]) if inputs else \
        fp32.inputs_for([None], ["A man riding a bike down a city street."])[1:]

    def score(session_path: Path) -> tuple[np.ndarray, dict]:
        import onnxruntime as ort

        if not rows:  # --rows 0: speed only
            return np.zeros((0, 1)), {"micro_f1": float("nan"), "samples_f1": float("nan")}

        sess = ort.InferenceSession(str(session_path), providers=["CPUExecutionProvider"])
        probs = np.concatenate([sess.run(None, feeds_for(names, *x))[0] for x in inputs])
        return probs, multilabel_metrics(y, fp32.decide(probs))

    ref, ref_m = score(export / "model.onnx")
    results = {"fp32": {"mb": round((export / "model.onnx").stat().st_size / 2**20, 1),
                        "p50_ms": None, "batch_per_s": None, "micro_f1": ref_m["micro_f1"],
                        "samples_f1": ref_m["samples_f1"], "max_diff": 0.0}}
    results["fp32"]["p50_ms"], results["fp32"]["batch_per_s"] = speed(
        export / "model.onnx", names, size, ids, lengths)
    train_rows, _ = Split.load(args.run / "split.json").apply(read_csv(args.data / "train.csv"))
    cal_rows, cal_images = train_rows[:200], args.data / "data"
    for name in args.schemes.split(","):
        out = schemes / f"{name}.onnx"
        t = time.perf_counter()
        if rows or not out.exists():
            build(name, export / "model.onnx", out,
                  calibration_feeds(pred, names, cal_rows, cal_images))
        built = time.perf_counter() - t
        probs, m = score(out)
        p50, per_s = speed(out, names, size, ids, lengths)
        results[name] = {"mb": round(out.stat().st_size / 2**20, 1), "p50_ms": p50,
                         "batch_per_s": per_s, "micro_f1": m["micro_f1"],
                         "samples_f1": m["samples_f1"],
                         "max_diff": float(np.abs(probs - ref).max()) if rows else float("nan"),
                         "build_s": round(built, 1)}
        print(name, json.dumps(results[name]), flush=True)
    print(f"{len(rows)} validation rows; single sample and batch 32 model-only, "
          f"{size} px, flip TTA inside the graph: {fp32.tta_flip}")
    print("| scheme | MB | single p50 ms | batch samples/s | micro-F1 | samples-F1 | max diff |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['mb']} | {r['p50_ms']:.1f} | {r['batch_per_s']:.1f} | "
              f"{r['micro_f1']:.4f} | {r['samples_f1']:.4f} | {r['max_diff']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
