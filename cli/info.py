"""``adaptsoup info``: what a checkpoint or an exported model holds."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from adaptsoup_cli.common import fail, out


def info(model: Path = typer.Argument(..., help="A checkpoint (.safetensors, .pt, .pth, .bin) or an ONNX file.")) -> None:
    """Show what a checkpoint or exported model holds: architecture, classes, preprocessing, provenance."""
    from adaptsoup.core.checkpoint import SAFETENSORS_SUFFIXES, read_checkpoint, safetensors_summary

    if model.suffix == ".onnx":
        from adaptsoup.deploy.runtime import read_onnx_metadata  # onnxruntime only: no torch

        if not model.is_file():
            fail(f"ONNX model not found: {model}")
        meta = read_onnx_metadata(model)
        for key, value in meta.items():
            out.print(f"{key}: {value}")
        return
    if model.suffix in SAFETENSORS_SUFFIXES and model.is_file():
        tensors, parameters, meta = safetensors_summary(model)  # the header alone: no torch
    else:
        state, meta = read_checkpoint(model)
        tensors, parameters = len(state), sum(v.numel() for v in state.values())
    table = Table(title=str(model), show_header=False)
    table.add_row("tensors", str(tensors))
    table.add_row("parameters", f"{parameters:,}")
    if meta is None:
        table.add_row("metadata", "none (not written by adaptsoup: pass --arch when loading)")
    else:
        for key, value in meta.__dict__.items():
            table.add_row(key, str(value))
    out.print(table)
