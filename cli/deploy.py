"""``adaptsoup export`` and ``adaptsoup predict``: ONNX out of a checkpoint, predictions out of an ONNX model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from adaptsoup_cli.common import err, fail, log_line, out


def export(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint to export (adaptsoup .safetensors, or a state dict with --arch), or an adapt run directory: its recommended model."),
    force: bool = typer.Option(False, "--force", help="Export a soup its adapt run estimated to be worse than the deployed model."),
    onnx: Path = typer.Option(..., "--onnx", "-o", help="Where to write the ONNX model."),
    arch: Optional[str] = typer.Option(None, help="timm architecture, if the checkpoint carries no adaptsoup metadata."),
    images: Optional[Path] = typer.Option(None, help="Image folder the checks are measured on (parity, int8 agreement; accuracy if "
                                                     "--labeled). Without --calibration, static int8 calibrates on a held-out share of it."),
    labeled: bool = typer.Option(False, help="--images is an ImageFolder layout: also report accuracy (and split it class by class)."),
    calibration: Optional[Path] = typer.Option(None, help="Image folder static int8 calibrates on (up to 512 images); --images is then all for checking."),
    quantize: Optional[str] = typer.Option(
        None, help="int8 copies: 'dynamic' (NAME.int8.onnx; 'int8' is an alias), 'static' (NAME.int8-static.onnx, QDQ, "
                   "calibrated on --calibration or part of --images) or 'dynamic,static'."),
    calibration_method: str = typer.Option("percentile", help="Static int8 activation ranges: 'percentile' or 'minmax'."),
    int8_weights: str = typer.Option("auto", help="int8 weight format: 'auto' (for this CPU), 's8' (fastest with VNNI), 'u8' "
                                                  "(exact on every CPU) or 's7' (7-bit, never saturates)."),
    optimize: bool = typer.Option(True, "--optimize/--no-optimize", help="Write onnxruntime's fused operators (Attention, BiasGelu, LayerNorm) into the file."),
    opset: int = typer.Option(18, min=17, help="ONNX opset (17 or newer)."),
    tolerance: float = typer.Option(1e-3, help="Largest allowed |logit difference| between ONNX and PyTorch."),
) -> None:
    """Export a checkpoint to ONNX (optimised for onnxruntime), check parity in onnxruntime, optionally quantize to int8."""
    from adaptsoup.core.data import Preprocess, load_folder
    from adaptsoup.core.io import check_destination
    from adaptsoup.core.models import class_names, load_model
    from adaptsoup.deploy.onnx import ParityError, export_and_check
    from adaptsoup.deploy.quantize import CALIBRATIONS, WEIGHT_FORMATS, StaticConfig, quantize_kinds
    from adaptsoup.errors import AdaptsoupError

    try:  # before the model is loaded and exported
        kinds = quantize_kinds(quantize)
    except AdaptsoupError as exc:
        fail(f"--quantize: {exc}")
    if calibration_method not in CALIBRATIONS:
        fail(f"--calibration-method: unknown method {calibration_method!r}; use {' or '.join(CALIBRATIONS)}")
    if int8_weights not in WEIGHT_FORMATS:
        fail(f"--int8-weights: unknown format {int8_weights!r}; use {', '.join(WEIGHT_FORMATS)}")
    if calibration is not None and str(calibration) in CALIBRATIONS and not calibration.is_dir():
        fail(f"--calibration takes a folder of calibration images; the range estimator is --calibration-method {calibration}")
    if calibration is not None and "static" not in kinds:
        fail("--calibration is for static int8: add --quantize static")
    if "static" in kinds and images is None and calibration is None:
        fail("--quantize static needs calibration images: pass --calibration FOLDER or --images FOLDER (the images the model will see)")
    check_destination(onnx, "--onnx")
    from adaptsoup.pipeline.deploy_choice import resolve_export

    try:
        choice = resolve_export(model, force)
    except AdaptsoupError as exc:
        fail(str(exc))
    if choice.note:
        log_line(f"export {choice.path}: {choice.note}")
    net = load_model(arch, choice.path)
    pre = Preprocess.for_model(net)
    image_set = calibration_set = None
    if images is not None:
        image_set = load_folder(images, pre, labeled=labeled, class_names=class_names(net) if labeled else None)
    if calibration is not None:
        calibration_set = load_folder(calibration, pre)
    try:
        report = export_and_check(net, onnx, images=image_set, quantize=kinds, opset=opset, tolerance=tolerance, log=log_line,
                                  optimize=optimize, static=StaticConfig(calibration=calibration_method),
                                  calibration=calibration_set, int8_weights=int8_weights)
    except ParityError as exc:
        fail(str(exc), code=1)
    print_export_report(report)


def print_export_report(report) -> None:
    """What ``export`` wrote: the fp32 file (with its fusions and parity), what it was checked on, then each int8 copy."""
    out.print(f"wrote {report.path} ({report.size_bytes / 1e6:.2f} MB, opset {report.opset}, {report.exporter} exporter)")
    if report.optimized:
        fused = ", ".join(f"{count} {op}" for op, count in report.fusions.items()) or "nothing"
        out.print(f"optimised for onnxruntime: {fused}")
    else:
        out.print("not optimised" + (f" ({report.optimize_note})" if report.optimize_note else " (--no-optimize)"))
    if report.checked_on is not None:
        out.print(f"checked on {report.checked_on.describe()}")
    out.print(f"parity on {report.batch_size} images: max |logit diff| {report.max_abs_diff:.2e}, top-1 agreement {report.top1_agreement:.1f}%")
    if report.fp32_accuracy is not None:
        out.print(f"fp32 accuracy: {report.fp32_accuracy:.2f}%")
    if report.int8_weights is not None:
        out.print(f"int8 weights: {report.int8_weights} ({report.int8_weights_reason})")
    for check in report.quantized:
        out.print(
            f"wrote {check.path} ({check.size_bytes / 1e6:.2f} MB, {check.kind} int8): top-1 agreement with fp32 "
            f"{check.top1_agreement:.1f}%, max |logit diff| {check.max_abs_diff:.2e}"
            + (f", accuracy {check.accuracy:.2f}%" if check.accuracy is not None else "")
        )


def predict(
    onnx: Path = typer.Option(..., "--onnx", help="An ONNX model exported by adaptsoup."),
    images: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    csv: Path = typer.Option(Path("predictions.csv"), "--csv", help="Where to write path,class,probability."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per onnxruntime run."),  # predict.DEFAULT_BATCH_SIZE
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="onnxruntime threads (default: the cores this process may use)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Run an exported model over a folder of images in onnxruntime; write a CSV of top-1 predictions.

    The folder is streamed (decoding the next batch while the model runs), so memory does not grow with it."""
    from adaptsoup.core.io import check_destination
    from adaptsoup.core.progress import progress_bars
    from adaptsoup.deploy.predict import predict_folder

    check_destination(csv, "--csv")
    with progress_bars(progress) as bars:
        report = predict_folder(onnx, images, csv, batch_size=batch_size, threads=threads, progress=bars)
    skipped = f", {len(report.skipped)} skipped (unreadable or not images)" if report.skipped else ", 0 skipped"
    out.print(f"wrote {report.csv_path}: {report.images} images{skipped}, {report.images_per_s:.1f} images/s, "
              f"{report.seconds:.1f} s ({report.threads} thread{'' if report.threads == 1 else 's'}, batch {report.batch_size})")
    for path, reason in report.skipped[:10]:
        err.print(f"  skipped {path}: {reason}", markup=False, highlight=False, soft_wrap=True)
