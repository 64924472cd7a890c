"""``adaptsoup tta``: test-time adaptation (SAR or Tent) over a stream of images."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from adaptsoup_cli.common import fail, log_line, out


def tta(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint to adapt (a soup, or any adaptsoup checkpoint)."),
    target: Optional[Path] = typer.Option(None, "--target", "-t", help="Unlabeled image stream (folder, searched recursively)."),
    eval_labels: Optional[Path] = typer.Option(None, help="A labeled class_name/<image> folder used as the stream; its labels only score the online predictions."),
    method: str = typer.Option("sar", help="sar or tent."),
    out_dir: Path = typer.Option(Path("tta_out"), "--out", "-o", help="Where predictions.csv, adapted.safetensors and manifest.json go."),
    arch: Optional[str] = typer.Option(None, help="timm architecture, if the checkpoint carries no adaptsoup metadata."),
    batch_size: int = typer.Option(64, min=1, help="Stream batch size."),
    base_lr: Optional[float] = typer.Option(None, help="Learning rate per 64 images (lr = base_lr / 64 x batch); default SAR 1e-3, Tent 2.5e-4."),
    rho: float = typer.Option(0.05, help="SAR: SAM radius."),
    e0_factor: float = typer.Option(0.4, help="SAR: entropy filter E0 = factor x ln(classes)."),
    reset_threshold: float = typer.Option(0.2, help="SAR: reset the model when the loss EMA falls below this."),
    episodic: bool = typer.Option(False, help="Reset to the initial model after every batch."),
    optimizer: str = typer.Option("sgd", help="Tent: sgd (momentum 0.9, its ImageNet setting) or adam (its CIFAR setting)."),
    seed: int = typer.Option(0, help="Seed of the stream order."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Test-time adaptation (SAR or Tent) over a stream of images; writes online predictions and the adapted model."""
    from adaptsoup.core.progress import progress_bars
    from adaptsoup.tta.adapter import TTA_METHODS, TTAConfig
    from adaptsoup.tta.stream import tta_run_dir

    if method not in TTA_METHODS:
        fail(f"--method must be one of {', '.join(TTA_METHODS)}, got {method!r}")
    cfg = TTAConfig(method=method, batch_size=batch_size, base_lr=base_lr, rho=rho, e0_factor=e0_factor,
                    reset_threshold=reset_threshold, episodic=episodic, optimizer=optimizer, seed=seed, device=device)
    with progress_bars(progress) as bars:
        summary = tta_run_dir(str(model), str(out_dir), cfg, target=str(target) if target else None,
                              eval_labels=str(eval_labels) if eval_labels else None, arch=arch, progress=bars,
                              log=log_line)
    out.print(f"wrote {out_dir / 'predictions.csv'}, {out_dir / 'adapted.safetensors'}, {out_dir / 'manifest.json'}")
    if summary["online_accuracy"] is not None:
        out.print(f"online accuracy: {summary['online_accuracy']:.2f}%")
