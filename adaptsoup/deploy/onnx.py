"""Export to ONNX: dynamic batch, class names and preprocessing as metadata, onnxruntime's fused operators
written into the file (see :mod:`adaptsoup.deploy.optimize`), parity with PyTorch checked in onnxruntime,
and optionally int8 copies (see :mod:`adaptsoup.deploy.quantize`).

The checks (parity, int8 agreement, accuracy) are measured on *check images* that static int8 never
calibrated on: all of ``images`` when calibration has its own folder (or there is no static model), else the
part of ``images`` that a seeded, class-balanced split (:func:`split_for_calibration`) did not give to
calibration; without images, on uniform noise, and the report and log say so (:class:`CheckImages`)."""

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
from adaptsoup.deploy.quantize import Int8Check, StaticConfig, choose_int8_weights, cpu_features, quantize_and_compare, quantize_kinds
from adaptsoup.deploy.runtime import onnx_logits, ort_session, quiet, read_onnx_metadata  # noqa: F401 (re-exported)
from adaptsoup.errors import AdaptsoupError

DEFAULT_OPSET = 18
TORCHSCRIPT_MAX_OPSET = 17  # the TorchScript exporter's newest opset
PARITY_TOLERANCE = 1e-3
SPLIT_SEED = 0  # the calibration/check split of --images
NOISE_IMAGES = 16  # the check images when none are given


class ParityError(AdaptsoupError):
    """The exported model's outputs differ from PyTorch's beyond the tolerance."""


@dataclass(frozen=True)
class CheckImages:
    """What export's checks were measured on, and what static int8 calibrated on."""

    source: str  # "folder": all of the images given; "split": the images given less calibration's share; "noise"
    count: int
    folder: str | None = None
    calibration_folder: str | None = None  # None: no static int8; the images' own folder when split from them
    calibration_count: int = 0
    seed: int | None = None  # the split's
    by_class: bool = False  # the split was class-balanced (labeled images)

    def describe(self) -> str:
        if self.source == "noise":
            text = f"{self.count} uniform-noise images (no --images given): parity and int8 agreement on noise, not on real images"
        elif self.source == "split":
            kind = "class-balanced split" if self.by_class else "split"
            text = (f"{self.count} images of {self.folder} held out from calibration (seeded {kind}, seed {self.seed}; "
                    f"the other {self.calibration_count} calibrated static int8)")
        else:
            text = f"all {self.count} images of {self.folder}"
        if self.calibration_folder is not None and self.source != "split":
            text += f"; static int8 calibrated on {self.calibration_count} images of {self.calibration_folder}"
        return text


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
    checked_on: CheckImages | None = None  # what parity, int8 agreement and accuracy were measured on
    int8_weights: str | None = None  # the int8 weight format (s8, u8, s7) and why it was chosen
    int8_weights_reason: str | None = None


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


def finish_exported(path: Path, metadata: dict[str, str], model: nn.Module, optimize: bool):
    """The exported file at ``path`` with ``metadata`` written in, checked, and (``optimize``) carrying
    onnxruntime's fusions for ``model``'s shape; saved back.  Returns (proto, optimisation or None)."""
    import onnx

    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "adaptsoup"
    onnx.checker.check_model(proto)
    optimization = None
    if optimize:
        proto, optimization = optimize_proto(proto, vit_shape(model))
    onnx.save(proto, str(path))
    return proto, optimization


def export_with_fallback(export: Callable[[bool], None]) -> tuple[str, str | None]:
    """``export(dynamo=True)`` (the torch.export-based exporter); if it fails, ``export(dynamo=False)`` (TorchScript).
    Returns the exporter used and, after a fallback, why the first failed (one line)."""
    try:
        export(True)
        return "dynamo", None
    except Exception as exc:  # noqa: BLE001 - fall back to the TorchScript exporter, and say why
        reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
        export(False)
        return "torchscript", reason


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
    model = model.eval().cpu()
    _, h, w = model_meta(model).input_size
    example = torch.randn(2, 3, h, w)
    source = fusable_copy(model)[0] if optimize else model
    out_path = Path(out_path)
    optimization = None
    with atomic_path(out_path) as tmp:
        exporter, reason = export_with_fallback(lambda dynamo: _torch_export(source, example, tmp, opset, dynamo=dynamo))
        proto, optimization = finish_exported(tmp, onnx_metadata(model), model, optimize)
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


def noise_images(model: nn.Module, count: int = NOISE_IMAGES, seed: int = 0) -> torch.Tensor:
    """``count`` seeded uniform-noise uint8 images of the model's input size: the check images when none are given."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, *Preprocess.for_model(model).size), generator=gen, dtype=torch.uint8)


def split_for_calibration(labels: np.ndarray | None, count: int, calibration: int,
                          seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint ``(calibration, check)`` indices into ``count`` images, seeded and class-balanced: calibration
    takes the classes in turn, each class's images in a seeded order, until it has ``calibration`` images,
    never more than half of a class, so every class keeps at least half its images for the checks.  Without
    ``labels`` the images are one class.  Calibration indices come in that class-interleaved order, check
    indices sorted."""
    labels = np.zeros(count, dtype=np.int64) if labels is None else np.asarray(labels)
    rng = np.random.default_rng(seed)
    queues = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        queues.append(list(rng.permutation(members)[: len(members) // 2]))
    picked: list[int] = []
    while len(picked) < calibration and any(queues):
        for queue in queues:
            if queue and len(picked) < calibration:
                picked.append(int(queue.pop(0)))
    chosen = np.array(picked, dtype=np.int64)
    return chosen, np.setdiff1d(np.arange(count), chosen)


def plan_checks(images: ImageSet | None, calibration: ImageSet | None, static: bool,
                max_calibration: int) -> tuple[ImageSet | None, ImageSet | None, CheckImages]:
    """``(check images, calibration images, what they are)``.  Static int8 calibrates on ``calibration`` when
    given (a seeded ``max_calibration`` of it when larger), else on a class-balanced share of ``images``, which
    the checks then never see; ``None`` check images stand for :func:`noise_images`."""
    given = images is not None and len(images) > 0
    if calibration is not None and len(calibration) == 0:
        raise AdaptsoupError("the calibration folder holds no readable images")
    if static and calibration is None and given:
        labels = None if images.labels is None else images.labels.numpy()
        calib_idx, check_idx = split_for_calibration(labels, len(images), max_calibration)
        if len(calib_idx) == 0:
            raise AdaptsoupError(f"static int8: {len(images)} image(s) in {images.root} are too few to hold any out "
                                 "for calibration (it takes up to half of each class); pass --calibration FOLDER")
        check, calib = images.subset(check_idx), images.subset(calib_idx)
        return check, calib, CheckImages("split", len(check), images.root, images.root, len(calib), SPLIT_SEED, labels is not None)
    calib = calibration if static else None
    if calib is not None and len(calib) > max_calibration:
        calib = calib.subset(np.random.default_rng(SPLIT_SEED).permutation(len(calib))[:max_calibration])
    folder, count = (calib.root, len(calib)) if calib is not None else (None, 0)
    if given:
        return images, calib, CheckImages("folder", len(images), images.root, folder, count)
    return None, calib, CheckImages("noise", NOISE_IMAGES, None, folder, count)


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
    calibration: ImageSet | None = None,
    int8_weights: str = "auto",
    parity_images: int = 64,
) -> ExportReport:
    """Export, then compare onnxruntime with PyTorch; optionally add int8 models and compare them with fp32.

    ``quantize``: ``"dynamic"`` (alias ``"int8"``), ``"static"``, both as ``"dynamic,static"`` or a list.
    Static int8 calibrates on ``calibration``, or on a held-out share of ``images`` (:func:`plan_checks`).
    ``int8_weights``: the weight format (auto: chosen for this CPU, :func:`choose_int8_weights`).  Parity is
    measured on the first ``parity_images`` check images, int8 agreement and accuracy (labeled images) on all
    of them.  Raises :class:`ParityError` when the largest absolute logit difference exceeds ``tolerance``.
    """
    kinds = quantize_kinds(quantize)
    weights = choose_int8_weights(cpu_features(), int8_weights) if kinds else None
    has_images = images is not None and len(images) > 0
    if "static" in kinds and not has_images and calibration is None:
        raise AdaptsoupError("static int8 quantization needs calibration images (--images or --calibration)")
    check_set, calib_set, checked_on = plan_checks(images, calibration, "static" in kinds, static.max_images)
    exported = export_onnx(model, out_path, opset=opset, log=log, optimize=optimize)
    pre = Preprocess.for_model(model)
    inputs = pre.normalize(check_set.images if check_set is not None else noise_images(model)).numpy()
    labels = check_set.labels.numpy() if check_set is not None and check_set.labels is not None else None
    batch = torch.from_numpy(inputs[:parity_images])
    with torch.no_grad():
        reference = model.eval()(batch).float().numpy()
    session = ort_session(exported.path)
    fp32 = onnx_logits(session, inputs if kinds or labels is not None else batch.numpy())
    diff = float(np.abs(fp32[: len(batch)] - reference).max())
    report = ExportReport(
        path=str(exported.path), opset=exported.opset, exporter=exported.exporter, max_abs_diff=diff,
        top1_agreement=float((fp32[: len(batch)].argmax(1) == reference.argmax(1)).mean() * 100), batch_size=len(batch),
        size_bytes=exported.path.stat().st_size, fallback_reason=exported.fallback_reason, checked_on=checked_on,
    )
    if exported.optimization is not None:
        report.optimized, report.fusions = exported.optimization.applied, exported.optimization.fused
        report.optimize_note = exported.optimization.reason
    if labels is not None:
        report.fp32_accuracy = float((fp32.argmax(1) == labels).mean() * 100)
    noise = "uniform-noise " if checked_on.source == "noise" else ""
    if diff > tolerance:
        raise ParityError(f"ONNX/PyTorch parity failed on {len(batch)} {noise}images: max |logit difference| {diff:.2e} > {tolerance:.0e}")
    if noise:
        log(f"export checks: {checked_on.describe()}")
    if weights is not None:
        report.int8_weights, report.int8_weights_reason = weights.format, weights.reason
    calib_inputs = pre.normalize(calib_set.images).numpy() if calib_set is not None else None
    for kind in kinds:
        check = quantize_and_compare(exported.path, inputs, fp32, labels=labels, kind=kind, calibration=calib_inputs,
                                     config=static, weights=weights.format)
        report.quantized.append(check)
        if kind == "dynamic":
            report.quantized_path, report.int8_size_bytes = check.path, check.size_bytes
            report.int8_max_abs_diff, report.int8_top1_agreement, report.int8_accuracy = check.max_abs_diff, check.top1_agreement, check.accuracy
    return report
