"""int8 copies of an exported model (onnxruntime quantization), and how far they move the fp32 outputs.

Two kinds, each written beside the fp32 file:

* ``dynamic`` (``NAME.int8.onnx``): int8 weights; activations are quantized at run time, batch by batch.
  Needs no data.  ``int8`` is an alias, kept for compatibility.
* ``static`` (``NAME.int8-static.onnx``): QDQ format (QuantizeLinear/DequantizeLinear pairs around each
  quantized op), per-channel symmetric int8 weights and symmetric int8 activations whose ranges are
  calibrated on the user's images, as onnxruntime recommends for transformers on the CPU.

How the int8 weights are stored depends on the CPU that will run them (:func:`choose_int8_weights`).
onnxruntime runs an int8 matrix product with uint8 activations (on x86 it turns int8 activations into
uint8 ones, zero point 128).  Without VNNI, its u8×s8 kernels multiply with ``vpmaddubsw``, which adds each
pair of products in *saturating 16 bits*: 2 × 255 × 127 = 64,770 does not fit in 32,767, and full-range
int8 weights (every per-channel row reaches ±127) overflow it (measured: a static model whose top-1 agreed
with fp32 on 98.8% of images on a VNNI CPU agreed on 43.0% with the same file on the AVX2 kernels, run by
hiding AVX-512 and VNNI from CPUID: tests/fixtures/cpuid_mask.c).  Formats:

* ``s8``: signed 8-bit weights, onnxruntime's default.  Exact and fastest where the products are summed in
  32 bits: x86 with AVX-512 VNNI or AVX-VNNI (``vpdpbusd``); onnxruntime documents the saturation on x86 only.
* ``u8``: the same weights stored as unsigned bytes, +128, with the zero point moved by 128: the same
  products, which onnxruntime then runs on its U8U8 kernels (16-bit operands, 32-bit sums): exact on every
  CPU; onnxruntime documents them as slower than u8×s8.  It is what onnxruntime's own
  ``session.x64quantprecision`` option does when a session loads the model; here it is written into the
  file, so every runtime gets it.
* ``s7``: 7-bit weights (onnxruntime's ``reduce_range``): 2 × 255 × 64 fits in 16 bits, so the fast u8×s8
  kernels cannot saturate either, at half the weight resolution.
"""

from __future__ import annotations

import os
import platform
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
WEIGHT_FORMATS = ("auto", "s8", "u8", "s7")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")  # the names in /proc/cpuinfo and in torch.cpu.get_capabilities()
X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")
# Where each int8 op keeps a weight and the weight's zero point: (weight input, zero-point input).
WEIGHT_SLOTS = {"DequantizeLinear": (0, 2), "MatMulInteger": (1, 3), "DynamicQuantizeMatMul": (1, 3), "QAttention": (1, 7)}


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


# ----------------------------------------------------------------------------------------------------------------
# Which weight format this CPU needs


@dataclass(frozen=True)
class CpuFeatures:
    """What decides how onnxruntime sums int8 products on a CPU."""

    machine: str  # platform.machine(), lower case
    vnni: bool | None  # AVX-512 VNNI or AVX-VNNI; None when it could not be read
    source: str  # where ``vnni`` was read


@dataclass(frozen=True)
class Int8Weights:
    format: str  # s8, u8 or s7 (see the module docstring)
    reason: str  # why, for the export report


def cpuinfo_flags(text: str) -> set[str]:
    """The ``flags`` of the first processor in the text of ``/proc/cpuinfo``."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuFeatures:
    """This CPU's features, read with CPUID as onnxruntime reads them (``torch.cpu.get_capabilities``, any OS,
    where torch has it), else from ``/proc/cpuinfo``'s flags (Linux); ``vnni=None`` when neither exists."""
    machine = platform.machine().lower()
    try:
        import torch

        capabilities = dict(torch.cpu.get_capabilities())
        return CpuFeatures(machine, any(bool(capabilities.get(f)) for f in VNNI_FLAGS), "CPUID")
    except (ImportError, AttributeError, RuntimeError):
        pass
    try:
        flags = cpuinfo_flags(cpuinfo.read_text(errors="replace"))
    except OSError:
        return CpuFeatures(machine, None, f"no CPUID reader, no {cpuinfo}")
    return CpuFeatures(machine, any(f in flags for f in VNNI_FLAGS), str(cpuinfo))


def choose_int8_weights(cpu: CpuFeatures, requested: str = "auto") -> Int8Weights:
    """The weight format for ``cpu``: ``requested``, or with ``auto`` s8 where onnxruntime sums int8 products
    in 32 bits (x86 with VNNI, other architectures) and u8 on x86 without VNNI, or where that is not known."""
    if requested not in WEIGHT_FORMATS:
        raise AdaptsoupError(f"unknown int8 weight format {requested!r}; use {', '.join(WEIGHT_FORMATS)}")
    x86 = cpu.machine in X86_MACHINES
    if requested != "auto":
        risky = requested == "s8" and x86 and not cpu.vnni
        return Int8Weights(requested, "asked for" + (" (this CPU may lack VNNI: its u8×s8 kernels can saturate)" if risky else ""))
    if not x86:
        return Int8Weights("s8", f"{cpu.machine} CPU: onnxruntime sums int8 products in 32 bits here")
    if cpu.vnni:
        return Int8Weights("s8", f"this CPU has VNNI ({cpu.source}): onnxruntime sums u8×s8 products in 32 bits")
    lacks = "has no VNNI" if cpu.vnni is False else "may lack VNNI"
    return Int8Weights("u8", f"this x86 CPU {lacks} ({cpu.source}): onnxruntime's u8×s8 kernels would add pairs of "
                             "products in saturating 16 bits; u8 weights (the same products) run on its U8U8 kernels, "
                             "which do not saturate")


def weights_as_uint8(proto) -> int:
    """Store every int8 weight of an onnxruntime-quantized model, and its zero point, as uint8 + 128, in place:
    ``w - z`` and so every product is unchanged, but onnxruntime then runs u8×u8 kernels.  Returns how many
    weights were rewritten; a weight without an explicit zero point is refused."""
    from onnx import TensorProto, numpy_helper

    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    shifted: dict[str, str] = {}

    def as_uint8(name: str) -> str:
        if name not in shifted:
            values = numpy_helper.to_array(initializers[name]).astype(np.int16) + 128
            graph.initializer.append(numpy_helper.from_array(values.astype(np.uint8), f"{name}_u8"))
            shifted[name] = f"{name}_u8"
        return shifted[name]

    count = 0
    for node in graph.node:
        weight, zero_point = WEIGHT_SLOTS.get(node.op_type, (None, None))
        if weight is None or len(node.input) <= weight:
            continue
        tensor = initializers.get(node.input[weight])
        if tensor is None or tensor.data_type != TensorProto.INT8:
            continue
        if len(node.input) <= zero_point or node.input[zero_point] not in initializers:
            raise AdaptsoupError(f"cannot store the int8 weight {tensor.name} as u8: its {node.op_type} has no zero point")
        node.input[weight], node.input[zero_point] = as_uint8(node.input[weight]), as_uint8(node.input[zero_point])
        count += 1
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used or t.name not in shifted]  # drop the replaced int8 tensors
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return count


def _resolved(weights: str) -> Int8Weights:
    return choose_int8_weights(cpu_features(), weights)


def _finish(path: Path, weights: str) -> None:
    """Rewrite the weights as u8 if asked, and record the format in the file's metadata."""
    import onnx

    proto = onnx.load(str(path))
    if weights == "u8":
        weights_as_uint8(proto)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "adaptsoup.int8_weights", weights
    onnx.save(proto, str(path))


# ----------------------------------------------------------------------------------------------------------------
# Quantizing


def _pre_processed(path: Path, scratch: Path) -> Path:
    """onnxruntime's quantization pre-processing (shape inference, graph clean-up), or ``path`` if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = scratch / "pre.onnx"
    try:
        quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
        return pre
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation only
        return path


def quantize_int8(path: str | os.PathLike, weights: str = "auto") -> Path:
    """onnxruntime dynamic quantization to ``NAME.int8.onnx``, atomically: int8 weights for MatMul and Gemm, and
    fused ``Attention`` nodes (see :mod:`adaptsoup.deploy.optimize`) become ``QAttention``, whose q/k/v projection
    runs in int8 too (measured faster than leaving the fused attention in fp32).  ``weights``: s8, u8, s7, or
    auto (:func:`choose_int8_weights` for this CPU)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fmt = _resolved(weights).format
    path = Path(path)
    out = quantized_path(path, "dynamic")
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory(dir=path.parent) as scratch, quiet():
        source = _pre_processed(path, Path(scratch))
        quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm", "Attention"],
                         reduce_range=fmt == "s7")
        _finish(tmp, fmt)
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


def quantize_static_int8(path: str | os.PathLike, images: np.ndarray, config: StaticConfig = StaticConfig(),
                         weights: str = "auto") -> Path:
    """Static QDQ int8 (per-channel symmetric weights, symmetric activations) calibrated on ``images``, to
    ``NAME.int8-static.onnx``, atomically.  ``weights`` as for :func:`quantize_int8`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if config.calibration not in CALIBRATIONS:
        raise AdaptsoupError(f"unknown calibration {config.calibration!r}; use {' or '.join(CALIBRATIONS)}")
    if len(images) == 0:
        raise AdaptsoupError("static quantization needs calibration images")
    fmt = _resolved(weights).format
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
                        op_types_to_quantize=["MatMul", "Gemm"], reduce_range=fmt == "s7", extra_options=extra)
        _finish(tmp, fmt)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Checking


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
    weights: str = "s8"  # the weight format in the file (see the module docstring)


def quantize_and_compare(path: Path, batch: np.ndarray, fp32_logits: np.ndarray,
                         images: np.ndarray | None = None, labels: np.ndarray | None = None, *,
                         kind: str = "dynamic", calibration: np.ndarray | None = None,
                         config: StaticConfig = StaticConfig(), weights: str = "auto") -> Int8Check:
    """Quantize ``path`` (``kind``: dynamic, or static calibrated on ``calibration``; ``weights`` as for
    :func:`quantize_int8`), then compare the int8 model with the fp32 one on ``batch``, and score it on
    ``labels``: of ``images`` when given, else of ``batch``."""
    fmt = _resolved(weights).format
    if kind == "static":
        if calibration is None:
            raise AdaptsoupError("static quantization needs calibration images (--images or --calibration)")
        qpath = quantize_static_int8(path, calibration, config, fmt)
    else:
        qpath = quantize_int8(path, fmt)
    session = ort_session(qpath)
    got = onnx_logits(session, batch)
    check = Int8Check(path=str(qpath), size_bytes=qpath.stat().st_size, kind=kind, weights=fmt, **compare_logits(got, fp32_logits))
    if labels is not None:
        scored = got if images is None else onnx_logits(session, images)
        check.accuracy = float((scored.argmax(1) == labels).mean() * 100)
    return check
