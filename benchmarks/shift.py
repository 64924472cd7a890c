"""The CIFAR-10 → CIFAR-10-C benchmark: the paper's Table 1 and Table 2 at CPU scale.

Protocol (Self-Soupervision §4): the test images of each corruption are split by position — even-indexed
images are the unlabeled target the ingredients are inter-trained on, odd-indexed images are the
evaluation data ("disjoint"); "joint" evaluates on the even images themselves.  The target is the pool of
all corruptions' even images.  Rows:

* ``deployed`` — the stock as is;
* ``supervised_soup`` — the stock fine-tuned N times on source (no inter-training), uniform soup;
* ``cont_ssl_soup`` — MAE inter-training on the *source* images, then the same fine-tunings;
* ``self_soup_target`` — MAE inter-training on the target, fine-tuned back, uniform soup;
* ``self_soup_target_best_ingredient`` — its best ingredient, chosen on the evaluation images (an oracle
  upper bound for picking one ingredient, not a method);
* ``self_soup_target_self_seasoned`` — its ingredients mixed by Self-Seasoning on the target images;
* ``self_soup_target_self_seasoned_centered`` — the same with the embeddings centred per batch before the
  cosines (``mix --center``; not in the paper — see :func:`adaptsoup.soup.knn.knn_entropy`);
* ``supervised_soup+sar`` and ``self_soup_target+sar`` — SAR over each corruption's odd images, online,
  reset between corruptions (Table 2), at the paper's learning rate for soups (base 5e-5 per 64 images);
  each corruption's record counts the samples filtered at each forward, the updates made and the resets.

* ``self_plus_supervised_soup`` — the uniform soup of the Self-Soup's and the supervised soup's ingredients
  together (eq. 1 of the paper allows both kinds);
* ``self_plus_deployed_soup`` — the Self-Soup's ingredients and the deployed model, uniform (under the
  ``pretrained`` protocol the deployed model is one more fine-tune of the same pre-trained encoder).

Protocols (``protocol``): ``deployed`` inter-trains and fine-tunes the deployed model itself; ``pretrained``
(the paper's) makes every row's ingredients, supervised ones included, from the pre-trained stock (the MAE
phase of the deployed model, ``*_mae.safetensors``) with the same LP-FT budget; the ``deployed`` row stays the
deployed model.  Splits (``split``): ``tuning`` and ``report`` are the two halves of the CIFAR-10 test set
(:func:`split_pool`): settings are chosen on ``tuning`` and the frozen recipe is run once on ``report``.
Paired 95% bootstrap intervals over the evaluation images (:func:`paired_bootstrap`) compare the rows.

No choice (learning rates, steps, seeds) is made on the odd images: the recipe is fixed before the run.

This module runs the benchmark (:func:`run_c10c`, :func:`run_shift_benchmark`) from its parts, and every name
of those parts stays importable from here:

* :mod:`adaptsoup_bench.shift_config` — :class:`BenchConfig`, the rows and pairs, results' names, work folders;
* :mod:`adaptsoup_bench.shift_data` — the CIFAR-10-C images, the splits, :class:`ShiftData`;
* :mod:`adaptsoup_bench.shift_rows` — the adapt runs, the soups and the recipe of each row, SAR (Table 2);
* :mod:`adaptsoup_bench.shift_eval` — evaluation, per-image correctness, the sanity checks;
* :mod:`adaptsoup_bench.shift_stats` — the paired bootstrap;
* :mod:`adaptsoup_bench.shift_report` — the results file, markdown tables, plots and re-rendering.
"""


from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from adaptsoup.core.evaluation import top1
from adaptsoup.core.manifest import environment, source_state
from adaptsoup.core.progress import NullProgress
from adaptsoup.errors import AdaptsoupError
from adaptsoup_bench.shift_config import (
    CENTERED, EVALUATION_ONLY, NEW_DEFAULTS, PAIRS, PRETRAINED_ROWS, PROTOCOLS, ROW_NAMES, SAR_ROWS, SPLIT_SEVERITY, SPLITS, TITLES,
    BenchConfig, C10CConfig, bench_work_dir, pretrained_path, results_stem, sar_base, sar_base_lr,
)
from adaptsoup_bench.shift_data import (
    ShiftData, clean_indices, corrupted_indices, prepare_c10c, prepare_corrupted, split_description, split_pool,
)
from adaptsoup_bench.shift_eval import (
    evaluate_rows, ingredient_scores, load_correct, per_image_correct, sanity_checks, save_correct, score_row,
)
from adaptsoup_bench.shift_estimates import shift_estimates
from adaptsoup_bench.shift_report import markdown_table, paired_from_work, plot_results, write_results
from adaptsoup_bench.shift_rows import (
    INTER_SETTINGS, VANILLA_SETTINGS, adapt_runs, build_soups, inter_encoders, sar_per_corruption, sar_rows, self_season_cost,
    share_trained, shared_dir, table_rows, write_task_vector_soup,
)
from adaptsoup_bench.shift_stats import image_ids, mean_or_nan, paired_bootstrap, paired_comparisons

__all__ = [  # what other modules and older scripts import from here
    "CENTERED", "EVALUATION_ONLY", "INTER_SETTINGS", "NEW_DEFAULTS", "PAIRS", "PRETRAINED_ROWS", "PROTOCOLS", "ROW_NAMES", "SAR_ROWS",
    "SPLITS", "SPLIT_SEVERITY", "TITLES", "VANILLA_SETTINGS", "BenchConfig", "C10CConfig", "ShiftData", "bench_work_dir",
    "clean_indices", "corrupted_indices", "image_ids", "inter_encoders", "load_correct", "markdown_table", "mean_or_nan",
    "paired_bootstrap", "paired_comparisons", "paired_from_work", "per_image_correct", "plot_results", "prepare_c10c",
    "prepare_corrupted", "pretrained_path", "results_stem", "run_c10c", "run_imagenet_c", "run_shift_benchmark", "sanity_checks",
    "sar_base", "sar_base_lr", "sar_per_corruption", "save_correct", "score_row", "share_trained", "shared_dir", "split_description",
    "split_pool", "write_task_vector_soup",
]


def run_c10c(cfg: BenchConfig, *, command: str = "", progress=None, log: Callable[[str], None] = print) -> dict:
    """CIFAR-10 → CIFAR-10-C: generate the corrupted test images, then :func:`run_shift_benchmark`."""
    results_stem("c10c", cfg)  # a bad --label fails before the images are made
    data = prepare_c10c(cfg, progress=progress, log=log)
    return run_shift_benchmark(data, cfg, command=command, progress=progress, log=log)


def run_imagenet_c(cfg: BenchConfig, root: str, source: str, **kwargs) -> dict:
    """ImageNet-C or LAION-C with the protocol, split and rows of CIFAR-10-C: :func:`adaptsoup_bench.imagenet_c.run_imagenet_c`."""
    from adaptsoup_bench.imagenet_c import run_imagenet_c as run

    return run(cfg, root, source, **kwargs)


def run_shift_benchmark(data: ShiftData, cfg: BenchConfig, *, command: str = "", progress=None,
                        log: Callable[[str], None] = print) -> dict:
    """The paper's rows on a prepared shift: adapt runs, Self-Seasoning, evaluation, SAR, tables and plots."""
    if cfg.vanilla < 1 or not cfg.inter_lrs or not cfg.ft_lrs:
        raise AdaptsoupError("the benchmark's rows need vanilla >= 1 (the supervised soup) and at least one inter-training "
                             "and one fine-tuning learning rate")
    stem = results_stem(data.benchmark, cfg)  # a bad --label fails here, not after the run
    t_start, source = time.perf_counter(), source_state()
    timings: dict[str, float] = {"prepare_data": data.notes["prepare_data_s"]} if "prepare_data_s" in data.notes else {}
    progress = progress or NullProgress()
    work = bench_work_dir(cfg, data.benchmark)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pretrained = pretrained_path(cfg)
    self_run, cont, mixes = adapt_runs(data, cfg, work, timings, command=command, progress=progress, log=log)

    # -- evaluation of every checkpoint on clean, odd (disjoint) and even (joint) images -------------------------
    t0 = time.perf_counter()
    evals = data.evals if cfg.joint else {k: v for k, v in data.evals.items() if not k.startswith("even/")}
    soups, ingredients, vanillas = build_soups(data, cfg, self_run, cont, mixes)
    row_logits: dict | None = {} if cfg.estimates else None
    metrics, predictions, best = evaluate_rows(data, cfg, soups, ingredients, evals, progress, logits=row_logits)
    timings["evaluate"] = time.perf_counter() - t0
    corruptions = data.corruptions
    # per-image correctness where the score is top-1 (LAION-C's superclass scoring is not per-image top-1 here)
    correct = per_image_correct(predictions, evals, list(soups), corruptions) if data.score is top1 else {"disjoint": {}, "clean": {}}
    predictions_path = save_correct(work / f"correct_{cfg.protocol}.npz", correct)
    t0 = time.perf_counter()
    paired = paired_comparisons(correct, PAIRS, resamples=cfg.bootstrap_resamples, seed=cfg.seed, clusters=image_ids(evals, corruptions))
    timings["bootstrap"] = time.perf_counter() - t0
    rows = table_rows(soups, metrics, corruptions, best, mixes, (len(ingredients), len(vanillas)), cfg)

    # -- label-free estimates of every row, and what the default deploy rule picks per corruption ------------------
    t0 = time.perf_counter()
    estimates = (shift_estimates(soups, data.evals, corruptions, data.preprocess, to_labels=data.to_labels, device=cfg.device,
                                 known=row_logits, log=log)
                 if cfg.estimates else {"skipped": "estimates=false"})
    timings["estimates"] = time.perf_counter() - t0

    # -- SAR on the soups (Table 2): online over each corruption's odd images, reset between corruptions ---------
    t0 = time.perf_counter()
    rows += sar_rows(data, cfg, soups, evals)
    timings["sar"] = time.perf_counter() - t0

    env = environment()
    result = {
        "benchmark": data.benchmark, "mode": cfg.mode, "severity": cfg.severity, "command": command, "commit": source["commit"], "source_dirty": source["dirty"],
        "machine": {k: v for k, v in env.items() if k != "packages"}, "packages": env["packages"],
        "wall_time_s": round(time.perf_counter() - t_start + data.notes.get("prepare_data_s", 0.0), 1),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "stock": {"path": str(data.stock), "clean_acc": metrics["clean"]["deployed"] if "clean" in evals else None},
        "config": dataclasses.asdict(cfg),
        "data": {"corruptions": corruptions, "eval_images": {k: len(v) for k, v in evals.items()},
                 "target_images": sum(len(data.evals[f"even/{c}"]) for c in corruptions),
                 **{k: v for k, v in data.notes.items() if not k.endswith("_s") and k != "split"}},
        "protocol": cfg.protocol, "pretrained": str(pretrained) if pretrained else None,
        "split": data.notes.get("split", {"name": "all", "used": "all"}),
        "steps": {"inter": cfg.inter_steps, "fine_tune": cfg.ft_steps, "batch_size": cfg.batch_size,
                  "ingredients": {"self": len(ingredients), "vanilla": len(vanillas)}},
        "rows": rows, "paired": paired, "ingredients": ingredient_scores(metrics, ingredients, corruptions),
        "self_season_cost": self_season_cost(mixes, cfg), "checks": sanity_checks(rows, chance=data.chance), "estimates": estimates,
        "runs": {"self": str(self_run.run_dir), "cont_ssl": str(cont.run_dir) if cont is not None else None},
        "per_image_correct": str(predictions_path),
    }
    write_results(result, out, stem, log)
    return result
