"""The rows of the shift benchmarks: the adapt runs behind them (self, supervised and continued-SSL
ingredients, Self-Seasoning), the soups each row evaluates, the table's row records, and SAR on the soups
(Table 2).  Trained files are shared between configurations that agree on what shapes them
(:func:`share_trained`)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.core.data import ImageSet, default_cache_dir
from adaptsoup.core.io import atomic_path
from adaptsoup.core.manifest import config_tag, file_digest
from adaptsoup.core.models import load_model, model_meta
from adaptsoup.core.run_dir import RunDir
from adaptsoup.pipeline.adapt import AdaptResult, run_adapt
from adaptsoup.pipeline.recipe import AdaptConfig, FineTuneConfig, InterTrainConfig
from adaptsoup.pipeline.soups import write_soup
from adaptsoup.soup.average import stream_weighted_average
from adaptsoup.soup.methods.self_season import SelfSeasonOptions, self_season_summary
from adaptsoup.soup.run import MixRequest, mix_run
from adaptsoup.soup.task_vector import onto_deployed
from adaptsoup.tta.adapter import TTAConfig
from adaptsoup.tta.stream import run_tta
from adaptsoup_bench.datasets import default_stock_path
from adaptsoup_bench.shift_config import CENTERED, SAR_ROWS, BenchConfig, pretrained_path
from adaptsoup_bench.shift_data import ShiftData
from adaptsoup_bench.shift_eval import score_row
from adaptsoup_bench.shift_stats import mean_or_nan


def inter_encoders(run_dir: Path) -> list[Path]:
    """The inter-trained encoders the self ingredients of an adapt run were fine-tuned from (its manifest's
    ingredient records name them; an encoder reused from an earlier configuration has no ``inter`` record)."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    names = sorted({rec["inter"] for rec in manifest["ingredients"].values() if rec.get("inter")})
    return [RunDir(run_dir).inter(name) for name in names]


def write_task_vector_soup(out: Path, deployed: Path, pretrained: Path, encoders: list[Path], scale: float) -> Path:
    """deployed + scale · (mean of the inter-trained ``encoders`` − the pre-trained stock), deployed head and metadata."""
    model = load_model(None, deployed)
    mean, _ = stream_weighted_average(encoders)
    state = onto_deployed(model, pretrained, mean, scale)
    meta = model_meta(model, made_by="adaptsoup bench", stage="soup", method="task-vector", scale=scale,
                      parents=[deployed.name, pretrained.name, *(p.name for p in encoders)])
    return save_checkpoint(out, state, meta)


# settings that shape an inter-trained encoder (and its linear probe) / a vanilla ingredient; runs of two
# benchmark configurations that agree on them share those files (:func:`share_trained`)
INTER_SETTINGS = ("mode", "severity", "stock", "decoder", "data", "corruptions", "per_corruption", "source_images", "inter_lrs",
                  "inter_steps", "batch_size", "decoder_warmup_loaded", "seed", "bf16", "device", "protocol", "pretrained", "split")
VANILLA_SETTINGS = ("stock", "data", "source_images", "ft_lrs", "ft_steps", "vanilla", "batch_size", "seed", "bf16", "device",
                    "protocol", "pretrained")


def shared_dir(cfg: BenchConfig, benchmark: str, kind: str, keys: tuple[str, ...], *extra) -> Path:
    """A folder of trained files shared by every configuration that agrees on ``keys`` (and the stocks' contents)."""
    stock = Path(cfg.stock or default_stock_path())
    pretrained = pretrained_path(cfg)
    settings = {k: getattr(cfg, k) for k in keys}
    tag = config_tag(settings, file_digest(stock) if stock.is_file() else str(stock),
                     file_digest(pretrained) if pretrained else None, kind, *extra)
    return Path(cfg.work or default_cache_dir() / "bench") / "shared" / f"{benchmark}-{kind}-{tag}"


def share_trained(run_dir: Path, shared: Path, patterns: tuple[str, ...], *, collect: bool) -> list[str]:
    """Link the files of ``shared`` matching ``patterns`` into ``run_dir`` where missing (``collect=False``,
    before a run: ``adapt`` then skips training them), or the run's into ``shared`` (``collect=True``, after)."""
    src, dst = (run_dir, shared) if collect else (shared, run_dir)
    linked = []
    for pattern in patterns:
        for path in sorted(src.glob(pattern)):
            target = dst / path.relative_to(src)
            if target.exists() or not path.is_file():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                with atomic_path(target) as tmp:
                    shutil.copy2(path, tmp)
            linked.append(str(path.relative_to(src)))
    return linked


def adapt_runs(data: ShiftData, cfg: BenchConfig, work: Path, timings: dict[str, float], *, command: str = "", progress=None,
               log: Callable[[str], None] = print) -> tuple[AdaptResult, AdaptResult | None, dict]:
    """The adapt runs behind the rows, each in ``work/runs/<kind>``: ``self`` (MAE on the target, fine-tuned back,
    with ``vanilla`` supervised ingredients beside), ``cont_ssl`` (MAE on the source images; with ``cont_ssl``),
    then Self-Seasoning of the self ingredients (and its centred variant, with ``centered``).  Returns the two
    runs and the mixes; ``timings`` gets each stage's wall time."""
    pretrained = pretrained_path(cfg)
    # validation_holdout 0: every source image fine-tunes, as in the committed results (benchmarks/decision.py
    # makes the label-free estimates on its own validation images)
    common = dict(model=str(data.stock), source=data.source, stock=data.decoder, max_source_images=cfg.source_images, validation_holdout=0,
                  seed=cfg.seed, device=cfg.device, precision="bf16" if cfg.bf16 else "fp32", pretrained=str(pretrained) if pretrained else None)
    inter = InterTrainConfig(lrs=list(cfg.inter_lrs), steps=[cfg.inter_steps], batch_size=cfg.batch_size,
                             decoder_warmup_loaded=cfg.decoder_warmup_loaded)
    ft = FineTuneConfig(lrs=list(cfg.ft_lrs), steps=cfg.ft_steps, batch_size=cfg.batch_size)
    log(f"protocol {cfg.protocol}: " + (f"every ingredient from the pre-trained stock {pretrained}" if pretrained
                                        else f"every ingredient from the deployed model {data.stock}"))

    def adapt(kind: str, **changes) -> AdaptResult:
        config = AdaptConfig(target=str(data.target), out=str(work / "runs" / kind), **{**common, **changes})
        return shared_adapt(config, data, cfg, kind, command=command, progress=progress, log=log)

    t0 = time.perf_counter()
    self_run = adapt("self", vanilla=cfg.vanilla, inter=inter, finetune=ft)
    timings["adapt_self_and_supervised"] = time.perf_counter() - t0
    cont = None
    if cfg.cont_ssl:
        t0 = time.perf_counter()
        cont = adapt("cont_ssl", vanilla=0, inter=dataclasses.replace(inter, data="source"), finetune=ft)
        timings["adapt_cont_ssl"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    season_options = SelfSeasonOptions(epochs=cfg.self_season_epochs, subset=cfg.self_season_subset, seed=cfg.seed, bf16=cfg.bf16)
    mixes = mix_run(MixRequest(run_dir=self_run.run_dir, methods=["self-season"], evals=[], options={"self-season": season_options},
                               device=cfg.device), progress=progress, log=log)
    timings["self_season"] = time.perf_counter() - t0
    if cfg.centered:
        t0 = time.perf_counter()
        mixes = mix_run(MixRequest(run_dir=self_run.run_dir, methods=["self-season"], evals=[], save_as=CENTERED,
                                   options={"self-season": dataclasses.replace(season_options, center=True)}, device=cfg.device),
                        progress=progress, log=log)
        timings["self_season_centered"] = time.perf_counter() - t0
    return self_run, cont, mixes


def shared_adapt(config: AdaptConfig, data: ShiftData, cfg: BenchConfig, kind: str, *, command: str = "", progress=None,
                 log: Callable[[str], None] = print) -> AdaptResult:
    """``adapt`` with ``config``, first linking in the trained files of an earlier configuration that agrees on
    their settings (``adapt`` then skips training them), afterwards sharing the run's own."""
    run_dir = Path(config.out)
    # the target is named by the settings that make it (and, for released layouts, their root), not by its path,
    # which lies in this configuration's own work folder
    inter_shared = shared_dir(cfg, data.benchmark, f"inter-{kind}", INTER_SETTINGS, data.notes.get("root", ""))
    vanilla_shared = shared_dir(cfg, data.benchmark, "vanilla", VANILLA_SETTINGS)
    inter_files = ("inter/mae*.safetensors",)
    vanilla_files = ("ingredients/vanilla-*.safetensors", "inter/stock.probe.safetensors", "inter/pretrained.probe.safetensors")
    if not config.vanilla:
        vanilla_files = ()
    reused = share_trained(run_dir, inter_shared, inter_files, collect=False) + share_trained(run_dir, vanilla_shared, vanilla_files, collect=False)
    if reused:
        log(f"{kind}: reusing {len(reused)} trained file(s) of an earlier configuration that agrees on their settings: {', '.join(reused)}")
    res = run_adapt(config, progress=progress, echo=log, command=command)
    share_trained(run_dir, inter_shared, inter_files, collect=True)
    share_trained(run_dir, vanilla_shared, vanilla_files, collect=True)
    return res


def build_soups(data: ShiftData, cfg: BenchConfig, self_run: AdaptResult, cont: AdaptResult | None,
                mixes: dict) -> tuple[dict[str, Path], dict[str, Path], list[Path]]:
    """The checkpoint of every row without test-time adaptation (writing the soups the runs did not), the self
    ingredients by name, and the vanilla (supervised) ingredients."""
    pretrained = pretrained_path(cfg)
    ingredients = {p.stem: p for p in self_run.ingredients if not p.stem.startswith("vanilla")}
    vanillas = [p for p in self_run.ingredients if p.stem.startswith("vanilla")]
    stock_model = load_model(None, data.stock)
    soups = {
        "deployed": data.stock, "supervised_soup": self_run.supervised_soup_path,
        **({"cont_ssl_soup": cont.soup_path} if cont is not None else {}),
        "self_soup_target": self_run.soup_path, "self_soup_target_self_seasoned": self_run.run_dir / mixes["self-season"]["path"],
        **({"self_soup_target_self_seasoned_centered": self_run.run_dir / mixes[CENTERED]["path"]} if cfg.centered else {}),
        "self_plus_supervised_soup": write_soup(self_run.run_dir / "soups" / "self_plus_supervised_soup.safetensors",
                                                list(ingredients.values()) + vanillas, stock_model),
        "self_plus_deployed_soup": write_soup(self_run.run_dir / "soups" / "self_plus_deployed_soup.safetensors",
                                              list(ingredients.values()) + [Path(data.stock)], stock_model),
    }
    if pretrained is not None:
        soups["self_task_vector_soup"] = write_task_vector_soup(self_run.run_dir / "soups" / "self_task_vector_soup.safetensors",
                                                                data.stock, pretrained, inter_encoders(self_run.run_dir),
                                                                cfg.task_vector_scale)
        if cont is not None:  # the control: the task vector of MAE on the *source* images, onto the deployed model
            soups["cont_ssl_task_vector_soup"] = write_task_vector_soup(cont.run_dir / "soups" / "cont_ssl_task_vector_soup.safetensors",
                                                                        data.stock, pretrained, inter_encoders(cont.run_dir),
                                                                        cfg.task_vector_scale)
    return soups, ingredients, vanillas


def table_rows(soups: dict[str, Path], metrics: dict[str, dict[str, float]], corruptions: list[str], best: str, mixes: dict,
               counts: tuple[int, int], cfg: BenchConfig) -> list[dict]:
    """The table's rows without test-time adaptation, in order (``counts``: self and vanilla ingredients)."""
    n_self, n_vanilla = counts

    def row(name: str, key: str) -> dict:
        return score_row(name, key, metrics, corruptions)

    rows = [row(n, n) for n in ("deployed", "supervised_soup", "cont_ssl_soup", "self_soup_target") if n in soups]
    rows.append({**row("self_soup_target_best_ingredient", f"ingredient:{best}"), "ingredient": best,
                 "note": "chosen by its mean accuracy on the odd images: an oracle, not a method"})
    for name, key in (("self_soup_target_self_seasoned", "self-season"), ("self_soup_target_self_seasoned_centered", CENTERED)):
        if name in soups:
            rows.append({**row(name, name), "coefficients": mixes[key]["coefficients"],
                         "self_season": self_season_summary(mixes[key]["info"])})
    rows.append({**row("self_plus_supervised_soup", "self_plus_supervised_soup"), "ingredients": n_self + n_vanilla})
    rows.append({**row("self_plus_deployed_soup", "self_plus_deployed_soup"), "ingredients": n_self + 1})
    if "self_task_vector_soup" in soups:
        rows.append({**row("self_task_vector_soup", "self_task_vector_soup"), "task_vector_scale": cfg.task_vector_scale,
                     "note": "deployed + scale x (mean inter-trained encoder - pre-trained stock): no fine-tuning back"})
    if "cont_ssl_task_vector_soup" in soups:
        rows.append({**row("cont_ssl_task_vector_soup", "cont_ssl_task_vector_soup"), "task_vector_scale": cfg.task_vector_scale,
                     "note": "the control: the same with MAE inter-training on the source images instead of the target"})
    return rows


def sar_rows(data: ShiftData, cfg: BenchConfig, soups: dict[str, Path], evals: dict[str, ImageSet]) -> list[dict]:
    """Table 2: SAR on the supervised soup and the Self-Soup, online over each corruption's odd images, reset
    between corruptions; one row per soup and SAR setting (``+sar``; ``+sar_reference_lr`` where set)."""
    rows = []
    sar_settings = [(suffix, getattr(cfg, key)) for suffix, key in SAR_ROWS.items()
                    if cfg.sar and (suffix == "+sar" or getattr(cfg, key) is not None)]
    for suffix, base_lr in sar_settings:
        for base in ("supervised_soup", "self_soup_target"):
            tta = TTAConfig(method="sar", batch_size=cfg.sar_batch, base_lr=base_lr, seed=cfg.seed, device=cfg.device)
            per, details = sar_per_corruption(soups[base], {c: evals[f"odd/{c}"] for c in data.corruptions}, data, tta)
            rows.append({"name": f"{base}{suffix}", "clean": None, "disjoint": mean_or_nan(per.values()), "joint": None,
                         "per_corruption": per, "base": base, "sar_base_lr": base_lr, "sar_lr": tta.lr(), "sar": details})
    return rows


def sar_per_corruption(checkpoint: Path, streams: dict[str, ImageSet], data: ShiftData, tta: TTAConfig) -> tuple[dict, dict]:
    """SAR online over each corruption's stream, restarting from the checkpoint for every corruption (as the
    reference does per corruption): the accuracy of the predictions made before each update, and what SAR did."""
    model = load_model(None, checkpoint)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    per, details = {}, {}
    for c, images in streams.items():
        model.load_state_dict(initial)
        res, _ = run_tta(model, images, data.preprocess, tta)
        per[c] = data.score(res.logits, images.labels)
        details[c] = {"resets": res.resets, "filtered_out": res.filtered_out, "final_ema": res.final_ema,
                      "filtered_out_second": sum(r.passed_first - r.passed_second for r in res.records),
                      "updates": sum(not r.skipped for r in res.records), "batches": len(res.records)}
    return per, details


def self_season_cost(mixes: dict, cfg: BenchConfig) -> dict:
    """What Self-Seasoning cost: wall time, the stacked ingredients' size, the process's memory, epochs and subset."""
    season = mixes["self-season"]
    return {"wall_s": season["wall_s"], "ingredients": len(season["ingredients"]),
            "stacked_mb": round(season["info"]["stacked_bytes"] / 2**20, 1), **season["memory"],
            "epochs": cfg.self_season_epochs, "subset": cfg.self_season_subset}
