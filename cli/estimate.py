"""``adaptsoup estimate``: label-free accuracy estimates of several checkpoints on unlabeled target images,
and whether to switch away from the deployed model (the work is in :mod:`adaptsoup.pipeline.estimates`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from adaptsoup_cli.common import fail, log_line, out, parse_names


def estimate(
    target: Path = typer.Option(..., "--target", "-t", help="Unlabeled target images (folder, searched recursively)."),
    models: List[Path] = typer.Option(..., "--model", "-m", help="An adaptsoup .safetensors checkpoint (repeatable: the deployed model and the candidates)."),
    validation: Optional[Path] = typer.Option(None, help="Labeled in-distribution images (class_name/<image>) the models were NOT trained on."),
    deployed: Optional[Path] = typer.Option(None, help="The deployed model (default: the first --model)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every estimate and the recommendation to this JSON file."),
    margin: float = typer.Option(0.5, help="Points of estimated gain every voting estimator must agree on before switching."),
    vote: Optional[str] = typer.Option(None, help="Comma-separated estimators that vote on the switch (default: cot, the rule chosen on the tuning split; 'all' for every estimator)."),
    resamples: int = typer.Option(1000, min=1, help="Bootstrap resamples over target images."),
    seed: int = typer.Option(0, help="Seed of the bootstrap and of COT's batches."),
    batch_size: int = typer.Option(256, min=1, help="Images per forward pass."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Estimate each model's accuracy on the target images without their labels (ATC, DoC, COT, ALine) and
    recommend which to deploy: a candidate only when every estimator agrees it gains at least --margin points."""
    if validation is None:
        fail("estimate needs --validation DIR: labeled in-distribution images (class_name/<image>) the models were not trained on")
    from adaptsoup.core.io import check_destination, write_json_atomic
    from adaptsoup.core.progress import progress_bars
    from adaptsoup.estimate import DecisionConfig, EstimateConfig
    from adaptsoup.estimate.config import ALL_ESTIMATORS
    from adaptsoup.pipeline.estimates import estimate_checkpoints

    voters = ALL_ESTIMATORS if vote == "all" else tuple(parse_names(vote) or DecisionConfig().estimators)
    unknown = [v for v in voters if v not in ALL_ESTIMATORS]
    if unknown:
        fail(f"--vote: unknown estimator(s) {', '.join(unknown)}; choose from {', '.join(ALL_ESTIMATORS)}")
    if json_path is not None:
        check_destination(json_path, "--json")
    config = EstimateConfig(bootstrap_resamples=resamples, seed=seed)
    with progress_bars(progress) as bars:
        result = estimate_checkpoints(models, target, validation, deployed=deployed, config=config,
                                      decision=DecisionConfig(margin=margin, estimators=voters), device=device,
                                      batch_size=batch_size, progress=bars, log=log_line)
    print_estimates(result)
    if json_path is not None:
        write_json_atomic(json_path, result)
        out.print(f"wrote {json_path}")


def _number(value: float | None) -> str:
    return "abstains" if value is None else f"{value:.2f}"


def print_estimates(result: dict) -> None:
    """The estimates per model, ALine's line, each candidate's verdict and the recommendation."""
    rec = result["recommendation"]
    estimators = list(result["config"]["estimators"])
    table = Table(title=f"estimated target accuracy % ({result['images']['target']} target images, "
                        f"{result['images']['validation']} validation images)")
    for column in ("model", "validation", "T", *estimators):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name in result["models"]:
        tag = " (deployed)" if name == rec["deployed"] else " (recommended)" if name == rec["model"] else ""
        row = result["estimates"][name]
        table.add_row(name + tag, f"{result['validation_accuracy'][name]:.2f}", f"{result['temperature'][name]:.3g}",
                      *(_number(row.get(e)) for e in estimators))
    out.print(table)
    aline = result["aline"]
    if aline is not None:
        fit = "" if aline["r2"] is None else f"R^2 {aline['r2']:.3f}, slope {aline['slope']:.3f}, intercept {aline['intercept']:.3f}"
        out.print(f"ALine: {'abstains: ' + aline['reason'] if aline['abstain'] else fit}" + (f" ({fit})" if aline["abstain"] and fit else ""))
    if rec["candidates"]:
        verdicts = Table(title=f"gain over {rec['deployed']} (points; margin {rec['margin']:g})")
        for column in ("candidate", "smallest", "mean", "95% interval", "verdict"):
            verdicts.add_column(column, justify="left" if column in ("candidate", "verdict") else "right")
        for c in rec["candidates"]:
            interval = "-" if c["ci95"] is None else f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]"
            verdicts.add_row(c["name"], _signed(c["min_gain"]), _signed(c["mean_gain"]), interval, c["why"])
        out.print(verdicts)
    if rec["switch"]:
        out.print(f"recommendation: deploy {rec['model']} (estimated gain {rec['gain']:+.2f} points, "
                  f"95% interval [{rec['ci95'][0]:+.2f}, {rec['ci95'][1]:+.2f}])")
    else:
        out.print(f"recommendation: keep the deployed model {rec['deployed']} ({rec['reason']})")
    out.print(f"rule: {rec['rule']}")


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"
