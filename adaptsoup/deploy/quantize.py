"""int8 copies of an exported model (onnxruntime quantization), and how far they move the fp32 outputs.

Two kinds, each written beside the fp32 file:

* ``dynamic`` (``NAME.int8.onnx``): int8 weights; activations are quantized at run time, batch by batch.
  Needs no data.  ``int8`` is an alias, kept for compatibility.
* ``static`` (``NAME.int8-static.onnx``): QDQ format (QuantizeLinear/DequantizeLinear pairs around each
  quantized op), per-channel symmetric int8 weights and symmetric int8 activations whose ranges are
  calibrated on the user's images, as onnxruntime recommends for transformers on the CPU.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from adaptsoup.core.io import atomic_path
from adaptsoup.deploy.runtime import onnx_logits, ort_session, quiet
from adaptsoup.errors import AdaptsoupError

KINDS = ("dynamic", "static")
ALIASES = {"int8": "dynamic"}
SUFFIXES = {"dynamic": ".int8.onnx", "static": ".int8-static.onnx"}
CALIBRATIONS = ("minmax", "percentile")


@dataclass(frozen=True)
class StaticConfig:
    """How the static model is calibrated: the range estimator, at most how many images it sees, and how many
    at a time.

    Calibration streams: each batch's activations are folded into the running ranges (min/max, or histograms
    for ``percentile``) before the next batch runs, so peak memory is one batch's activations, whatever
    ``max_images`` is.
    """

    calibration: str = "percentile"  # closer to fp32 than minmax on held-out training images (benchmarks/static_calibration.py)
    max_images: int = 512
    batch_size: int = 8
    percentile: float = 99.999  # for ``calibration="percentile"``


def quantize_kinds(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"dynamic"``, ``"static"``, ``"dynamic,static"`` (or a list of them; ``int8`` = dynamic) as a tuple of kinds."""
    if value is None or (not isinstance(value, str) and len(value) == 0):
        return ()
    parts = value.split(",") if isinstance(value, str) else list(value)
    kinds = [ALIASES.get(p.strip().lower(), p.strip().lower()) for p in parts if p.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise AdaptsoupError(f"unknown quantization {value!r}; use dynamic, static or dynamic,static (int8 = dynamic)")
    return tuple(dict.fromkeys(kinds))


def quantized_path(path: str | os.PathLike, kind: str) -> Path:
    path = Path(path)
    return path.with_name(path.stem + SUFFIXES[kind])


def _pre_processed(path: Path, scratch: Path) -> Path:
    """onnxruntime's quantization pre-processing (shape inference, graph clean-up), or ``path`` if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = scratch / "pre.onnx"
    try:
        quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
        return pre
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation only
        return path


def quantize_int8(path: str | os.PathLike) -> Path:
    """onnxruntime dynamic quantization to ``NAME.int8.onnx``, atomically: int8 weights for MatMul and Gemm, and
    fused ``Attention`` nodes (see :mod:`adaptsoup.deploy.optimize`) become ``QAttention``, whose q/k/v projection
    runs in int8 too (measured faster than leaving the fused attention in fp32)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    out = quantized_path(path, "dynamic")
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory(dir=path.parent) as scratch, quiet():
        source = _pre_processed(path, Path(scratch))
        quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm", "Attention"])
    return out


def calibration_reader(images: np.ndarray, input_name: str, batch_size: int):
    """An onnxruntime ``CalibrationDataReader`` over ``images`` (normalised, NCHW float32), in equal batches.

    It has a length (in batches) and ``set_range``, the interface onnxruntime's ``CalibStridedMinMax`` option
    uses to calibrate a slice of batches at a time (see :func:`quantize_static_int8`). A last, shorter batch is
    left out, so every batch has the same shape.
    """
    from onnxruntime.quantization import CalibrationDataReader

    size = max(1, min(batch_size, len(images)))
    count = len(images) // size

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.set_range(0, count)

        def __len__(self) -> int:
            return count

        def set_range(self, start_index: int, end_index: int) -> None:
            self._batches: Iterator[dict[str, np.ndarray]] = iter(
                {input_name: np.ascontiguousarray(images[b * size : (b + 1) * size], dtype=np.float32)}
                for b in range(max(0, start_index), min(count, end_index)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    return Batches()


def quantize_static_int8(path: str | os.PathLike, images: np.ndarray, config: StaticConfig = StaticConfig()) -> Path:
    """Static QDQ int8 (per-channel symmetric weights, symmetric activations) calibrated on ``images``, to
    ``NAME.int8-static.onnx``, atomically."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if config.calibration not in CALIBRATIONS:
        raise AdaptsoupError(f"unknown calibration {config.calibration!r}; use {' or '.join(CALIBRATIONS)}")
    if len(images) == 0:
        raise AdaptsoupError("static quantization needs calibration images")
    path = Path(path)
    out = quantized_path(path, "static")
    method = CalibrationMethod.MinMax if config.calibration == "minmax" else CalibrationMethod.Percentile
    # One batch per calibration step: onnxruntime otherwise keeps every batch's activations until the end
    # (measured: a ViT-B/16 went past 17 GB on 512 images), while its min/max and histogram collectors can
    # fold batches in one at a time.
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "CalibStridedMinMax": 1}
    if config.calibration == "percentile":
        extra["CalibPercentile"] = config.percentile
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory(dir=path.parent) as scratch, quiet():
        source = _pre_processed(path, Path(scratch))
        reader = calibration_reader(images[: config.max_images], "input", config.batch_size)
        quantize_static(str(source), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                        op_types_to_quantize=["MatMul", "Gemm"], extra_options=extra)
    return out


def compare_logits(got: np.ndarray, fp32_logits: np.ndarray) -> dict[str, float]:
    """How far an int8 model's logits ``got`` are from the fp32 model's on the same images: the largest and
    the mean absolute difference, and the percent of images whose top-1 class agrees."""
    diff = np.abs(got - fp32_logits)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "top1_agreement": float((got.argmax(1) == fp32_logits.argmax(1)).mean() * 100)}


@dataclass
class Int8Check:
    path: str
    size_bytes: int
    max_abs_diff: float  # against the fp32 ONNX model's logits
    top1_agreement: float  # percent of the batch where int8 and fp32 agree
    accuracy: float | None = None
    kind: str = "dynamic"
    mean_abs_diff: float | None = None  # against the fp32 ONNX model's logits


def quantize_and_compare(path: Path, batch: np.ndarray, fp32_logits: np.ndarray,
                         images: np.ndarray | None = None, labels: np.ndarray | None = None, *,
                         kind: str = "dynamic", calibration: np.ndarray | None = None,
                         config: StaticConfig = StaticConfig()) -> Int8Check:
    """Quantize ``path`` (``kind``: dynamic, or static calibrated on ``calibration``), then compare the int8 model
    with the fp32 one on ``batch`` (and score it on labeled images)."""
    if kind == "static":
        if calibration is None:
            raise AdaptsoupError("static quantization needs calibration images (--images)")
        qpath = quantize_static_int8(path, calibration, config)
    else:
        qpath = quantize_int8(path)
    session = ort_session(qpath)
    got = onnx_logits(session, batch)
    check = Int8Check(path=str(qpath), size_bytes=qpath.stat().st_size, kind=kind, **compare_logits(got, fp32_logits))
    if images is not None and labels is not None:
        check.accuracy = float((onnx_logits(session, images).argmax(1) == labels).mean() * 100)
    return check
