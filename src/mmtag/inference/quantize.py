"""int8 quantisation of an exported model with ONNX Runtime's tools.

The convolutions (the image encoder, the class-attention head) are quantised statically: their
activations' ranges are calibrated on real training images, so no range is computed per call.
The matrix products (the caption transformer, the label queries, the heads) are quantised
dynamically: their activations' ranges are measured per call, which suits a transformer's
outlier channels. docs/performance.md has the measurements behind this choice.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np


class CalibrationFeeds:
    """onnxruntime's CalibrationDataReader protocol over an iterable of input dicts."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]):
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # called by some versions; one pass is all calibration needs
        pass


def quantize_model(fp32: Path, int8: Path, feeds: Iterable[dict[str, np.ndarray]]) -> None:
    """Write `int8`: `fp32` with static int8 convolutions (calibrated on `feeds`) and dynamic
    int8 matrix products."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=int8.parent, prefix=".quant-") as tmp:
        pre, static = Path(tmp) / "pre.onnx", Path(tmp) / "static.onnx"
        # constant folding and shape inference first, as onnxruntime recommends
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(static), CalibrationFeeds(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv"], per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        staged = Path(tmp) / "int8.onnx"
        quantize_dynamic(str(static), str(staged), op_types_to_quantize=["MatMul", "Gemm"],
                         per_channel=False, weight_type=QuantType.QInt8)
        os.replace(staged, int8)
