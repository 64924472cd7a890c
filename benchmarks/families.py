"""Do ingredients of different kinds mix?  The CPU benchmark of the "more ingredients" work.

On the CIFAR-10-C shift of :mod:`adaptsoup_bench.shift` (same corrupted subsets, same even/odd split), several
*families* of ingredients are made from the reference stock, each by one ``adapt`` run and each fine-tuned
back on source:

* ``mae`` — MAE inter-training on the target (the Self-Soup's own ingredients);
* ``mocov3`` — MoCo v3 inter-training on the target, τ = 0.1 and τ = 1.0;
* ``mmcr`` — MMCR inter-training on the target, global-only (λ = 0) and global+local (λ = 0.1);
* ``noisy`` — MAE inter-training from a stock perturbed by Gaussian parameter noise (two multipliers);
* ``partition`` — MAE inter-training on two class-index partitions of the labeled *source* (no labels used).

Rows: the deployed stock, each family's uniform soup, the uniform soup of *all* ingredients, all of them
Self-Seasoned on the target (as the paper defines it, and on batch-centred embeddings), and the best single ingredient (an oracle: chosen on the evaluation images).
Accuracies are on the clean subset and the odd (disjoint) corrupted images; nothing is tuned on them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from adaptsoup.core.evaluation import evaluate_checkpoints
from adaptsoup.pipeline.adapt import run_adapt
from adaptsoup_bench.shift import BenchConfig, bench_work_dir, mean_or_nan, prepare_c10c, results_stem, score_row
from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.core.data import load_folder
from adaptsoup.errors import AdaptsoupError
from adaptsoup.core.io import atomic_path, write_json_atomic, write_text_atomic
from adaptsoup.core.manifest import environment, provenance_lines, source_state
from adaptsoup.soup import methods
from adaptsoup.soup.average import stream_weighted_average
from adaptsoup.soup.registry import MixContext
from adaptsoup.core.progress import NullProgress
from adaptsoup.pipeline.recipe import AdaptConfig, FineTuneConfig, InterTrainConfig, MMCRGrid, MoCoV3Grid
from adaptsoup.core.resources import PeakMemory
from adaptsoup.soup.methods.self_season import SelfSeasonOptions, self_season_summary

FAMILIES = ("mae", "mocov3", "mmcr", "noisy", "partition")


@dataclass
class FamiliesConfig:
    """The benchmark's settings; ``bench`` holds the shared data and stock settings of the CIFAR-10-C benchmark."""

    bench: BenchConfig = field(default_factory=BenchConfig)
    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    inter_lr: float = 2e-5  # the middle of the paper's MAE grid, for the families with one learning rate
    inter_lrs_mae: list[float] = field(default_factory=lambda: [1e-5, 3e-5])  # as the c10c benchmark's quick grid
    inter_steps: int = 150
    ft_lr: float = 1e-4  # one fine-tuning back per inter-trained encoder
    ft_steps: int = 80
    mocov3_temperatures: list[float] = field(default_factory=lambda: [0.1, 1.0])
    mmcr_lambdas: list[float] = field(default_factory=lambda: [0.0, 0.1])
    mmcr_views: int = 2
    noise_multipliers: list[float] = field(default_factory=lambda: [0.03, 0.1])
    partitions: int = 2

    @classmethod
    def for_mode(cls, mode: str, **overrides) -> "FamiliesConfig":
        bench = BenchConfig.for_mode(mode, **{k: v for k, v in overrides.items() if k in _BENCH_KEYS})
        own = {k: v for k, v in overrides.items() if k not in _BENCH_KEYS and v is not None}
        if mode == "full":
            own = {"inter_steps": 500, "ft_steps": 200, "mmcr_views": 4, **own}
        return cls(bench=bench, **own)


_BENCH_KEYS = {f.name for f in dataclasses.fields(BenchConfig)}


def family_recipes(cfg: FamiliesConfig) -> dict[str, InterTrainConfig]:
    """The inter-training recipe of each family (fine-tuning is shared)."""
    base = InterTrainConfig(lrs=[cfg.inter_lr], steps=[cfg.inter_steps], batch_size=cfg.bench.batch_size,
                            decoder_warmup_loaded=cfg.bench.decoder_warmup_loaded)
    recipes = {
        "mae": dataclasses.replace(base, lrs=list(cfg.inter_lrs_mae)),
        "mocov3": dataclasses.replace(base, ssl=["mocov3"], mocov3=MoCoV3Grid(temperatures=list(cfg.mocov3_temperatures))),
        "mmcr": dataclasses.replace(base, ssl=["mmcr"], mmcr=MMCRGrid(lambdas=list(cfg.mmcr_lambdas), views=cfg.mmcr_views)),
        "noisy": dataclasses.replace(base, noise_stage="before_inter", noise_multipliers=list(cfg.noise_multipliers)),
        "partition": dataclasses.replace(base, partitions=cfg.partitions, partition_loss="mae"),
    }
    unknown = [f for f in cfg.families if f not in recipes]
    if unknown:
        raise AdaptsoupError(f"unknown ingredient famil(ies) {', '.join(unknown)}; known: {', '.join(recipes)}")
    return {f: recipes[f] for f in cfg.families}


def run_families(cfg: FamiliesConfig, *, command: str = "", progress=None, log: Callable[[str], None] = print) -> dict:
    """Make every family's ingredients, mix them within and across families, evaluate, write the report."""
    t_start, source = time.perf_counter(), source_state()
    recipes = family_recipes(cfg)  # unknown families fail before any work
    progress = progress or NullProgress()
    b = cfg.bench
    stem = results_stem("families", b)  # and so does a bad --label
    data = prepare_c10c(b, progress=progress, log=log)
    work = bench_work_dir(b, "families", {k: v for k, v in dataclasses.asdict(cfg).items() if k != "bench"})
    out = Path(b.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {"prepare_data": data.notes["prepare_data_s"]}
    ft = FineTuneConfig(lrs=[cfg.ft_lr], steps=cfg.ft_steps, batch_size=b.batch_size)

    ingredients: dict[str, Path] = {}  # "family/name" -> checkpoint
    family_soups: dict[str, Path] = {}
    for family, inter in recipes.items():
        t0 = time.perf_counter()
        run = run_adapt(AdaptConfig(model=str(data.stock), stock=data.decoder, source=data.source, target=str(data.target), validation_holdout=0,
                                    out=str(work / "runs" / family), max_source_images=b.source_images, seed=b.seed,
                                    device=b.device, precision="bf16" if b.bf16 else "fp32", inter=inter, finetune=ft),
                        progress=progress, echo=log, command=command)
        timings[f"adapt_{family}"] = time.perf_counter() - t0
        family_soups[family] = run.soup_path
        ingredients.update({f"{family}/{p.stem}": p for p in run.ingredients})

    # -- across families: the uniform soup (streamed) and Self-Seasoning on the target --------------------------------
    names, paths = list(ingredients), list(ingredients.values())
    t0 = time.perf_counter()
    state, meta = stream_weighted_average(paths)

    def soup_meta(method: str, coefficients) -> object:
        if meta is None:
            return None
        return dataclasses.replace(meta, provenance={"made_by": "adaptsoup bench families", "stage": "soup", "method": method,
                                                     "parents": names, "coefficients": list(coefficients)})

    all_uniform = save_checkpoint(work / "all_uniform.safetensors", state, soup_meta("uniform", [1 / len(names)] * len(names)))
    timings["mix_all_uniform"] = time.perf_counter() - t0
    target = load_folder(data.target, data.preprocess, progress=progress, description="decode target")
    t0 = time.perf_counter()
    options = SelfSeasonOptions(epochs=b.self_season_epochs, subset=b.self_season_subset, seed=b.seed, bf16=b.bf16)
    context = MixContext(paths=paths, names=names, stock_path=data.stock, target=target, device=b.device, progress=progress, log=log)
    with PeakMemory() as memory:
        seasoned = methods.get("self-season")(context, options)
    all_seasoned = save_checkpoint(work / "all_self_seasoned.safetensors", seasoned.state_dict, soup_meta("self-season", seasoned.coefficients))
    timings["mix_all_self_season"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    centered = methods.get("self-season")(context, dataclasses.replace(options, center=True))
    all_centered = save_checkpoint(work / "all_self_seasoned_centered.safetensors", centered.state_dict,
                                   soup_meta("self-season --center", centered.coefficients))
    timings["mix_all_self_season_centered"] = time.perf_counter() - t0

    # -- evaluation ---------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    candidates = {"deployed": data.stock, **{f"soup:{f}": p for f, p in family_soups.items()},
                  "all_uniform": all_uniform, "all_self_seasoned": all_seasoned, "all_self_seasoned_centered": all_centered,
                  **{f"ingredient:{n}": p for n, p in ingredients.items()}}
    disjoint = {k: v for k, v in data.evals.items() if not k.startswith("even/")}  # this table has no joint column
    metrics = evaluate_checkpoints(candidates, disjoint, data.preprocess, device=b.device, progress=progress, score=data.score)
    timings["evaluate"] = time.perf_counter() - t0
    corruptions = data.corruptions

    rows = [score_row("deployed", "deployed", metrics, corruptions)]
    rows += [score_row(f"{f}_soup", f"soup:{f}", metrics, corruptions) for f in family_soups]
    rows.append(score_row("all_families_uniform", "all_uniform", metrics, corruptions))
    for row_name, key, res in (("all_families_self_seasoned", "all_self_seasoned", seasoned),
                               ("all_families_self_seasoned_centered", "all_self_seasoned_centered", centered)):
        rows.append({**score_row(row_name, key, metrics, corruptions), "coefficients": dict(zip(names, res.coefficients)),
                     "self_season": self_season_summary(res.info)})
    best = max(ingredients, key=lambda n: mean_or_nan(metrics[f"odd/{c}"][f"ingredient:{n}"] for c in corruptions))
    rows.append({**score_row("best_ingredient", f"ingredient:{best}", metrics, corruptions), "ingredient": best,
                 "note": "chosen by its mean accuracy on the odd images: an oracle, not a method"})
    per_ingredient = {n: score_row(n, f"ingredient:{n}", metrics, corruptions) for n in ingredients}

    env = environment()
    result = {
        "benchmark": "ingredient-families", "mode": b.mode, "severity": b.severity, "command": command, "commit": source["commit"], "source_dirty": source["dirty"],
        "machine": {k: v for k, v in env.items() if k != "packages"}, "packages": env["packages"],
        "wall_time_s": round(time.perf_counter() - t_start, 1),  # data preparation included
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "config": dataclasses.asdict(cfg), "families": list(family_soups),
        "data": {"corruptions": corruptions, "eval_images": {k: len(v) for k, v in disjoint.items()}, "target_images": len(target)},
        "rows": rows,
        "ingredients": {n: {"family": n.split("/")[0], "clean": r["clean"], "disjoint": r["disjoint"],
                            "per_corruption": r["per_corruption"]} for n, r in per_ingredient.items()},
        "self_season": {"wall_s": round(timings["mix_all_self_season"], 1), "stacked_mb": round(seasoned.info["stacked_bytes"] / 2**20, 1),
                        **memory.to_dict()},
        "runs": {f: str(work / "runs" / f) for f in family_soups},
    }
    write_json_atomic(out / f"{stem}.json", result)
    write_text_atomic(out / f"{stem}.md", markdown_table(result))
    plot_families(result, out / f"{stem}.png")
    log(f"wrote {out / stem}.json, .md and .png in {result['wall_time_s']:.0f}s")
    return result


def markdown_table(result: dict) -> str:
    def fmt(v):
        return "—" if v is None or (isinstance(v, float) and v != v) else f"{v:.2f}"

    lines = [
        f"# Ingredient families on CIFAR-10-C, severity {result['severity']} ({result['mode']} mode)", "",
        *provenance_lines(result), "",
        "| row | clean | CIFAR-10-C disjoint (odd) | mean of its ingredients (disjoint) |", "|---|---|---|---|",
    ]
    ing = result["ingredients"]
    for r in result["rows"]:
        family = r["name"][: -len("_soup")] if r["name"].endswith("_soup") else None
        members = [v["disjoint"] for v in ing.values() if v["family"] == family] if family else []
        if r["name"].startswith("all_families"):
            members = [v["disjoint"] for v in ing.values()]
        lines.append(f"| {r['name']} | {fmt(r['clean'])} | {fmt(r['disjoint'])} | {fmt(mean_or_nan(members)) if members else '—'} |")
    lines += ["", "Ingredients:", "", "| ingredient | clean | disjoint |", "|---|---|---|"]
    for n, v in ing.items():
        lines.append(f"| {n} | {fmt(v['clean'])} | {fmt(v['disjoint'])} |")
    for r in result["rows"]:
        if r["name"].startswith("all_families_self_seasoned"):
            ss = r["self_season"]
            lines += ["", f"{r['name']}: kNN entropy {ss['initial_loss']:.4f} -> {ss['final_loss']:.4f} (ceiling ln k = "
                          f"{ss['loss_ceiling']:.4f}); coefficients " + ", ".join(f"{n} {c:.3f}" for n, c in r["coefficients"].items())]
    lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in result["timings_s"].items()), ""]
    return "\n".join(lines)


def plot_families(result: dict, png: Path) -> None:
    """Clean vs disjoint accuracy: every ingredient (coloured by family) and every soup (stars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    colours = dict(zip(result["families"], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for family in result["families"]:
        pts = [v for v in result["ingredients"].values() if v["family"] == family]
        ax.scatter([v["clean"] for v in pts], [v["disjoint"] for v in pts], color=colours[family], alpha=0.6, label=f"{family} ingredients")
    for r in result["rows"]:
        if r["name"] == "best_ingredient":
            continue
        family = r["name"][: -len("_soup")] if r["name"].endswith("_soup") else None
        colour = colours.get(family, "black") if family else ("black" if r["name"].startswith("all") else "gray")
        marker = "P" if r["name"].startswith("all_families_self_seasoned") else ("X" if r["name"] == "deployed" else "*")
        ax.scatter([r["clean"]], [r["disjoint"]], color=colour, marker=marker, s=140, edgecolor="white",
                   label=r["name"] if not family else None)
    ax.set_xlabel("clean CIFAR-10 top-1 (%)")
    ax.set_ylabel("CIFAR-10-C disjoint top-1 (%)")
    ax.set_title(f"ingredient families, severity {result['severity']} ({result['mode']}); stars: soups")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
