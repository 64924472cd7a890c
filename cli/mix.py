"""``adaptsoup mix`` (mixing a run's ingredients into soups) and ``adaptsoup interpolate``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from adaptsoup_cli.common import fail, log_line, out


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
    chunk_size: int = typer.Option(32, min=0, help="self-season: images per forward pass with gradients (gradient caching: memory is one chunk's, whatever --batch-size; 0: the whole batch at once)."),
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
             "center": center, "samples": samples, "split": split, "seed": seed, "tie": greedy_tie, "score": score, "bf16": bf16,
             "chunk_size": chunk_size}
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
