"""Parity of an exported run on its validation rows: PyTorch fp32 against ONNX fp32 and int8.

    python tools/export_parity.py RUN --data ../shared/data/comp5329 [--limit N] [--json]

RUN needs export/ with model-int8.onnx (`mmtag export RUN --int8`). Every batch of validation
photos is decoded once and given to the three engines; prints the largest probability
difference of each ONNX engine from PyTorch, and micro-F1 / samples-F1 of each engine with the
run's decision rule and at one threshold of 0.5. Run the PyTorch side in fp32 (a run trained
with amp: bf16 predicts in bf16 unless MMTAG_AMP=none; the script sets fp32 itself).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mmtag.data.csv_io import read_csv
from mmtag.data.dataset import Split
from mmtag.data.images import load_image
from mmtag.evaluation.metrics import multilabel_metrics
from mmtag.inference.predictor import load_predictor
from mmtag.inference.torch_engine import Predictor

ENGINES = ("torch", "onnx", "onnx-int8")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--limit", type=int, default=0, help="first N validation rows (0: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--save", type=Path, help="also save the probabilities (.npz)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    _, rows = Split.load(args.run / "split.json").apply(read_csv(args.data / "train.csv"))
    rows = rows[: args.limit] if args.limit else rows
    # PyTorch in fp32 whatever the run's amp setting: the reference the ONNX files are held to
    preds = {"torch": Predictor.load(args.run, "cpu", amp="none"),
             **{e: load_predictor(args.run, e) for e in ENGINES[1:]}}
    probs = {e: [] for e in ENGINES}
    seconds = dict.fromkeys(ENGINES, 0.0)
    for s in range(0, len(rows), args.batch_size):
        batch = rows[s:s + args.batch_size]
        images = [load_image(args.data / "data" / r.image_id) for r in batch]
        captions = [r.caption for r in batch]
        for e, pred in preds.items():
            t = time.perf_counter()
            probs[e].append(pred.predict_probs(images, captions))
            seconds[e] += time.perf_counter() - t
    probs = {e: np.concatenate(v) for e, v in probs.items()}
    label_map = preds["torch"].label_map
    y = np.stack([label_map.encode(r.labels) for r in rows]).astype(int)
    res = {"rows": len(rows), "engines": {}}
    for e, pred in preds.items():
        rule = multilabel_metrics(y, pred.decide(probs[e]))
        at_half = multilabel_metrics(y, pred.decide(probs[e], threshold=0.5))
        res["engines"][e] = {
            "max_abs_diff_vs_torch": float(np.abs(probs[e] - probs["torch"]).max()),
            "micro_f1": rule["micro_f1"], "samples_f1": rule["samples_f1"],
            "micro_f1_at_0.5": at_half["micro_f1"], "samples_f1_at_0.5": at_half["samples_f1"],
            "model_seconds": round(seconds[e], 1), "rule": pred.describe_decision()}
    if args.save:
        np.savez_compressed(args.save, **{e.replace("-", "_"): v for e, v in probs.items()}, y=y)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{res['rows']} validation rows of {args.run}")
    print(f"  {'engine':<10} {'max |diff|':>10} {'micro-F1':>9} {'samples-F1':>10} "
          f"{'micro@0.5':>9} {'samples@0.5':>11} {'model s':>8}")
    for e, r in res["engines"].items():
        print(f"  {e:<10} {r['max_abs_diff_vs_torch']:>10.2e} {r['micro_f1']:>9.4f} "
              f"{r['samples_f1']:>10.4f} {r['micro_f1_at_0.5']:>9.4f} "
              f"{r['samples_f1_at_0.5']:>11.4f} {r['model_seconds']:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
