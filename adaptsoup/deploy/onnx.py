"""Deployment: export to ONNX (dynamic batch, metadata), parity check in onnxruntime, int8 quantization,
and prediction over an image folder with the exported model."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adaptsoup.core.data import ImageSet, Preprocess, load_folder
from adaptsoup.errors import AdaptsoupError
from adaptsoup.core.io import atomic_path, write_atomic
from adaptsoup.core.models import model_meta

DEFAULT_OPSET = 18
PARITY_TOLERANCE = 1e-3


class ParityError(AdaptsoupError):
    """The exported model's outputs differ from PyTorch's beyond the tolerance."""


@dataclass
class ExportReport:
    path: str
    opset: int
    exporter: str
    max_abs_diff: float
    top1_agreement: float
    batch_size: int
    quantized_path: str | None = None
    int8_top1_agreement: float | None = None
    int8_max_abs_diff: float | None = None
    fp32_accuracy: float | None = None
    int8_accuracy: float | None = None
    size_bytes: int = 0
    int8_size_bytes: int | None = None


def onnx_metadata(model: nn.Module) -> dict[str, str]:
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


def export_onnx(model: nn.Module, out_path: str | os.PathLike, opset: int = DEFAULT_OPSET) -> tuple[Path, str]:
    """Write ``model`` as ONNX with input ``input`` [batch, 3, H, W] (normalised) and output ``logits``.

    Uses the torch.export-based exporter, falling back to the TorchScript one; class names and
    preprocessing go into the model's metadata.  The file is written atomically.
    """
    import onnx

    model = model.eval().cpu()
    _, h, w = model_meta(model).input_size
    example = torch.randn(2, 3, h, w)
    out_path = Path(out_path)
    exporter = "dynamo"
    with atomic_path(out_path) as tmp:
        try:
            with _quiet():
                torch.onnx.export(
                    model, (example,), str(tmp), input_names=["input"], output_names=["logits"],
                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), opset_version=opset, dynamo=True,
                    external_data=False, verbose=False,
                )
        except Exception:  # noqa: BLE001 - fall back to the TorchScript exporter
            exporter = "torchscript"
            with _quiet():
                torch.onnx.export(
                    model, (example,), str(tmp), input_names=["input"], output_names=["logits"],
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=min(opset, 17),
                    dynamo=False,
                )
        proto = onnx.load(str(tmp))
        for key, value in onnx_metadata(model).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.producer_name = "adaptsoup"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return out_path, exporter


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        import logging

        level = logging.getLogger("torch").level
        logging.getLogger("torch").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch").setLevel(level)


def ort_session(path: str | os.PathLike):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, object]:
    """Class names and preprocessing stored by :func:`export_onnx`."""
    props = ort_session(path).get_modelmeta().custom_metadata_map
    if "adaptsoup.input_size" not in props:
        raise AdaptsoupError(f"{path} was not exported by adaptsoup (no preprocessing metadata)")
    return {
        "arch": props.get("adaptsoup.arch", ""),
        "class_names": json.loads(props.get("adaptsoup.class_names", "[]")),
        "input_size": tuple(json.loads(props["adaptsoup.input_size"])),
        "mean": tuple(json.loads(props["adaptsoup.mean"])),
        "std": tuple(json.loads(props["adaptsoup.std"])),
        "interpolation": props.get("adaptsoup.interpolation", "bicubic"),
        "crop_pct": float(json.loads(props.get("adaptsoup.crop_pct", "1.0"))),
    }


def preprocess_from_onnx(path: str | os.PathLike) -> Preprocess:
    meta = read_onnx_metadata(path)
    _, h, w = meta["input_size"]
    return Preprocess(size=(int(h), int(w)), mean=meta["mean"], std=meta["std"], crop_pct=meta["crop_pct"], interpolation=meta["interpolation"])


def onnx_logits(session, batch: np.ndarray, batch_size: int = 256) -> np.ndarray:
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: batch[i : i + batch_size].astype(np.float32)})[0] for i in range(0, len(batch), batch_size)]
    return np.concatenate(outs, axis=0)


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
    quantize: str | None = None,
    opset: int = DEFAULT_OPSET,
    tolerance: float = PARITY_TOLERANCE,
) -> ExportReport:
    """Export, then compare onnxruntime with PyTorch on a real batch; optionally add an int8 model.

    Raises :class:`ParityError` when the largest absolute logit difference exceeds ``tolerance``.
    """
    path, exporter = export_onnx(model, out_path, opset=opset)
    batch = parity_batch(model, images)
    with torch.no_grad():
        reference = model.eval()(batch).float().numpy()
    session = ort_session(path)
    got = onnx_logits(session, batch.numpy())
    diff = float(np.abs(got - reference).max())
    report = ExportReport(
        path=str(path), opset=opset, exporter=exporter, max_abs_diff=diff,
        top1_agreement=float((got.argmax(1) == reference.argmax(1)).mean() * 100), batch_size=int(batch.shape[0]),
        size_bytes=path.stat().st_size,
    )
    labeled = images is not None and images.labels is not None
    if labeled:
        full = Preprocess.for_model(model).normalize(images.images).numpy()
        report.fp32_accuracy = float((onnx_logits(session, full).argmax(1) == images.labels.numpy()).mean() * 100)
    if diff > tolerance:
        raise ParityError(f"ONNX/PyTorch parity failed: max |logit difference| {diff:.2e} > {tolerance:.0e}")
    if quantize is not None:
        if quantize != "int8":
            raise AdaptsoupError(f"unknown quantization {quantize!r}; only 'int8' (dynamic) is supported")
        qpath = quantize_int8(path)
        qsession = ort_session(qpath)
        qgot = onnx_logits(qsession, batch.numpy())
        report.quantized_path = str(qpath)
        report.int8_size_bytes = qpath.stat().st_size
        report.int8_max_abs_diff = float(np.abs(qgot - got).max())
        report.int8_top1_agreement = float((qgot.argmax(1) == got.argmax(1)).mean() * 100)
        if labeled:
            report.int8_accuracy = float((onnx_logits(qsession, full).argmax(1) == images.labels.numpy()).mean() * 100)
    return report


def quantize_int8(path: str | os.PathLike) -> Path:
    """onnxruntime dynamic quantization (int8 weights, MatMul/Gemm) to ``NAME.int8.onnx``, atomically."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import tempfile

    path = Path(path)
    out = path.with_name(path.stem + ".int8.onnx")
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        pre = Path(scratch) / "pre.onnx"
        with _quiet():
            try:
                quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
                source = pre
            except Exception:  # noqa: BLE001 - pre-processing is an optimisation only
                source = path
            quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    return out


@dataclass
class PredictReport:
    csv_path: str
    images: int
    skipped: list[tuple[str, str]]
    accuracy: float | None = None


def predict_folder(onnx_path: str | os.PathLike, images_dir: str | os.PathLike, csv_path: str | os.PathLike, batch_size: int = 256) -> PredictReport:
    """Run an exported model over every image under ``images_dir``; write ``path,class,probability`` CSV."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise AdaptsoupError(f"ONNX model not found: {onnx_path}")
    meta = read_onnx_metadata(onnx_path)
    pre = preprocess_from_onnx(onnx_path)
    images = load_folder(images_dir, pre, cache=False)
    session = ort_session(onnx_path)
    logits = onnx_logits(session, pre.normalize(images.images).numpy(), batch_size)
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    names = meta["class_names"] or [str(i) for i in range(probs.shape[1])]
    top = probs.argmax(1)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "class", "probability"])
            for rel, k, p in zip(images.paths, top, probs[np.arange(len(top)), top]):
                writer.writerow([rel, names[int(k)], f"{float(p):.6f}"])

    write_atomic(csv_path, write)
    return PredictReport(csv_path=str(csv_path), images=len(images), skipped=images.skipped)
