"""int8 quantisation of an exported model with ONNX Runtime's tools.

Dynamic quantisation: the weights of every matrix product (MiniLM, the label queries, the
heads) and of the embedding tables are stored in 8 bits; the ranges of the activations are
measured per call, which suits a transformer's outlier channels. The convolutions stay in fp32:
quantising EfficientNet-Lite's convolutions statically (calibrated on 200 training photos) cost
a point of micro-F1 on the cpu recipe (docs/performance.md#int8).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path


def quantize_model(fp32: Path, int8: Path) -> None:
    """Write `int8`: `fp32` with int8 matrix products and embedding tables."""
    previous = logging.root.manager.disable
    # onnxruntime's quantiser reports every tensor it leaves alone on the root logger
    logging.disable(logging.INFO)
    try:
        _quantize(fp32, int8)
    finally:
        logging.disable(previous)


def _quantize(fp32: Path, int8: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=int8.parent, prefix=".quant-") as tmp:
        pre, staged = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        # constant folding and shape inference first, as onnxruntime recommends
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_dynamic(str(pre), str(staged), op_types_to_quantize=["MatMul", "Gemm", "Gather"],
                         per_channel=False, weight_type=QuantType.QInt8)
        os.replace(staged, int8)
