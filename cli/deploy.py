"""``adaptsoup export`` and ``adaptsoup predict``: ONNX out of a checkpoint, predictions out of an ONNX model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from adaptsoup_cli.common import err, fail, log_line, out


def export(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint to export (adaptsoup .safetensors, or a state dict with --arch)."),
    onnx: Path = typer.Option(..., "--onnx", "-o", help="Where to write the ONNX model."),
    arch: Optional[str] = typer.Option(None, help="timm architecture, if the checkpoint carries no adaptsoup metadata."),
    images: Optional[Path] = typer.Option(None, help="Image folder for the parity batch (and accuracy, if labeled)."),
    labeled: bool = typer.Option(False, help="--images is an ImageFolder layout: also report accuracy."),
    quantize: Optional[str] = typer.Option(None, help="'int8': also write NAME.int8.onnx (onnxruntime dynamic quantization)."),
    opset: int = typer.Option(18, min=17, help="ONNX opset (17 or newer)."),
    tolerance: float = typer.Option(1e-3, help="Largest allowed |logit difference| between ONNX and PyTorch."),
) -> None:
    """Export a checkpoint to ONNX, check parity in onnxruntime, optionally quantize to int8."""
    from adaptsoup.core.data import Preprocess, load_folder
    from adaptsoup.core.models import class_names, load_model
    from adaptsoup.deploy.onnx import ParityError, export_and_check

    from adaptsoup.core.io import check_destination

    if quantize not in (None, "int8"):  # before the model is loaded and exported
        fail(f"--quantize: unknown quantization {quantize!r}; only 'int8' (dynamic) is supported")
    check_destination(onnx, "--onnx")
    net = load_model(arch, model)
    image_set = None
    if images is not None:
        pre = Preprocess.for_model(net)
        image_set = load_folder(images, pre, labeled=labeled, class_names=class_names(net) if labeled else None)
    try:
        report = export_and_check(net, onnx, images=image_set, quantize=quantize, opset=opset, tolerance=tolerance, log=log_line)
    except ParityError as exc:
        fail(str(exc), code=1)
    out.print(f"wrote {report.path} ({report.size_bytes / 1e6:.2f} MB, opset {report.opset}, {report.exporter} exporter)")
    out.print(f"parity on {report.batch_size} images: max |logit diff| {report.max_abs_diff:.2e}, top-1 agreement {report.top1_agreement:.1f}%")
    if report.fp32_accuracy is not None:
        out.print(f"fp32 accuracy: {report.fp32_accuracy:.2f}%")
    if report.quantized_path:
        out.print(
            f"wrote {report.quantized_path} ({report.int8_size_bytes / 1e6:.2f} MB): top-1 agreement with fp32 "
            f"{report.int8_top1_agreement:.1f}%, max |logit diff| {report.int8_max_abs_diff:.2e}"
            + (f", accuracy {report.int8_accuracy:.2f}%" if report.int8_accuracy is not None else "")
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
