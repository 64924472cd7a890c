"""The ``adaptsoup`` command: thin Typer wrappers over the library.

Errors a user can fix (bad paths, bad options, unreadable checkpoints) print one line and exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from adaptsoup.errors import AdaptsoupError

app = typer.Typer(
    name="adaptsoup",
    help="Self-Soupervision: make a deployed ViT robust to distribution shift without target labels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    err.print(f"[red]adaptsoup: error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# ----------------------------------------------------------------------------------------------------------------


@app.command()
def info(model: Path = typer.Argument(..., help="A checkpoint (.safetensors, .pt, .pth, .bin) or an ONNX file.")) -> None:
    """Show what a checkpoint or exported model holds: architecture, classes, preprocessing, provenance."""
    from adaptsoup.checkpoint import read_checkpoint

    if model.suffix == ".onnx":
        from adaptsoup.export import read_onnx_metadata

        if not model.is_file():
            fail(f"ONNX model not found: {model}")
        meta = read_onnx_metadata(model)
        for key, value in meta.items():
            out.print(f"{key}: {value}")
        return
    state, meta = read_checkpoint(model)
    table = Table(title=str(model), show_header=False)
    table.add_row("tensors", str(len(state)))
    table.add_row("parameters", f"{sum(v.numel() for v in state.values()):,}")
    if meta is None:
        table.add_row("metadata", "none (not written by adaptsoup: pass --arch when loading)")
    else:
        for key, value in meta.__dict__.items():
            table.add_row(key, str(value))
    out.print(table)


@app.command()
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
    from adaptsoup.data import Preprocess, load_folder
    from adaptsoup.export import ParityError, export_and_check
    from adaptsoup.models import class_names, load_model

    net = load_model(arch, model)
    image_set = None
    if images is not None:
        pre = Preprocess.for_model(net)
        image_set = load_folder(images, pre, labeled=labeled, class_names=class_names(net) if labeled else None)
    try:
        report = export_and_check(net, onnx, images=image_set, quantize=quantize, opset=opset, tolerance=tolerance)
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


@app.command()
def predict(
    onnx: Path = typer.Option(..., "--onnx", help="An ONNX model exported by adaptsoup."),
    images: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    csv: Path = typer.Option(Path("predictions.csv"), "--csv", help="Where to write path,class,probability."),
) -> None:
    """Run an exported model over a folder of images in onnxruntime; write a CSV of top-1 predictions."""
    from adaptsoup.export import predict_folder

    report = predict_folder(onnx, images, csv)
    out.print(f"wrote {report.csv_path}: {report.images} images" + (f", {len(report.skipped)} unreadable skipped" if report.skipped else ""))
    for path, reason in report.skipped[:10]:
        err.print(f"  skipped {path}: {reason}", highlight=False)


# ----------------------------------------------------------------------------------------------------------------


def _click_exceptions(name: str) -> tuple[type[BaseException], ...]:
    """The click exception class ``name`` from click and, where Typer vendors its own click, from Typer's."""
    found = [getattr(click.exceptions, name)]
    try:
        from typer._click import exceptions as vendored  # typer >= 0.20 ships its own click

        found.append(getattr(vendored, name))
    except (ImportError, AttributeError):
        pass
    return tuple(found)


NO_ARGS = _click_exceptions("NoArgsIsHelpError") if hasattr(click.exceptions, "NoArgsIsHelpError") else _click_exceptions("UsageError")[1:]
USAGE = _click_exceptions("UsageError")
ABORT = _click_exceptions("Abort")


def main(argv: Optional[List[str]] = None) -> None:
    """Console-script entry point: one-line errors, exit 2 for usage and input errors."""
    try:
        code = app(args=argv, standalone_mode=False, prog_name="adaptsoup")
    except NO_ARGS:
        code = 2  # the help text has been shown
    except USAGE as exc:
        err.print(f"adaptsoup: error: {exc.format_message()}", highlight=False, soft_wrap=True)
        code = 2
    except AdaptsoupError as exc:
        err.print(f"adaptsoup: error: {exc}", highlight=False, soft_wrap=True)
        code = 2
    except (KeyboardInterrupt, *ABORT):
        err.print("adaptsoup: interrupted")
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
