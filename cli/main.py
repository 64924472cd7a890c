"""The ``adaptsoup`` command: the Typer app, its entry point (one-line errors, exit 2), and where each
command lives: ``info`` (:mod:`adaptsoup_cli.info`), ``export`` / ``predict`` (:mod:`adaptsoup_cli.deploy`),
``tta`` (:mod:`adaptsoup_cli.tta`), ``bench ...`` (:mod:`adaptsoup_cli.bench`); ``adapt``, ``mix`` and
``interpolate`` are below.  Commands import torch, timm and the benchmarks only when they run.

Errors a user can fix (bad paths, bad options, unreadable checkpoints) print one line and exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import click
import typer
from rich.table import Table

from adaptsoup.errors import AdaptsoupError
from adaptsoup_cli import bench, deploy, info, tta
from adaptsoup_cli.common import err, fail, log_line, out, print_metrics
from adaptsoup_cli.common import parse_floats as _floats
from adaptsoup_cli.common import parse_ints as _ints

app = typer.Typer(
    name="adaptsoup",
    help="Self-Soupervision: make a deployed ViT robust to distribution shift without target labels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(info.info)
app.command()(deploy.export)
app.command()(deploy.predict)


# ----------------------------------------------------------------------------------------------------------------


@app.command()
def adapt(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="The deployed classifier checkpoint (the stock)."),
    target: Optional[Path] = typer.Option(None, "--target", "-t", help="Folder of unlabeled shifted images (searched recursively)."),
    source: Optional[Path] = typer.Option(None, "--source", "-s", help="Labeled source folder, <class_name>/<image> layout."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/adapt-<time>)."),
    stock: Optional[Path] = typer.Option(None, "--stock", help="MAE pre-trained checkpoint with a decoder (original MAE key names)."),
    arch: Optional[str] = typer.Option(None, help="timm architecture, if --model carries no adaptsoup metadata."),
    eval_dirs: Optional[List[Path]] = typer.Option(None, "--eval", help="Labeled folder to report top-1 on (repeatable)."),
    vanilla: Optional[int] = typer.Option(None, help="Also fine-tune the stock this many times without inter-training (supervised soup)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Recipe file (.toml or .yaml); flags override it."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory with its recorded recipe (only --mix/--tta settings may change)."),
    ssl: Optional[str] = typer.Option(None, "--ssl", help="Self-supervised losses, comma-separated: mae, mocov3, mmcr (per-algorithm grids in --config)."),
    inter_lrs: Optional[str] = typer.Option(None, help="Inter-training learning rates, comma-separated (grid axis)."),
    mask_ratios: Optional[str] = typer.Option(None, help="MAE mask ratios (grid axis)."),
    decoder_depths: Optional[str] = typer.Option(None, help="MAE decoder depths, 0 = sized for the encoder (grid axis)."),
    inter_steps: Optional[str] = typer.Option(None, help="Inter-training steps (grid axis); default from --inter-epochs."),
    inter_seeds: Optional[str] = typer.Option(None, help="Inter-training seeds (grid axis)."),
    inter_epochs: Optional[float] = typer.Option(None, help="Inter-training epochs over the target when no steps are given."),
    inter_augment: Optional[str] = typer.Option(None, help="Inter-training augmentation: none, crop-flip or 3a."),
    decoder_warmup_steps: Optional[int] = typer.Option(None, help="Steps to warm up a fresh decoder with the encoder frozen."),
    ft_lrs: Optional[str] = typer.Option(None, help="Fine-tuning learning rates, comma-separated (N = count x seeds)."),
    ft_seeds: Optional[str] = typer.Option(None, help="Fine-tuning seeds."),
    ft_epochs: Optional[float] = typer.Option(None, help="Fine-tuning epochs over the source."),
    ft_steps: Optional[int] = typer.Option(None, help="Fine-tuning steps (overrides --ft-epochs)."),
    ft_augment: Optional[str] = typer.Option(None, help="Fine-tuning augmentation: none, crop-flip or 3a (DeiT III 3-Augment)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size of inter-training and fine-tuning (paper: 128)."),
    max_source_images: Optional[int] = typer.Option(None, help="Use a seeded random subset of this many source images."),
    max_target_images: Optional[int] = typer.Option(None, help="Use a seeded random subset of this many target images."),
    seed: Optional[int] = typer.Option(None, help="Seed of data subsets and decoder warm-up."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--fp32", help="Train under bf16 autocast."),
    tta_method: Optional[str] = typer.Option(None, "--tta", help="Stack test-time adaptation (sar or tent) over the target on the soup: the last --mix soup, else the uniform one."),
    tta_batch_size: Optional[int] = typer.Option(None, "--tta-batch-size", min=1, help="With --tta: images per adaptation step (default 64)."),
    tta_base_lr: Optional[float] = typer.Option(None, "--tta-base-lr", help="With --tta: learning rate per 64 images (default: SAR 1e-3, Tent 2.5e-4, their references)."),
    mix_methods: Optional[List[str]] = typer.Option(None, "--mix", help="Also mix with this method at the end (repeatable; replaces the recipe's mix)."),
    mix_labeled: Optional[Path] = typer.Option(None, help="Few-label folder for --mix season/greedy/best."),
    finetune_back: Optional[bool] = typer.Option(None, "--finetune/--no-finetune", help="Fine-tune back on --source (default), or keep the inter-trained encoders as label-free ingredients."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Inter-train the stock with MAE on unlabeled target images, fine-tune back on source, and mix a soup."""
    from adaptsoup.core.progress import progress_bars
    from adaptsoup.pipeline.job import AdaptRequest, run_adapt_job

    settings = {
        "model": _path(model), "target": _path(target), "source": _path(source), "out": _path(out_dir), "stock": _path(stock),
        "arch": arch, "evals": [str(e) for e in eval_dirs] if eval_dirs else None, "vanilla": vanilla,
        "max_source_images": max_source_images, "max_target_images": max_target_images, "seed": seed,
        "device": device, "bf16": bf16, "finetune_back": finetune_back,
        "mix": list(mix_methods) if mix_methods else None, "mix_labeled": _path(mix_labeled),
        "tta": tta_method, "tta_batch_size": tta_batch_size, "tta_base_lr": tta_base_lr,
        "inter": {
            "ssl": [a.strip() for a in ssl.split(",") if a.strip()] if ssl else None,
            "lrs": _floats(inter_lrs, "--inter-lrs"), "mask_ratios": _floats(mask_ratios, "--mask-ratios"),
            "decoder_depths": _ints(decoder_depths, "--decoder-depths"), "steps": _ints(inter_steps, "--inter-steps"),
            "seeds": _ints(inter_seeds, "--inter-seeds"), "epochs": inter_epochs, "augment": inter_augment,
            "decoder_warmup_steps": decoder_warmup_steps, "batch_size": batch_size,
        },
        "finetune": {
            "lrs": _floats(ft_lrs, "--ft-lrs"), "seeds": _ints(ft_seeds, "--ft-seeds"), "epochs": ft_epochs,
            "steps": ft_steps, "augment": ft_augment, "batch_size": batch_size,
        },
    }
    request = AdaptRequest(settings=settings, recipe_file=config, resume=resume, command="adaptsoup " + " ".join(sys.argv[1:]))
    with progress_bars(progress) as bars:
        result = run_adapt_job(request, progress=bars, echo=log_line)
    print_metrics(result.metrics)
    if result.mixes:
        print_mixes(result.mixes)
    if result.tta:
        tta = result.tta
        out.print(f"{tta['method']} on the {tta['soup']} soup: {result.run_dir / tta['adapted']} ({tta['resets']} reset(s))")
    out.print(f"soup: {result.soup_path}")
    out.print(f"manifest: {result.manifest_path}")


def _path(value: Optional[Path]) -> Optional[str]:
    return str(value) if value is not None else None


@app.command()
def mix(
    run_dir: Path = typer.Argument(..., help="An adapt run directory."),
    methods: List[str] = typer.Option(..., "--method", help="uniform, self-season, season, greedy, best or model-stock (repeatable)."),
    target: Optional[Path] = typer.Option(None, help="Unlabeled target images for self-season (default: the run's --target)."),
    labeled: Optional[Path] = typer.Option(None, help="A few labeled images (class_name/<image>) for season, greedy and best."),
    eval_dirs: Optional[List[Path]] = typer.Option(None, "--eval", help="Labeled folders to score the soups on (default: the run's)."),
    ingredients: str = typer.Option("self", help="Which ingredients to mix: self, vanilla or all."),
    save_as: Optional[str] = typer.Option(None, "--as", help="With one --method: save and record the soup under this name (to keep variants side by side)."),
    include_stock: bool = typer.Option(False, help="Add the stock as one more ingredient."),
    epochs: int = typer.Option(100, help="self-season: epochs over the target images."),
    subset: int = typer.Option(0, help="self-season: a seeded random subset of this many target images (0: all)."),
    batch_size: int = typer.Option(256, help="self-season batch size (the in-batch neighbours)."),
    lr: float = typer.Option(0.1, help="self-season: AdamW learning rate, cosine-decayed to --min-lr."),
    min_lr: float = typer.Option(0.01, help="self-season: final learning rate."),
    k: int = typer.Option(16, help="Neighbours for the kNN entropy and kNN accuracy."),
    temperature: float = typer.Option(0.07, help="Temperature of the kNN softmax."),
    center: bool = typer.Option(False, "--center/--no-center", help="self-season: subtract the batch mean of the embeddings before the cosines (not in the paper; helps when they all point one way)."),
    samples: int = typer.Option(1000, help="season: Dirichlet(1) coefficient samples."),
    split: float = typer.Option(0.5, help="season / kNN scoring: fraction of --labeled used for retrieval."),
    score: str = typer.Option("auto", help="greedy / best: classifier, knn or auto (classifier when classes match)."),
    greedy_tie: str = typer.Option("strict", help="greedy: strict (must improve) or keep (ties accepted)."),
    seed: int = typer.Option(0, help="Seed of subsets, samples and splits."),
    bf16: bool = typer.Option(False, "--bf16/--fp32", help="self-season under bf16 autocast."),
    device: str = typer.Option("cpu", help="cpu or cuda: where self-season, season, greedy and best run the mixed model."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Mix a run's ingredients: Self-Seasoning without labels, seasoning/greedy/best with a few, Model Stock."""
    from adaptsoup.soup.run import MixRequest, mix_run
    from adaptsoup.core.progress import progress_bars

    if score not in ("auto", "classifier", "knn"):
        fail(f"--score must be auto, classifier or knn, got {score!r}")
    flags = {"epochs": epochs, "subset": subset, "batch_size": batch_size, "lr": lr, "min_lr": min_lr, "k": k, "temperature": temperature,
             "center": center, "samples": samples, "split": split, "seed": seed, "tie": greedy_tie, "score": score, "bf16": bf16}
    req = MixRequest(run_dir=run_dir, methods=list(methods), target=str(target) if target else None,
                     labeled=str(labeled) if labeled else None, evals=[str(e) for e in eval_dirs] if eval_dirs else None,
                     ingredients=ingredients, options=mix_options(methods, flags), include_stock=include_stock, device=device, save_as=save_as)
    with progress_bars(progress) as bars:
        mixes = mix_run(req, progress=bars, log=log_line)
    print_mixes({key: mixes[key] for _, key in req.keys()})


def mix_options(method_names: List[str], flags: dict) -> dict:
    """Each selected mixing method's options dataclass, filled from the flat ``mix`` flags it has a field for."""
    from adaptsoup.soup import methods as mixing_methods

    return {name: mixing_methods.get(name).options_from(flags) for name in dict.fromkeys(method_names)}


def print_mixes(mixes: dict) -> None:
    table = Table(title="soups")
    table.add_column("method")
    table.add_column("coefficients")
    table.add_column("time s", justify="right")
    table.add_column("peak RSS MB (+rise)", justify="right")
    table.add_column("accuracy: soup / uniform / best ingredient")
    for method, rec in mixes.items():
        coeffs = rec.get("coefficients")
        shown = ", ".join(f"{n}={c:.2f}" for n, c in coeffs.items()) if coeffs else (f"t mean {rec['info'].get('t_mean', 0):.2f}" if rec.get("info") else "")
        accs = "; ".join(
            f"{e}: {m['soup']:.2f} / {m['uniform']:.2f} / {m['best_ingredient']:.2f}"
            for e, m in (rec.get("metrics") or {}).items() if m.get("soup") is not None and m.get("uniform") is not None and m.get("best_ingredient") is not None
        )
        mem = rec.get("memory") or {}
        shown_mem = f"{mem['rss_peak_mb']:.0f} (+{mem['rss_rise_mb']:.0f})" if mem.get("rss_peak_mb") is not None else "—"
        table.add_row(method, shown, f"{rec['wall_s']:.1f}", shown_mem, accs)
    out.print(table)


@app.command()
def interpolate(
    run_dir: Path = typer.Argument(..., help="An adapt run directory."),
    a: str = typer.Argument(..., help="First ingredient (name as in ingredients/, or 'soup')."),
    b: str = typer.Argument(..., help="Second ingredient."),
    eval_dir: Path = typer.Option(..., "--eval", help="Labeled folder to measure accuracy on."),
    steps: int = typer.Option(11, help="Points along the line, ends included."),
) -> None:
    """Accuracy along the straight line between two ingredients (linear mode connectivity), as JSON and PNG."""
    from adaptsoup.soup.run import interpolate as run_interpolate

    result = run_interpolate(run_dir, a, b, steps, str(eval_dir))
    for lam, acc in zip(result["lambda"], result["accuracy"]):
        out.print(f"lambda {lam:.2f}: {acc:.2f}%")
    out.print(f"plot: {result['png']}")


app.command()(tta.tta)
app.add_typer(bench.bench_app, name="bench")


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
        err.print(f"adaptsoup: error: {exc.format_message()}", markup=False, highlight=False, soft_wrap=True)
        code = 2
    except AdaptsoupError as exc:
        err.print(f"adaptsoup: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        code = 2
    except (KeyboardInterrupt, *ABORT):
        err.print("adaptsoup: interrupted")
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
