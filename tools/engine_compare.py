"""Side by side on this machine: which engine runs the frozen image layers fastest, and how
close each stays to PyTorch fp32 (the reference).

The frozen stages [0, STAGE) of the image encoder are what `mmtag train` caches once for every
photo (twice with flip): pure inference, the first run's largest cost on a CPU. Each engine
runs the same photos, in the same batches, with the same threads:

    torch-fp32        the reference (BatchNorm folded, channels_last, as the cache runs it)
    torch-bf16        CPU autocast bf16 (what amp: auto picks on a CPU with native bf16)
    onnx              ONNX Runtime, fp32, on the same stages exported to ONNX
    openvino-f32      OpenVINO reading that ONNX file, inference precision f32
    openvino          OpenVINO with its default precision for this CPU (bf16 where native)
    openvino-streams  OpenVINO f32, one stream per thread, each running part of the batch

Decoding (PIL, the upscale to the cache's size, normalisation) is timed apart, with 1 and 2
worker processes. Rounds alternate the engines, so a slow minute of the machine hurts all.

    python tools/engine_compare.py --data ../shared/data/comp5329 --images 256 --rounds 3

Writes a JSON (--out) and prints a table: images/s (median of rounds), the largest absolute
and the relative (L2) difference of the fp16 features from torch-fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from mmtag.data.csv_io import read_csv
from mmtag.data.images import ImageTransformSpec, build_transform, load_image
from mmtag.models.image_encoders import build_image_encoder
from mmtag.runtime import cpu_has_fast_bf16, machine_info


class Stages(torch.nn.Module):
    """The frozen part as one module: stages [0, end) of an inference-ready encoder."""

    def __init__(self, encoder, end: int) -> None:
        super().__init__()
        self.encoder, self.end = encoder, end

    def forward(self, x):
        return self.encoder.run_stages(x, 0, self.end)


def export_stages(module: torch.nn.Module, size: int, path: Path) -> None:
    x = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), input_names=["images"],
                          output_names=["features"], opset_version=17, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})


def engines(module: torch.nn.Module, onnx_path: Path, threads: int) -> dict:
    """name -> function (N, 3, S, S) float32 array -> (N, ...) float32 array."""
    def torch_run(dtype):
        def run(x):
            t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.bfloat16,
                                                         enabled=dtype is not None):
                return module(t).float().numpy()
        return run

    out = {"torch-fp32": torch_run(None), "torch-bf16": torch_run(torch.bfloat16)}
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    out["onnx"] = lambda x: sess.run(None, {"images": x})[0]
    try:
        import openvino as ov
    except ImportError:
        print("openvino is not installed: pip install openvino", file=sys.stderr)
        return out
    core = ov.Core()
    for name, hint in (("openvino-f32", "f32"), ("openvino", None)):
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if hint:
            config["INFERENCE_PRECISION_HINT"] = hint
        compiled = core.compile_model(str(onnx_path), "CPU", config)
        print(f"{name}: inference precision {compiled.get_property('INFERENCE_PRECISION_HINT')}",
              file=sys.stderr)
        request = compiled.create_infer_request()
        out[name] = (lambda r: lambda x: next(iter(r.infer({"images": x}).values())).copy())(request)
    out["openvino-streams"] = openvino_streams(core, onnx_path, threads)
    return out


def openvino_streams(core, onnx_path: Path, threads: int):
    """OpenVINO f32 with one stream per thread: a batch is split into that many parts, run at
    once by an async queue, one thread each (instead of one request on every thread)."""
    import openvino as ov
    compiled = core.compile_model(str(onnx_path), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": threads, "INFERENCE_PRECISION_HINT": "f32"})
    queue = ov.AsyncInferQueue(compiled, threads)
    parts: dict[int, np.ndarray] = {}
    queue.set_callback(lambda request, i: parts.__setitem__(i, request.get_output_tensor(0).data.copy()))

    def run(x):
        parts.clear()
        chunks = np.array_split(x, threads)
        for i, chunk in enumerate(chunks):
            queue.start_async({"images": np.ascontiguousarray(chunk)}, userdata=i)
        queue.wait_all()
        return np.concatenate([parts[i] for i in range(len(chunks))])
    return run


def decode_rate(paths: list[Path], spec: ImageTransformSpec, workers: int) -> float:
    tf = build_transform(spec, train=False)

    class Photos(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return tf(load_image(paths[i]))

    loader = torch.utils.data.DataLoader(Photos(), batch_size=32, num_workers=workers)
    t = time.perf_counter()
    for _ in loader:
        pass
    return len(paths) / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="Kaggle-layout folder")
    ap.add_argument("--encoder", default="efficientnet_lite2")
    ap.add_argument("--stage", type=int, default=7, help="cache stages [0, STAGE)")
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("engine_compare.json"))
    ap.add_argument("--skip", default=None,
                    help="engines to leave out, comma-separated (default: torch-bf16 on a CPU "
                         "without native bf16, where it runs at a fraction of an image a second)")
    args = ap.parse_args(argv)
    skip = set((args.skip if args.skip is not None
                else ("" if cpu_has_fast_bf16() else "torch-bf16")).split(",")) - {""}
    if skip:
        print(f"leaving out: {', '.join(sorted(skip))}", file=sys.stderr)

    threads = torch.get_num_threads()
    enc = build_image_encoder(args.encoder, pretrained=True).eval()
    fast = enc.for_inference(channels_last=True)
    module = Stages(fast, min(args.stage, fast.num_stages)).eval()
    spec = ImageTransformSpec(size=args.size, normalisation=enc.normalisation)
    rows = read_csv(args.data / "train.csv")[: args.images]
    paths = [args.data / "data" / r.image_id for r in rows]
    tf = build_transform(spec, train=False)
    x = torch.stack([tf(load_image(p)) for p in paths]).numpy()
    batches = [x[i:i + args.batch] for i in range(0, len(x), args.batch)]

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "stages.onnx"
        export_stages(module, args.size, onnx_path)
        runs = {k: v for k, v in engines(module, onnx_path, threads).items() if k not in skip}
        ref = np.concatenate([runs["torch-fp32"](b) for b in batches]).astype(np.float16)
        result = {"machine": machine_info(torch.device("cpu")), "fast_bf16": cpu_has_fast_bf16(),
                  "args": {k: str(v) for k, v in vars(args).items()}, "engines": {}}
        times: dict[str, list[float]] = {name: [] for name in runs}
        feats = {}
        for name, run in runs.items():  # warm-up, and the features for parity
            feats[name] = np.concatenate([run(b) for b in batches]).astype(np.float16)
        for _ in range(args.rounds):
            for name, run in runs.items():
                t = time.perf_counter()
                for b in batches:
                    run(b)
                times[name].append(time.perf_counter() - t)
        for name in runs:
            diff = feats[name].astype(np.float32) - ref.astype(np.float32)
            result["engines"][name] = {
                "images_per_second": round(len(x) / statistics.median(times[name]), 1),
                "seconds": [round(t, 2) for t in times[name]],
                "max_abs_diff": float(np.abs(diff).max()),
                "rel_l2_diff": float(np.linalg.norm(diff) / np.linalg.norm(ref.astype(np.float32))),
                "deterministic": bool(np.array_equal(
                    feats[name], np.concatenate([runs[name](b) for b in batches]).astype(np.float16)))}
    result["decode_images_per_second"] = {
        f"{w} worker(s)": round(decode_rate(paths, spec, w), 1) for w in (0, 2)}
    args.out.write_text(json.dumps(result, indent=2))
    m = result["machine"]
    print(f"{m['cpu']}, {threads} threads, native bf16: {result['fast_bf16']}; "
          f"{len(x)} photos at {args.size} px, batch {args.batch}, {args.rounds} rounds")
    print(f"{'engine':<14} {'images/s':>9} {'x torch-fp32':>13} {'max |diff|':>11} {'rel L2':>9} "
          f"{'rerun same':>10}")
    base = result["engines"]["torch-fp32"]["images_per_second"]
    for name, e in result["engines"].items():
        print(f"{name:<14} {e['images_per_second']:>9.1f} {e['images_per_second'] / base:>12.2f}x "
              f"{e['max_abs_diff']:>11.3g} {e['rel_l2_diff']:>9.2e} {str(e['deterministic']):>10}")
    print("decoding + resize + normalise:", result["decode_images_per_second"], "images/s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
