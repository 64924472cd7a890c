"""``adaptsoup tta``: test-time adaptation (SAR, Tent, EATA or ROID of a checkpoint; FOA, forward passes only, of an
ONNX export) over a stream of images."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from adaptsoup_cli.common import fail, log_line, out


def tta(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Checkpoint to adapt (a soup, or any adaptsoup checkpoint); with --onnx (foa): the checkpoint the prompt-capable ONNX model is exported from, to --onnx."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="foa: the prompt-capable ONNX model to adapt with forward passes only, in onnxruntime (fp32 or int8). With --model it is first exported there."),
    target: Optional[Path] = typer.Option(None, "--target", "-t", help="Unlabeled image stream (folder, searched recursively)."),
    eval_labels: Optional[Path] = typer.Option(None, help="A labeled class_name/<image> folder used as the stream; its labels only score the online predictions."),
    method: str = typer.Option("sar", help="sar, tent, eata or roid (of --model); foa (of --onnx)."),
    out_dir: Path = typer.Option(Path("tta_out"), "--out", "-o", help="Where predictions.csv, adapted.safetensors (foa: adapted.onnx) and manifest.json go."),
    arch: Optional[str] = typer.Option(None, help="timm architecture, if the checkpoint carries no adaptsoup metadata."),
    batch_size: int = typer.Option(64, min=1, help="Stream batch size."),
    base_lr: Optional[float] = typer.Option(None, help="Learning rate per 64 images (lr = base_lr / 64 x batch); default SAR 1e-3, Tent 2.5e-4, EATA 1e-3, ROID 2.5e-4 (with --optimizer adam: 3.2e-4, i.e. 1e-3 at batch 200)."),
    rho: float = typer.Option(0.05, help="SAR: SAM radius."),
    e0_factor: float = typer.Option(0.4, help="SAR, EATA: entropy filter E0 = factor x ln(classes)."),
    reset_threshold: float = typer.Option(0.2, help="SAR: reset the model when the loss EMA falls below this."),
    episodic: bool = typer.Option(False, help="Reset to the initial model after every batch."),
    guard: bool = typer.Option(False, "--guard/--no-guard", help="sar, tent, eata, roid: reset to the initial model when the adapted model's predictions drift from the unadapted model's (see --guard-min-agreement, --guard-min-marginal-ratio); one extra forward pass per batch."),
    guard_window: int = typer.Option(8, "--guard-window", min=1, help="With --guard: batches in the moving window the guard judges."),
    guard_min_agreement: float = typer.Option(0.5, "--guard-min-agreement", min=0.0, max=1.0, help="With --guard: reset when the adapted and the unadapted model agree on fewer than this fraction of the window's images (0: off)."),
    guard_min_marginal_ratio: float = typer.Option(0.5, "--guard-min-marginal-ratio", min=0.0, max=1.0, help="With --guard: reset when the entropy of the adapted model's mean prediction over the window falls below this fraction of the unadapted model's (class collapse; 0: off)."),
    optimizer: str = typer.Option("sgd", help="Tent, EATA, ROID: sgd (momentum 0.9, Nesterov for ROID: their ImageNet settings) or adam (their CIFAR settings). SAR: sgd."),
    source: Optional[Path] = typer.Option(None, "--source", "-s", help="EATA: in-distribution images (a folder; labels, if any, are not used) for its Fisher anti-forgetting term, at most 2000; without it EATA runs as ETA. FOA: the images its source feature statistics come from (at most 2000); without them, entropy alone and no shift."),
    d_margin: float = typer.Option(0.05, help="EATA: a reliable sample is used when |cosine(its softmax, the moving average)| < this (official 0.05 for ImageNet; 0.4 for 10 classes)."),
    fisher_alpha: float = typer.Option(2000.0, help="EATA: weight of the Fisher term (official 2000 for ImageNet; 1 in the CIFAR configs; 0: ETA)."),
    int8: bool = typer.Option(False, "--int8", help="foa with --model: also write the dynamic int8 copy of the export (NAME.int8.onnx) and adapt that one."),
    prompts: int = typer.Option(3, "--prompts", min=0, help="foa: prompt tokens searched by CMA-ES (official 3; 0: activation shifting only, one forward pass per batch)."),
    popsize: int = typer.Option(27, "--popsize", min=2, help="foa: CMA-ES population (official 27); a batch costs popsize + 1 forward passes."),
    fitness_lambda: float = typer.Option(0.4, help="foa: weight of the feature-statistics discrepancy in the fitness (official 0.4; 0.2 for ImageNet-R)."),
    shift_step: float = typer.Option(1.0, help="foa: activation-shifting step size (official 1; 0: no shift)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="foa: onnxruntime threads (default: one per physical core)."),
    seed: int = typer.Option(0, help="Seed of the stream order."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Test-time adaptation (SAR, Tent, EATA, ROID; FOA of an ONNX model) over a stream of images; writes online predictions and the adapted model."""
    from adaptsoup.core.progress import progress_bars
    from adaptsoup.tta.adapter import TTA_METHODS, TTAConfig
    from adaptsoup.tta.stream import tta_run_dir

    if onnx is not None or method == "foa":
        if guard:
            fail("--guard resets an adapted checkpoint: it applies to sar, tent, eata and roid (of --model), not foa")
        return _foa(onnx, model, method, target, eval_labels, out_dir, arch, batch_size, source, int8, prompts, popsize,
                    fitness_lambda, shift_step, threads, seed, progress)
    if model is None:
        fail("give --model CHECKPOINT (or --onnx FILE with --method foa)")
    if method not in TTA_METHODS:
        fail(f"--method must be one of {', '.join(TTA_METHODS)} (or foa, with --onnx), got {method!r}")
    cfg = TTAConfig(method=method, batch_size=batch_size, base_lr=base_lr, rho=rho, e0_factor=e0_factor,
                    reset_threshold=reset_threshold, episodic=episodic, optimizer=optimizer, seed=seed, device=device,
                    d_margin=d_margin, fisher_alpha=fisher_alpha, fisher_images=str(source) if source else None,
                    guard=guard, guard_window=guard_window, guard_min_agreement=guard_min_agreement,
                    guard_min_marginal_ratio=guard_min_marginal_ratio)
    with progress_bars(progress) as bars:
        summary = tta_run_dir(str(model), str(out_dir), cfg, target=str(target) if target else None,
                              eval_labels=str(eval_labels) if eval_labels else None, arch=arch, progress=bars,
                              log=log_line)
    out.print(f"wrote {out_dir / 'predictions.csv'}, {out_dir / 'adapted.safetensors'}, {out_dir / 'manifest.json'}")
    if guard:
        out.print(f"guard resets: {summary['guard_resets']}"
                  + (f" (at batches {', '.join(map(str, summary['guard_reset_batches']))})" if summary["guard_resets"] else ""))
    if summary["online_accuracy"] is not None:
        out.print(f"online accuracy: {summary['online_accuracy']:.2f}%")


def _foa(onnx, model, method, target, eval_labels, out_dir, arch, batch_size, source, int8, prompts, popsize, fitness_lambda,
         shift_step, threads, seed, progress) -> None:
    """``tta --onnx FILE --method foa``: forward-only adaptation of an ONNX model (:mod:`adaptsoup.tta.foa`)."""
    from adaptsoup.core.io import check_destination
    from adaptsoup.core.progress import progress_bars
    from adaptsoup.tta.foa import FOAConfig, foa_run_dir

    if onnx is None:
        fail("--method foa adapts an ONNX model with forward passes only: give --onnx FILE (with --model CHECKPOINT to export it there first)")
    if method != "foa":
        fail(f"--onnx is adapted with forward passes only: --method foa ({method!r} needs gradients: give --model without --onnx)")
    if model is None and not onnx.is_file():
        fail(f"ONNX model not found: {onnx} (add --model CHECKPOINT to export a prompt-capable one there)")
    if model is not None:
        check_destination(onnx, "--onnx")
    cfg = FOAConfig(num_prompts=prompts, popsize=popsize, fitness_lambda=fitness_lambda, shift_step=shift_step,
                    batch_size=batch_size, seed=seed, threads=threads)
    with progress_bars(progress) as bars:
        summary = foa_run_dir(str(onnx), str(out_dir), cfg, target=str(target) if target else None,
                              eval_labels=str(eval_labels) if eval_labels else None, source=str(source) if source else None,
                              model_path=str(model) if model else None, arch=arch, int8=int8, progress=bars, log=log_line)
    out.print(f"wrote {out_dir / 'predictions.csv'}, {out_dir / 'adapted.onnx'}, {out_dir / 'manifest.json'}")
    if summary["online_accuracy"] is not None:
        out.print(f"online accuracy: {summary['online_accuracy']:.2f}%")
