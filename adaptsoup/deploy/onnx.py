"""Export to ONNX: dynamic batch, class names and preprocessing as metadata, onnxruntime's fused operators
written into the file (see :mod:`adaptsoup.deploy.optimize`), parity with PyTorch checked in onnxruntime,
and optionally int8 copies (see :mod:`adaptsoup.deploy.quantize`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from adaptsoup.core.data import ImageSet, Preprocess
from adaptsoup.core.io import atomic_path
from adaptsoup.core.models import model_meta
from adaptsoup.deploy.fusable import fusable_copy
from adaptsoup.deploy.optimize import Optimization, optimize_proto, vit_shape
from adaptsoup.deploy.quantize import Int8Check, StaticConfig, quantize_and_compare, quantize_kinds
from adaptsoup.deploy.runtime import onnx_logits, ort_session, quiet, read_onnx_metadata  # noqa: F401 (re-exported)
from adaptsoup.errors import AdaptsoupError

DEFAULT_OPSET = 18
TORCHSCRIPT_MAX_OPSET = 17  # the TorchScript exporter's newest opset
PARITY_TOLERANCE = 1e-3


class ParityError(AdaptsoupError):
    """The exported model's outputs differ from PyTorch's beyond the tolerance."""


@dataclass
class ExportReport:
    path: str
    opset: int  # as written in the file (the TorchScript fallback writes at most 17)
    exporter: str
    max_abs_diff: float
    top1_agreement: float
    batch_size: int
    quantized_path: str | None = None  # the dynamic int8 model's path and checks, as before static int8 existed
    int8_top1_agreement: float | None = None
    int8_max_abs_diff: float | None = None
    fp32_accuracy: float | None = None
    int8_accuracy: float | None = None
    size_bytes: int = 0
    int8_size_bytes: int | None = None
    fallback_reason: str | None = None  # why the torch.export-based exporter was not used
    optimized: bool = False  # onnxruntime's fusions are in the file
    fusions: dict[str, int] = field(default_factory=dict)  # fused nodes in the file, by op type
    optimize_note: str | None = None  # why the file was not optimised (or what the optimizer could not fuse)
    quantized: list[Int8Check] = field(default_factory=list)  # one per int8 kind asked for, dynamic and/or static


@dataclass
class OnnxExport:
    path: Path
    exporter: str  # "dynamo" (torch.export-based) or "torchscript" (the fallback)
    opset: int  # the default-domain opset the file declares
    fallback_reason: str | None = None
    optimization: Optimization | None = None  # None when not asked for


def onnx_metadata(model: nn.Module) -> dict[str, str]:
    """The model's class names, preprocessing and provenance as ONNX metadata properties."""
    meta = model_meta(model)
    return {
        "adaptsoup.arch": meta.arch,
        "adaptsoup.class_names": json.dumps(meta.class_names),
        "adaptsoup.input_size": json.dumps(list(meta.input_size)),
        "adaptsoup.mean": json.dumps(list(meta.mean)),
        "adaptsoup.std": json.dumps(list(meta.std)),
        "adaptsoup.interpolation": meta.interpolation,
        "adaptsoup.crop_pct": json.dumps(meta.crop_pct),
        "adaptsoup.provenance": json.dumps(meta.provenance, default=str),
    }


def written_opset(proto) -> int:
    """The default-domain (``ai.onnx``) opset an ONNX model declares."""
    return next(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _torch_export(model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamo: bool) -> None:
    common = dict(input_names=["input"], output_names=["logits"], dynamo=dynamo)
    with quiet():
        if dynamo:
            torch.onnx.export(model, (example,), str(path), opset_version=opset, external_data=False, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), **common)
        else:
            torch.onnx.export(model, (example,), str(path), opset_version=min(opset, TORCHSCRIPT_MAX_OPSET),
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **common)


def export_onnx(model: nn.Module, out_path: str | os.PathLike, opset: int = DEFAULT_OPSET,
                log: Callable[[str], None] = print, optimize: bool = True) -> OnnxExport:
    """Write ``model`` as ONNX with input ``input`` [batch, 3, H, W] (normalised) and output ``logits``.

    Uses the torch.export-based exporter; if it fails, says why through ``log`` and falls back to the
    TorchScript one (opset at most 17).  With ``optimize``, a ViT's attention is exported in the layout
    onnxruntime fuses (:func:`fusable_copy`) and the fused graph (:func:`optimize_proto`) is what the file
    holds; if the optimizer fails, the plain graph is written and ``log`` says why.  Class names and
    preprocessing go into the model's metadata; the opset reported is the one the file declares.  The file
    is written atomically.
    """
    import onnx

    model = model.eval().cpu()
    _, h, w = model_meta(model).input_size
    example = torch.randn(2, 3, h, w)
    source = fusable_copy(model)[0] if optimize else model
    out_path = Path(out_path)
    exporter, reason, optimization = "dynamo", None, None
    with atomic_path(out_path) as tmp:
        try:
            _torch_export(source, example, tmp, opset, dynamo=True)
        except Exception as exc:  # noqa: BLE001 - fall back to the TorchScript exporter, and say why
            exporter = "torchscript"
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
            _torch_export(source, example, tmp, opset, dynamo=False)
        proto = onnx.load(str(tmp))
        for key, value in onnx_metadata(model).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.producer_name = "adaptsoup"
        onnx.checker.check_model(proto)
        if optimize:
            proto, optimization = optimize_proto(proto, vit_shape(model))
        onnx.save(proto, str(tmp))
    written = written_opset(proto)
    if reason is not None:
        log(f"ONNX export: the torch.export-based exporter failed ({reason}); "
            f"wrote opset {written} with the TorchScript exporter instead of opset {opset}")
    if optimization is not None and optimization.reason is not None:
        kept = "kept onnxruntime's fusions" if optimization.applied else "wrote the plain graph"
        log(f"ONNX optimisation: {optimization.reason}; {kept}")
    return OnnxExport(path=out_path, exporter=exporter, opset=written, fallback_reason=reason, optimization=optimization)


def preprocess_from_onnx(path: str | os.PathLike) -> Preprocess:
    """The :class:`Preprocess` an exported model expects, from its metadata."""
    return Preprocess.from_meta(read_onnx_metadata(path))


def parity_batch(model: nn.Module, images: ImageSet | None, batch_size: int = 64, seed: int = 0) -> torch.Tensor:
    """A real batch from ``images`` when given, else a seeded random one."""
    pre = Preprocess.for_model(model)
    if images is not None and len(images):
        return pre.normalize(images.images[:batch_size])
    gen = torch.Generator().manual_seed(seed)
    return pre.normalize(torch.randint(0, 256, (min(batch_size, 16), 3, *pre.size), generator=gen, dtype=torch.uint8))


def export_and_check(
    model: nn.Module,
    out_path: str | os.PathLike,
    *,
    images: ImageSet | None = None,
    quantize: str | Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    tolerance: float = PARITY_TOLERANCE,
    log: Callable[[str], None] = print,
    optimize: bool = True,
    static: StaticConfig = StaticConfig(),
) -> ExportReport:
    """Export, then compare onnxruntime with PyTorch on a real batch; optionally add int8 models.

    ``quantize``: ``"dynamic"`` (alias ``"int8"``), ``"static"`` (calibrated on ``images``), both as
    ``"dynamic,static"`` or a list.  Raises :class:`ParityError` when the largest absolute logit difference
    exceeds ``tolerance``.
    """
    kinds = quantize_kinds(quantize)
    if "static" in kinds and (images is None or not len(images)):
        raise AdaptsoupError("static int8 quantization needs calibration images (--images)")
    exported = export_onnx(model, out_path, opset=opset, log=log, optimize=optimize)
    batch = parity_batch(model, images)
    with torch.no_grad():
        reference = model.eval()(batch).float().numpy()
    session = ort_session(exported.path)
    got = onnx_logits(session, batch.numpy())
    diff = float(np.abs(got - reference).max())
    report = ExportReport(
        path=str(exported.path), opset=exported.opset, exporter=exported.exporter, max_abs_diff=diff,
        top1_agreement=float((got.argmax(1) == reference.argmax(1)).mean() * 100), batch_size=int(batch.shape[0]),
        size_bytes=exported.path.stat().st_size, fallback_reason=exported.fallback_reason,
    )
    if exported.optimization is not None:
        report.optimized, report.fusions = exported.optimization.applied, exported.optimization.fused
        report.optimize_note = exported.optimization.reason
    labeled = images is not None and images.labels is not None
    normalized = Preprocess.for_model(model).normalize(images.images).numpy() if images is not None and len(images) else None
    labels = images.labels.numpy() if labeled else None
    if labeled:
        report.fp32_accuracy = float((onnx_logits(session, normalized).argmax(1) == labels).mean() * 100)
    if diff > tolerance:
        raise ParityError(f"ONNX/PyTorch parity failed: max |logit difference| {diff:.2e} > {tolerance:.0e}")
    for kind in kinds:
        check = quantize_and_compare(exported.path, batch.numpy(), got, normalized if labeled else None, labels,
                                     kind=kind, calibration=normalized, config=static)
        report.quantized.append(check)
        if kind == "dynamic":
            report.quantized_path, report.int8_size_bytes = check.path, check.size_bytes
            report.int8_max_abs_diff, report.int8_top1_agreement, report.int8_accuracy = check.max_abs_diff, check.top1_agreement, check.accuracy
    return report
