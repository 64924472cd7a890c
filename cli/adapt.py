"""``adaptsoup adapt``: the flags of an adapt job, handed to :func:`adaptsoup.pipeline.job.run_adapt_job`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from adaptsoup_cli.common import command_line, fail, log_line, out, print_metrics
from adaptsoup_cli.common import parse_floats as _floats
from adaptsoup_cli.common import parse_ints as _ints
from adaptsoup_cli.mix import print_mixes


def adapt(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="The deployed classifier checkpoint (the stock)."),
    target: Optional[Path] = typer.Option(None, "--target", "-t", help="Folder of unlabeled shifted images (searched recursively)."),
    source: Optional[Path] = typer.Option(None, "--source", "-s", help="Labeled source folder, <class_name>/<image> layout."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/adapt-<time>)."),
    stock: Optional[Path] = typer.Option(None, "--stock", help="MAE pre-trained checkpoint with a decoder (original MAE key names)."),
    pretrained: Optional[Path] = typer.Option(None, "--pretrained", help="Pre-trained (not fine-tuned) checkpoint the deployed model was fine-tuned from, e.g. an MAE encoder: every inter-training and vanilla fine-tuning starts from its encoder (the paper's protocol); its decoder, if any, replaces --stock's."),
    arch: Optional[str] = typer.Option(None, help="timm architecture, if --model carries no adaptsoup metadata."),
    eval_dirs: Optional[List[Path]] = typer.Option(None, "--eval", help="Labeled folder to report top-1 on (repeatable)."),
    vanilla: Optional[int] = typer.Option(None, min=0, help="Also fine-tune the stock this many times without inter-training (supervised soup)."),
    validation: Optional[Path] = typer.Option(None, "--validation", help="Labeled in-distribution folder (<class_name>/<image>) no model trained on: the label-free estimates and deploy recommendation every run ends with (default: source images held out, see --validation-holdout)."),
    validation_holdout: Optional[int] = typer.Option(None, "--validation-holdout", min=0, help="Without --validation: hold this many source images (seeded, class-balanced, at most a tenth) out of every fine-tuning for the estimates (default 1000; 0: no estimates)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Recipe file (.toml or .yaml); flags override it."),
    preset: Optional[str] = typer.Option(None, "--preset", help="A named recipe under --config and the flags. task-vector: the deployed model + the target's MAE task vector (needs --pretrained; no --source), the label-free recipe that won on held-out CIFAR-10-C; check its deploy recommendation (every run ends with one)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory with its recorded recipe (only --mix/--tta settings may change)."),
    ssl: Optional[str] = typer.Option(None, "--ssl", help="Self-supervised losses, comma-separated: mae, mocov3, mmcr (per-algorithm grids in --config)."),
    inter_lrs: Optional[str] = typer.Option(None, help="Inter-training learning rates, comma-separated (grid axis)."),
    mask_ratios: Optional[str] = typer.Option(None, help="MAE mask ratios (grid axis)."),
    decoder_depths: Optional[str] = typer.Option(None, help="MAE decoder depths, 0 = sized for the encoder (grid axis)."),
    inter_steps: Optional[str] = typer.Option(None, help="Inter-training steps (grid axis); default from --inter-epochs."),
    inter_seeds: Optional[str] = typer.Option(None, help="Inter-training seeds (grid axis)."),
    inter_epochs: Optional[float] = typer.Option(None, help="Inter-training epochs over the target when no steps are given."),
    inter_augment: Optional[str] = typer.Option(None, help="Inter-training augmentation: none, crop-flip or 3a."),
    decoder_warmup_steps: Optional[int] = typer.Option(None, min=0, help="Steps to warm up a fresh decoder with the encoder frozen."),
    ft_lrs: Optional[str] = typer.Option(None, help="Fine-tuning learning rates, comma-separated (N = count x seeds)."),
    ft_seeds: Optional[str] = typer.Option(None, help="Fine-tuning seeds."),
    ft_epochs: Optional[float] = typer.Option(None, help="Fine-tuning epochs over the source."),
    ft_steps: Optional[int] = typer.Option(None, min=1, help="Fine-tuning steps (overrides --ft-epochs)."),
    ft_augment: Optional[str] = typer.Option(None, help="Fine-tuning augmentation: none, crop-flip or 3a (DeiT III 3-Augment)."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Batch size of inter-training and fine-tuning (paper: 128)."),
    max_source_images: Optional[int] = typer.Option(None, min=1, help="Use a seeded random subset of this many source images."),
    max_target_images: Optional[int] = typer.Option(None, min=1, help="Use a seeded random subset of this many target images."),
    seed: Optional[int] = typer.Option(None, min=0, help="Seed of data subsets and decoder warm-up."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda."),
    precision: Optional[str] = typer.Option(None, "--precision", help="Training precision: auto (default: each kind of training run times its own step in fp32, bf16 and bf16 with the MATH attention kernel and keeps the fastest), fp32 or bf16."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--fp32", hidden=True, help="Same as --precision bf16 / fp32."),
    tta_method: Optional[str] = typer.Option(None, "--tta", help="Stack test-time adaptation (sar, tent, eata or roid) over the target on the soup: the last --mix soup, else the uniform one. eata runs as ETA here (no Fisher images; adaptsoup tta --source gives them)."),
    tta_batch_size: Optional[int] = typer.Option(None, "--tta-batch-size", min=1, help="With --tta: images per adaptation step (default 64)."),
    tta_base_lr: Optional[float] = typer.Option(None, "--tta-base-lr", help="With --tta: learning rate per 64 images (default: SAR 1e-3, Tent 2.5e-4, EATA 1e-3, ROID 2.5e-4, their references)."),
    tta_guard: Optional[bool] = typer.Option(None, "--tta-guard/--no-tta-guard", help="With --tta: reset the adapting soup to the unadapted one when its predictions drift from it (agreement or marginal entropy over 8 batches below half the unadapted model's; adaptsoup tta --guard); one extra forward pass per batch. Default off."),
    mix_methods: Optional[List[str]] = typer.Option(None, "--mix", help="Also mix with this method at the end (repeatable; replaces the recipe's mix)."),
    mix_labeled: Optional[Path] = typer.Option(None, help="Few-label folder for --mix season/greedy/best."),
    finetune_back: Optional[bool] = typer.Option(None, "--finetune/--no-finetune", help="Fine-tune back on --source (default), or keep the inter-trained encoders as label-free ingredients."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: make only the I-th of N parts of the ingredient grid, in the shared --out (one job of a cluster array); the job that finds the grid complete writes the soups."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Inter-train the stock with MAE on unlabeled target images, fine-tune back on source, and mix a soup.

    Under torchrun (--nproc-per-node N) every training run is data-parallel; rank 0 writes and prints."""
    from adaptsoup.core.distributed import world
    from adaptsoup.core.progress import progress_bars
    from adaptsoup.pipeline.job import AdaptRequest, run_adapt_job

    settings = {
        "model": _path(model), "target": _path(target), "source": _path(source), "out": _path(out_dir), "stock": _path(stock), "pretrained": _path(pretrained),
        "arch": arch, "evals": [str(e) for e in eval_dirs] if eval_dirs else None, "vanilla": vanilla,
        "validation": _path(validation), "validation_holdout": validation_holdout,
        "max_source_images": max_source_images, "max_target_images": max_target_images, "seed": seed,
        "device": device, "precision": _precision(precision, bf16), "finetune_back": finetune_back,
        "mix": list(mix_methods) if mix_methods else None, "mix_labeled": _path(mix_labeled),
        "tta": tta_method, "tta_batch_size": tta_batch_size, "tta_base_lr": tta_base_lr, "tta_guard": tta_guard,
        "inter": {
            "ssl": [a.strip() for a in ssl.split(",") if a.strip()] if ssl else None,
            "lrs": _floats(inter_lrs, "--inter-lrs"), "mask_ratios": _floats(mask_ratios, "--mask-ratios"),
            "decoder_depths": _ints(decoder_depths, "--decoder-depths", minimum=0), "steps": _ints(inter_steps, "--inter-steps", minimum=1),
            "seeds": _ints(inter_seeds, "--inter-seeds", minimum=0), "epochs": inter_epochs, "augment": inter_augment,
            "decoder_warmup_steps": decoder_warmup_steps, "batch_size": batch_size,
        },
        "finetune": {
            "lrs": _floats(ft_lrs, "--ft-lrs"), "seeds": _ints(ft_seeds, "--ft-seeds", minimum=0), "epochs": ft_epochs,
            "steps": ft_steps, "augment": ft_augment, "batch_size": batch_size,
        },
    }
    request = AdaptRequest(settings=settings, recipe_file=config, resume=resume, command=command_line(), shard=shard, preset=preset)
    with progress_bars(progress) as bars:
        result = run_adapt_job(request, progress=bars, echo=log_line)
    if not world().is_main:
        return
    if not result.complete:
        who, others = (f"shard {shard}", "other shards") if shard else ("this job", "the other jobs working in this run")
        if result.missing:
            out.print(f"{who}: done; {len(result.missing)} ingredient(s) still to come from {others}")
        else:
            out.print(f"{who}: done; another job is writing the soups")
        out.print(f"manifest: {result.manifest_path}")
        return
    print_metrics(result.metrics)
    if result.mixes:
        print_mixes(result.mixes)
    if result.tta:
        tta = result.tta
        guard = f", {tta['guard_resets']} guard reset(s)" if tta.get("guard") else ""
        out.print(f"{tta['method']} on the {tta['soup']} soup: {result.run_dir / tta['adapted']} ({tta['resets']} reset(s){guard})")
    out.print(f"soup: {result.soup_path}")
    print_recommendation(result.recommendation)
    out.print(f"manifest: {result.manifest_path}")


def print_recommendation(rec: Optional[dict]) -> None:
    """The run's deploy recommendation in a line or two (the reasons are in the log and the manifest)."""
    if rec is None:
        out.print("recommendation: none (no validation images: give --validation DIR)")
        return
    if rec["switch"]:
        out.print(f"recommendation: deploy {rec['model']} ({rec['path']}), estimated {rec['gain']:+.2f} points "
                  f"[{rec['ci95'][0]:+.2f}, {rec['ci95'][1]:+.2f}] over the deployed model")
    else:
        out.print("recommendation: keep the deployed model (no candidate is estimated to be better by the rule's margin)")
    for name, shift in rec.get("per_shift", {}).items():
        out.print(f"  {name}: " + (f"deploy {shift['model']} ({shift['gain']:+.2f})" if shift["switch"] else "keep the deployed model"))


def _path(value: Optional[Path]) -> Optional[str]:
    return str(value) if value is not None else None


def _precision(precision: Optional[str], bf16: Optional[bool]) -> Optional[str]:
    """--precision, or its older spelling --bf16/--fp32; both at once only when they agree."""
    if precision is not None and precision not in ("auto", "fp32", "bf16"):
        fail(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    legacy = None if bf16 is None else ("bf16" if bf16 else "fp32")
    if precision is not None and legacy is not None and precision != legacy:
        fail(f"--precision {precision} contradicts --{legacy}")
    return precision or legacy
