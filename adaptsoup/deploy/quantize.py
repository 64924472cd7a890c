"""int8 dynamic quantization of an exported model (onnxruntime), and how far it moves the fp32 outputs."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaptsoup.core.io import atomic_path
from adaptsoup.deploy.runtime import onnx_logits, ort_session, quiet


def quantize_int8(path: str | os.PathLike) -> Path:
    """onnxruntime dynamic quantization (int8 weights, MatMul/Gemm) to ``NAME.int8.onnx``, atomically."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path = Path(path)
    out = path.with_name(path.stem + ".int8.onnx")
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        pre = Path(scratch) / "pre.onnx"
        with quiet():
            try:
                quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
                source = pre
            except Exception:  # noqa: BLE001 - pre-processing is an optimisation only
                source = path
            quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    return out


@dataclass
class Int8Check:
    path: str
    size_bytes: int
    max_abs_diff: float  # against the fp32 ONNX model's logits
    top1_agreement: float  # percent of the batch where int8 and fp32 agree
    accuracy: float | None = None


def quantize_and_compare(path: Path, batch: np.ndarray, fp32_logits: np.ndarray,
                         images: np.ndarray | None = None, labels: np.ndarray | None = None) -> Int8Check:
    """Quantize ``path``, then compare the int8 model with the fp32 one on ``batch`` (and score it on labeled images)."""
    qpath = quantize_int8(path)
    session = ort_session(qpath)
    got = onnx_logits(session, batch)
    check = Int8Check(path=str(qpath), size_bytes=qpath.stat().st_size, max_abs_diff=float(np.abs(got - fp32_logits).max()),
                      top1_agreement=float((got.argmax(1) == fp32_logits.argmax(1)).mean() * 100))
    if images is not None and labels is not None:
        check.accuracy = float((onnx_logits(session, images).argmax(1) == labels).mean() * 100)
    return check
