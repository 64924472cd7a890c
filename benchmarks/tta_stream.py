"""The fair-stream TTA benchmark (issue #23, item 1): SAR, Tent, EATA and ROID adapting the soups of a finished
``bench c10c`` configuration online over streams of CIFAR-10-C test images, against the same soup without TTA.

    python -m adaptsoup_bench.tta_stream --bench-config TUNING.json --choose          # tuning split: choose the lrs
    python -m adaptsoup_bench.tta_stream --bench-config REPORT.json --choice CHOICE.json  # report split: once

``SETTINGS.json`` is a configuration of ``bench c10c`` (``BenchConfig`` fields, or a decision result that recorded
them as ``bench_config``) whose adapt runs are complete: its ``self`` run holds the soups
(``soups/supervised_soup.safetensors`` and ``soup.safetensors``, the Self-Soup ``self_soup_target``), its ``split``
names the test images (tuning or report half) and its ``severity`` the corruption strength.  The stream:
``--per-corruption`` test images of the split (default all 5,000, "full"; 1,000 is the documented "quick"), each
under every corruption of the configuration.  Three settings, all online (each batch of 64 predicted, then
adapted): ``reset`` (each corruption alone, from the soup), ``continual`` (the corruptions in their fixed order,
never reset by the benchmark) and ``mixed`` (every (corruption, image) pair in one seeded shuffle).

``--choose`` (tuning split only): each method's learning rate is its default base lr times each ``--lr-factors``
value, scored on the first soup in the ``--choose-settings`` (default: reset); the best mean online accuracy is
frozen in ``--choice-out``, and the table is run at the chosen lrs.  ``--choice`` (report split only): the table
once, at the frozen lrs.  Results: ``tta_stream_<split>_s<severity>_n<per corruption>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from adaptsoup.core.io import write_json_atomic, write_text_atomic
from adaptsoup.core.manifest import environment, source_state
from adaptsoup.core.progress import progress_bars
from adaptsoup.errors import AdaptsoupError
from adaptsoup.tta.adapter import TTA_METHODS, TTAConfig

from adaptsoup_bench.tta_stream_data import (
    BATCH, FISHER_IMAGES, QUICK_PER_CORRUPTION, SETTINGS, fisher_batches, fisher_images, stream_images, stream_segments,
)
from adaptsoup_bench.tta_stream_runs import FOA_PER_CORRUPTION, Runner, Stream, foa_rows

SOUPS = {"supervised_soup": ("soups", "supervised_soup.safetensors"), "self_soup_target": ("soup.safetensors",)}
# also adaptable: the deployed model itself, and the soup of ``adapt --preset task-vector`` (deployed + 1.5 x the
# target's mean MAE task vector, made from the run's inter-trained encoders; --protocol pretrained runs only)
EXTRA_SOUPS = ("deployed", "task_vector_soup")
TASK_VECTOR_SCALE = 1.5
LR_FACTORS = (0.25, 1.0, 4.0)
# fixed settings besides the lr, not chosen on any evaluation image: EATA's redundancy margin at its CIFAR-10 value
# (mariodoebler/test-time-adaptation; the official 0.05 is ImageNet's and filters nearly every sample of 10 classes)
METHOD_SETTINGS = {"eata": {"d_margin": 0.4}}
GUARD_SETTINGS = ("continual", "mixed")  # where --guard-variants adds METHOD+guard


# -- choices (pure) ---------------------------------------------------------------------------------------------------


def default_base_lr(method: str) -> float:
    """The method's default learning rate per 64 images (TTAConfig's base lr; the runs scale it to their batch)."""
    return TTAConfig(method=method, batch_size=64).lr()


def factor_key(factor: float) -> str:
    return f"{factor:g}"


def choose_factors(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per method, the lr factor with the best tuning score; ties: the factor nearest 1 (the default lr), then the
    smaller one."""
    return {m: float(max(s, key=lambda f: (round(s[f], 6), -abs(math.log(float(f))), -float(f)))) for m, s in scores.items()}


def check_split(split: str, choose: bool, source: str) -> None:
    """``--choose`` runs on the tuning split only, ``--choice`` on the report split only."""
    wanted = "tuning" if choose else "report"
    if split != wanted:
        flag = "--choose" if choose else "--choice"
        raise AdaptsoupError(f"{flag} runs on the {wanted} split only; {source} is the {split!r} split")


def read_choice(path: str, methods: list[str]) -> dict:
    choice = json.loads(Path(path).read_text(encoding="utf-8"))
    if choice.get("split") != "tuning":
        raise AdaptsoupError(f"{path} was not chosen on the tuning split (split {choice.get('split')!r})")
    missing = [m for m in methods if m not in choice.get("base_lr", {})]
    if missing:
        raise AdaptsoupError(f"{path} holds no learning rate for {', '.join(missing)}")
    return choice


def tta_config(method: str, base_lr: float, seed: int, guard: bool = False, settings: dict | None = None) -> TTAConfig:
    """The run's settings: ``settings`` (default :data:`METHOD_SETTINGS`) holds each method's fixed ones besides the lr."""
    fixed = (METHOD_SETTINGS if settings is None else settings).get(method, {})
    return TTAConfig(method=method, batch_size=BATCH, base_lr=base_lr, seed=seed, guard=guard, **fixed)


def method_settings(overrides: list[str], base: dict | None = None) -> dict[str, dict]:
    """``base`` (default :data:`METHOD_SETTINGS`) with ``METHOD.KEY=VALUE`` overrides (``--method-setting``; values parsed
    as JSON, else text), each key checked against :class:`TTAConfig`."""
    fields = {f.name for f in dataclasses.fields(TTAConfig)}
    out = {m: dict(v) for m, v in (METHOD_SETTINGS if base is None else base).items()}
    for item in overrides:
        name, _, value = item.partition("=")
        method, _, key = name.partition(".")
        if not value or method not in TTA_METHODS or key not in fields or key in ("method", "base_lr", "batch_size", "seed", "guard"):
            raise AdaptsoupError(f"--method-setting {item!r}: want METHOD.KEY=VALUE with METHOD one of {', '.join(TTA_METHODS)} and KEY "
                                 "a TTAConfig setting other than method, base_lr, batch_size, seed and guard")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(method, {})[key] = parsed
    return out


def stream_batches(setting: str, n_corruptions: int, n_images: int) -> int:
    return sum(math.ceil(len(s) / BATCH) for s in stream_segments(setting, n_corruptions, n_images, 0))


def open_bench(path: str) -> tuple[object, Path]:
    """The ``bench c10c`` configuration of a settings JSON and its complete ``self`` adapt run (the soups)."""
    from adaptsoup_bench.shift_config import BenchConfig, bench_work_dir

    settings = json.loads(Path(path).read_text(encoding="utf-8"))
    cfg = BenchConfig(**settings.get("bench_config", settings))
    run = bench_work_dir(cfg, "c10c") / "runs" / "self"
    manifest = run / "manifest.json"
    if not manifest.is_file() or json.loads(manifest.read_text()).get("status") != "complete":
        raise AdaptsoupError(f"{run} is not a complete adapt run: run the bench configuration first")
    return cfg, run


def soup_path(name: str, cfg, self_run: Path) -> Path:
    """The checkpoint of soup ``name`` of the configuration (the task-vector soup is written beside the run's soups)."""
    from adaptsoup_bench.datasets import default_stock_path
    from adaptsoup_bench.shift_config import pretrained_path
    from adaptsoup_bench.shift_rows import inter_encoders, write_task_vector_soup

    if name in SOUPS:
        return self_run.joinpath(*SOUPS[name])
    stock = Path(cfg.stock or default_stock_path())
    if name == "deployed":
        return stock
    pretrained = pretrained_path(cfg)
    if pretrained is None:
        raise AdaptsoupError("task_vector_soup needs a --protocol pretrained configuration (the pre-trained stock its task vector is taken from)")
    path = self_run / "soups" / f"task_vector_soup_x{TASK_VECTOR_SCALE:g}.safetensors"
    return path if path.is_file() else write_task_vector_soup(path, stock, pretrained, inter_encoders(self_run), TASK_VECTOR_SCALE)


def prepare_stream(cfg, args, model, progress) -> tuple[Stream, int]:
    """The test images of the split, drawn and corrupted (cached under the work folder), and the in-distribution
    images (EATA's Fisher term, FOA's source statistics) when a method needs them."""
    from adaptsoup.core.data import Preprocess, load_folder
    from adaptsoup.core.models import class_names
    from adaptsoup_bench.datasets import require_cifar10
    from adaptsoup_bench.shift_config import bench_work_dir
    from adaptsoup_bench.shift_data import _draw, split_pool

    cifar = require_cifar10(cfg.data)
    pre = Preprocess.for_model(model)
    test = load_folder(cifar / "test", pre, labeled=True, class_names=class_names(model), progress=progress, description="decode test")
    pool = split_pool(test.labels, cfg.split)
    indices = _draw(pool, args.per_corruption or len(pool), cfg.seed)
    work = Path(args.work) if args.work else bench_work_dir(cfg, "c10c") / "tta_stream"
    cache = work / f"{cfg.split}-s{cfg.severity}-n{len(indices)}-seed{cfg.seed}-{pre.size[0]}x{pre.size[1]}"
    images = stream_images(test, indices, list(cfg.corruptions), cfg.severity, cache, progress=progress)
    wanted = "eata" in args.methods or args.foa
    source = fisher_batches(fisher_images(cifar / "train", pre, FISHER_IMAGES, cfg.seed), pre) if wanted else None
    stream = Stream(images, test.labels[torch.as_tensor(indices)], np.asarray(indices), list(cfg.corruptions), pre, cfg.seed, cache,
                    source, cfg.bootstrap_resamples)
    return stream, len(pool)


def tune(runner: Runner, soup: str, methods: list[str], factors: list[float], settings: list[str], seed: int,
         fixed: dict | None = None) -> dict:
    """Every method at every lr factor on ``soup`` in ``settings``: the scores (mean online accuracy) and the choice."""
    k, n = len(runner.stream.corruptions), len(runner.stream.ids)
    runner.plan(len(methods) * len(factors) * sum(stream_batches(s, k, n) for s in settings))
    scores: dict[str, dict[str, float]] = {}
    rows = []
    for m in methods:
        for f in factors:
            got = [runner.run(soup, s, tta_config(m, default_base_lr(m) * f, seed, settings=fixed)) for s in settings]
            rows += [{**r, "lr_factor": f} for r in got]
            scores.setdefault(m, {})[factor_key(f)] = float(np.mean([r["accuracy"] for r in got]))
    chosen = choose_factors(scores)
    return {"soup": soup, "settings": settings, "lr_factors": factors, "scores": scores, "chosen_factor": chosen,
            "base_lr": {m: default_base_lr(m) * chosen[m] for m in methods}, "rows": rows}


def table(runner: Runner, soups: list[str], settings: list[str], methods: list[str], base_lr: dict, guards: bool, seed: int,
          fixed: dict | None = None) -> list[dict]:
    """Every soup x setting x method once (and METHOD+guard in the continual and mixed settings with ``guards``)."""
    k, n = len(runner.stream.corruptions), len(runner.stream.ids)
    plan = [(soup, s, tta_config(m, base_lr[m], seed, guard, fixed)) for soup in soups for s in settings for m in methods
            for guard in ((False, True) if guards and s in GUARD_SETTINGS else (False,))]
    runner.plan(sum(stream_batches(s, k, n) for _, s, _ in plan))
    return [runner.run(soup, s, cfg) for soup, s, cfg in plan]


def run(args: argparse.Namespace) -> dict:
    from adaptsoup.core.models import load_model
    from adaptsoup_bench.render_reports import renderer

    t_start, state = time.perf_counter(), source_state()
    cfg, self_run = open_bench_checked(args)
    choice = None if args.choose else read_choice(args.choice, args.methods)
    if args.threads:
        torch.set_num_threads(args.threads)
    # the methods' fixed settings: the choice's (frozen with its lrs), else the defaults; then --method-setting
    fixed = method_settings(args.method_setting, choice.get("method_settings") if choice else None)
    soups = {s: soup_path(s, cfg, self_run) for s in args.soups}
    with progress_bars(not args.no_progress) as progress:
        stream, pool = prepare_stream(cfg, args, load_model(None, soups[args.soups[0]]), progress)
        runner = Runner(stream, soups, progress, state["commit"])
        tuning = tune(runner, args.soups[0], args.methods, args.lr_factors, args.choose_settings, cfg.seed, fixed) if args.choose else None
        base_lr = tuning["base_lr"] if tuning else {m: choice["base_lr"][m] for m in args.methods}
        rows = table(runner, args.soups, args.settings, args.methods, base_lr, args.guard_variants, cfg.seed, fixed)
        if args.foa:
            rows += foa_rows(runner, args.soups, args.foa_per_corruption, args.int8, args.threads)
    k, n = len(stream.corruptions), len(stream.ids)
    size = "full" if n == pool else "quick" if n == QUICK_PER_CORRUPTION else "custom"
    out = {
        "benchmark": "tta-stream", "command": " ".join(["python -m adaptsoup_bench.tta_stream", *args.argv]),
        "commit": state["commit"], "source_dirty": state["dirty"], "machine": {k_: v for k_, v in environment().items() if k_ != "packages"},
        "threads": torch.get_num_threads(), "bench_config_path": str(args.bench_config), "bench_config": dataclasses.asdict(cfg),
        "split": cfg.split, "severity": cfg.severity, "per_corruption": n, "pool": pool, "stream_size": size, "corruptions": stream.corruptions,
        "batch_size": BATCH, "settings": args.settings, "methods": args.methods, "soups": {s: str(p) for s, p in soups.items()},
        "base_lr": base_lr, "method_settings": {m: dataclasses.asdict(tta_config(m, base_lr[m], cfg.seed, settings=fixed)) for m in args.methods},
        "choice": str(args.choice) if choice else str(args.choice_out), "source_images": FISHER_IMAGES if stream.source else 0,
        "baseline": {s: {"accuracy": float(runner.base[s].mean() * 100),
                         "per_corruption": {c: float(runner.base[s][i].mean() * 100) for i, c in enumerate(stream.corruptions)}}
                     for s in args.soups},
        "rows": rows, "tuning": tuning, "timings_s": {"total": round(time.perf_counter() - t_start, 1)},
        "notes": notes(cfg.split, n, pool, k, cfg.severity, size) + (foa_notes(args, n) if args.foa else []),
    }
    stem = Path(args.out) / f"tta_stream_{cfg.split}_s{cfg.severity}_n{n}{'_' + args.label if args.label else ''}"
    if tuning:
        write_json_atomic(Path(args.choice_out), {
            "split": cfg.split, "severity": cfg.severity, "per_corruption": n, "bench_config": str(args.bench_config),
            "commit": state["commit"], "default_base_lr": {m: default_base_lr(m) for m in args.methods},
            **{k_: tuning[k_] for k_ in ("soup", "settings", "lr_factors", "scores", "chosen_factor", "base_lr")},
            "method_settings": fixed})
    write_json_atomic(stem.with_suffix(".json"), out)
    write_text_atomic(stem.with_suffix(".md"), renderer("tta-stream")(out))
    print(f"wrote {stem}.json and .md in {out['timings_s']['total']:.0f}s" + (f"; the choice in {args.choice_out}" if tuning else ""))
    return out


def open_bench_checked(args: argparse.Namespace):
    """The settings' split checked against the mode before anything is loaded, then the run."""
    settings = json.loads(Path(args.bench_config).read_text(encoding="utf-8"))
    check_split(settings.get("bench_config", settings).get("split", "all"), args.choose, args.bench_config)
    return open_bench(args.bench_config)


def notes(split: str, n: int, pool: int, k: int, severity: int, size: str) -> list[str]:
    what = {"full": f"every one of the {split} split's {pool:,} test images (full)",
            "quick": f"a seeded draw of {n:,} of the {split} split's {pool:,} test images (quick: the full benchmark streams all {pool:,})",
            "custom": f"a seeded draw of {n:,} of the {split} split's {pool:,} test images (neither the full nor the quick size)"}[size]
    return [
        f"Stream size: {what}, each under all {k} corruptions at severity {severity}: {k * n:,} images per stream.",
        "Online accuracy: each batch of 64 is predicted before the update it causes. Gains are paired against the same soup "
        "without TTA on the same images, with a 95% percentile bootstrap over test images (one test image under every "
        "corruption is one cluster).",
        "Learning rates: each method's default base lr times the factor chosen on the tuning split's images (the choice file); "
        f"EATA's Fisher term from {FISHER_IMAGES:,} seeded CIFAR-10 training images, its redundancy margin 0.4 (its CIFAR-10 "
        "value). Wall times are as measured on the machine named above, not a speed benchmark; EATA's include its "
        "one-off Fisher pass over those images.",
    ]


def foa_notes(args: argparse.Namespace, n: int) -> list[str]:
    return [f"FOA (forward-only: CMA-ES over 3 prompt tokens, population 27, and activation shifting; the official settings, nothing "
            f"chosen) adapts each soup's prompt-capable ONNX export{' and its dynamic int8 copy' if args.int8 else ''} in the reset "
            f"setting only, on the first {min(args.foa_per_corruption, n):,} images of each corruption's stream (a batch costs 28 "
            "forward passes); its gain is paired with the same ONNX file without prompts or shift on those images, and its "
            f"source statistics come from the same {FISHER_IMAGES:,} training images as EATA's Fisher term."]


def parse(argv: list[str] | None) -> argparse.Namespace:
    def csv_list(allowed):
        def parse_one(text: str) -> list[str]:
            items = [x.strip() for x in text.split(",") if x.strip()]
            bad = [x for x in items if x not in allowed]
            if bad or not items:
                raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}; got {text!r}")
            return items
        return parse_one

    def floats(text: str) -> list[float]:
        return [float(x) for x in text.split(",")]

    p = argparse.ArgumentParser(prog="python -m adaptsoup_bench.tta_stream", description=__doc__.split("\n\n")[0])
    p.add_argument("--bench-config", required=True, help="A JSON of bench c10c settings whose adapt runs are complete.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--choose", action="store_true", help="Choose each method's lr factor (tuning split only).")
    mode.add_argument("--choice", help="The frozen choice written by --choose (report split only).")
    p.add_argument("--choice-out", help="With --choose: where the choice goes (default: OUT/tta_stream_choice.json).")
    p.add_argument("--per-corruption", type=int, help=f"Test images per corruption (default: the whole split; {QUICK_PER_CORRUPTION} is quick).")
    p.add_argument("--settings", type=csv_list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--choose-settings", type=csv_list(SETTINGS), default=["reset"], help="With --choose: the settings the lrs are scored in.")
    p.add_argument("--methods", type=csv_list(TTA_METHODS), default=list(TTA_METHODS))
    p.add_argument("--soups", type=csv_list((*SOUPS, *EXTRA_SOUPS)), default=list(SOUPS),
                   help="The first is the one the lrs are chosen on; deployed (the deployed model itself) and task_vector_soup "
                        f"(deployed + {TASK_VECTOR_SCALE:g} x the target's MAE task vector, adapt --preset task-vector's) are adaptable too.")
    p.add_argument("--method-setting", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="A fixed setting of one method besides its lr (a TTAConfig field, e.g. roid.roid_prior=none); repeatable.")
    p.add_argument("--label", default="", help="Appended to the result's file name, to keep variants apart.")
    p.add_argument("--lr-factors", type=floats, default=list(LR_FACTORS))
    p.add_argument("--guard-variants", action="store_true", help="Also each method with the drift guard (continual, mixed).")
    p.add_argument("--foa", action="store_true", help="Also FOA on each soup's prompt-capable ONNX export (reset setting).")
    p.add_argument("--foa-per-corruption", type=int, default=FOA_PER_CORRUPTION, help="FOA's images per corruption.")
    p.add_argument("--int8", action="store_true", help="With --foa: also FOA on the export's dynamic int8 copy.")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's).")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--work", help="Where the corrupted arrays and finished runs are kept (default: <bench work dir>/tta_stream).")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if any(f <= 0 for f in args.lr_factors) or min(args.per_corruption or 1, args.foa_per_corruption) < 1:
        p.error("--lr-factors must be positive, --per-corruption and --foa-per-corruption at least 1")
    if args.label and not all(ch.isalnum() or ch in "._-" for ch in args.label):
        p.error("--label: letters, digits, '.', '_' and '-' only")
    args.choice_out = args.choice_out or str(Path(args.out) / "tta_stream_choice.json")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    try:
        return run(args)
    except AdaptsoupError as exc:
        print(f"tta_stream: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
