"""``adaptsoup tta``: test-time adaptation (SAR, Tent, EATA or ROID) over a stream of images."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from adaptsoup_cli.common import fail, log_line, out


def tta(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint to adapt (a soup, or any adaptsoup checkpoint)."),
    target: Optional[Path] = typer.Option(None, "--target", "-t", help="Unlabeled image stream (folder, searched recursively)."),
    eval_labels: Optional[Path] = typer.Option(None, help="A labeled class_name/<image> folder used as the stream; its labels only score the online predictions."),
    method: str = typer.Option("sar", help="sar, tent, eata or roid."),
    out_dir: Path = typer.Option(Path("tta_out"), "--out", "-o", help="Where predictions.csv, adapted.safetensors and manifest.json go."),
    arch: Optional[str] = typer.Option(None, help="timm architecture, if the checkpoint carries no adaptsoup metadata."),
    batch_size: int = typer.Option(64, min=1, help="Stream batch size."),
    base_lr: Optional[float] = typer.Option(None, help="Learning rate per 64 images (lr = base_lr / 64 x batch); default SAR 1e-3, Tent 2.5e-4, EATA 1e-3, ROID 2.5e-4 (with --optimizer adam: 3.2e-4, i.e. 1e-3 at batch 200)."),
    rho: float = typer.Option(0.05, help="SAR: SAM radius."),
    e0_factor: float = typer.Option(0.4, help="SAR, EATA: entropy filter E0 = factor x ln(classes)."),
    reset_threshold: float = typer.Option(0.2, help="SAR: reset the model when the loss EMA falls below this."),
    episodic: bool = typer.Option(False, help="Reset to the initial model after every batch."),
    optimizer: str = typer.Option("sgd", help="Tent, EATA, ROID: sgd (momentum 0.9, Nesterov for ROID: their ImageNet settings) or adam (their CIFAR settings). SAR: sgd."),
    source: Optional[Path] = typer.Option(None, "--source", "-s", help="EATA: in-distribution images (a folder; labels, if any, are not used) for its Fisher anti-forgetting term, at most 2000; without it EATA runs as ETA."),
    d_margin: float = typer.Option(0.05, help="EATA: a reliable sample is used when |cosine(its softmax, the moving average)| < this (official 0.05 for ImageNet; 0.4 for 10 classes)."),
    fisher_alpha: float = typer.Option(2000.0, help="EATA: weight of the Fisher term (official 2000 for ImageNet; 1 in the CIFAR configs; 0: ETA)."),
    seed: int = typer.Option(0, help="Seed of the stream order."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Test-time adaptation (SAR, Tent, EATA or ROID) over a stream of images; writes online predictions and the adapted model."""
    from adaptsoup.core.progress import progress_bars
    from adaptsoup.tta.adapter import TTA_METHODS, TTAConfig
    from adaptsoup.tta.stream import tta_run_dir

    if method not in TTA_METHODS:
        fail(f"--method must be one of {', '.join(TTA_METHODS)}, got {method!r}")
    cfg = TTAConfig(method=method, batch_size=batch_size, base_lr=base_lr, rho=rho, e0_factor=e0_factor,
                    reset_threshold=reset_threshold, episodic=episodic, optimizer=optimizer, seed=seed, device=device,
                    d_margin=d_margin, fisher_alpha=fisher_alpha, fisher_images=str(source) if source else None)
    with progress_bars(progress) as bars:
        summary = tta_run_dir(str(model), str(out_dir), cfg, target=str(target) if target else None,
                              eval_labels=str(eval_labels) if eval_labels else None, arch=arch, progress=bars,
                              log=log_line)
    out.print(f"wrote {out_dir / 'predictions.csv'}, {out_dir / 'adapted.safetensors'}, {out_dir / 'manifest.json'}")
    if summary["online_accuracy"] is not None:
        out.print(f"online accuracy: {summary['online_accuracy']:.2f}%")
