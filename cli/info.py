"""``adaptsoup info``: what a checkpoint or an exported model holds."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from adaptsoup_cli.common import fail, out


def info(model: Path = typer.Argument(..., help="A checkpoint (.safetensors, .pt, .pth, .bin) or an ONNX file.")) -> None:
    """Show what a checkpoint or exported model holds: architecture, classes, preprocessing, provenance."""
    from adaptsoup.core.checkpoint import read_checkpoint

    if model.suffix == ".onnx":
        from adaptsoup.deploy.onnx import read_onnx_metadata

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
