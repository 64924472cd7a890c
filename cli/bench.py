"""``adaptsoup bench ...``: the benchmarks (package ``adaptsoup_bench``), imported only when a command runs.

They need the ``[bench]`` extra; without it every command stops with one line saying how to install it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.table import Table

from adaptsoup_cli.common import command_line, fail, log_line, out, parse_names, print_rows

BENCH_EXTRA_MODULES = ("imagecorruptions", "sklearn")  # import names of the [bench] extra's packages


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The modules of ``names`` that cannot be imported here (looked up without importing them)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
            found = False
        if not found:
            missing.append(name)
    return missing


def require_bench_extra() -> None:
    """Stop with one line when the benchmarks' dependencies are not installed."""
    missing = missing_modules(BENCH_EXTRA_MODULES)
    if missing:
        fail(f"the benchmarks need {', '.join(missing)}: pip install 'adaptsoup[bench]'")


bench_app = typer.Typer(help="Benchmarks: accuracy under shift with the paper's protocol.", no_args_is_help=True)


# Options every benchmark command takes, declared once.
BenchStock = Annotated[Optional[Path], typer.Option(help="Deployed model / stock (default: benchmarks/stock/vit_tiny_patch4_32_cifar10.safetensors).")]
BenchDecoder = Annotated[Optional[Path], typer.Option(help="Its MAE decoder (default: the *_mae_decoder.safetensors file beside the stock).")]
BenchData = Annotated[Optional[Path], typer.Option(help="CIFAR-10 folder or tarball (default: $ADAPTSOUP_DATA or ../shared).")]
BenchOut = Annotated[Path, typer.Option("--out", help="Where the JSON, Markdown and PNGs go.")]
BenchWork = Annotated[Optional[Path], typer.Option(help="Working folder for generated data and runs (default: the cache); reruns resume there.")]
BenchDevice = Annotated[str, typer.Option(help="cpu or cuda.")]
BenchProgress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
# settings with their own flag cannot also be given by --set
BENCH_FLAGS = {"mode": "--mode", "severity": "--severity", "stock": "--stock", "decoder": "--decoder", "data": "--data",
               "out": "--out", "work": "--work", "corruptions": "--corruptions", "device": "--device",
               "decoder_warmup_loaded": "--warm-decoder", "label": "--label", "families": "--families", "protocol": "--protocol",
               "split": "--split"}
BenchWarmDecoder = Annotated[bool, typer.Option("--warm-decoder/--no-warm-decoder", help="Warm up the stock's MAE decoder (encoder frozen) before inter-training.")]
BenchSet = Annotated[Optional[List[str]], typer.Option("--set", help="KEY=VALUE: any other setting of the benchmark (e.g. inter_lrs=1e-5,2e-5 or ft_steps=500; lists comma-separated), repeatable.")]
BenchLabel = Annotated[str, typer.Option(help="Appended to the results' file names (<benchmark>_<mode>_s<severity>_<label>.json), to keep variants apart.")]
RESULTS = Path("benchmarks/results")


@bench_app.command("c10c")
def bench_c10c(
    mode: str = typer.Option("quick", help="quick (under 15 min on 2 cores) or full (under 2 h on 2 cores)."),
    severity: Optional[int] = typer.Option(None, min=1, max=5, help="Corruption severity (default 5; 3 with --split tuning)."),
    stock: BenchStock = None,
    decoder: BenchDecoder = None,
    data: BenchData = None,
    out_dir: BenchOut = RESULTS,
    work: BenchWork = None,
    corruptions: Optional[str] = typer.Option(None, help="Comma-separated corruptions (default the 15 of CIFAR-10-C); 'unseen' "
                                                        "stands for the ten held out of every choice (the four extra CIFAR-10-C "
                                                        "corruptions and six LAION-C-style distortions)."),
    device: BenchDevice = "cpu",
    warm_decoder: BenchWarmDecoder = False,
    label: BenchLabel = "",
    protocol: str = typer.Option("deployed", help="deployed (ingredients from the deployed model) or pretrained (the paper's: every ingredient LP-FT from the pre-trained stock; --set pretrained=PATH, default the stock's MAE phase)."),
    split: str = typer.Option("all", help="Test images drawn from: all, tuning (first half of each class; choose settings here) or report (second half; the frozen recipe, once)."),
    settings: BenchSet = None,
    progress: BenchProgress = True,
) -> None:
    """CIFAR-10 -> CIFAR-10-C: deployed, supervised soup, continued-SSL soup, Self-Soup (+ best, Self-Seasoned), + SAR."""
    require_bench_extra()
    from adaptsoup_bench.shift import C10CConfig, run_c10c
    from adaptsoup.pipeline.recipe import parse_settings
    from adaptsoup_bench.corruptions import ALL_SHIFTS, UNSEEN
    from adaptsoup.core.progress import progress_bars

    chosen = None
    if corruptions:
        chosen = [name for given in parse_names(corruptions) for name in (UNSEEN if given == "unseen" else [given])]
        unknown = [c for c in chosen if c not in ALL_SHIFTS]
        if unknown:
            fail(f"unknown corruption(s) {', '.join(unknown)}; known: {', '.join(ALL_SHIFTS)}, or 'unseen'")
    cfg = C10CConfig.for_mode(mode, severity=severity, stock=str(stock) if stock else None, decoder=str(decoder) if decoder else None,
                              data=str(data) if data else None, out=str(out_dir), work=str(work) if work else None,
                              corruptions=chosen, device=device, decoder_warmup_loaded=warm_decoder, label=label,
                              protocol=protocol, split=split,
                              **parse_settings(settings or [], C10CConfig, reserved=BENCH_FLAGS))
    with progress_bars(progress) as bars:
        result = run_c10c(cfg, command=command_line(), progress=bars,
                          log=log_line)
    print_rows(f"CIFAR-10-C severity {cfg.severity} ({mode}, protocol {cfg.protocol}, split {cfg.split})", result["rows"], ("clean", "disjoint", "joint"))
    for key, entry in result.get("paired", {}).items():
        out.print(f"{key}: " + ", ".join(f"{where} {e['mean']:+.2f} [{e['ci95'][0]:+.2f}, {e['ci95'][1]:+.2f}]" for where, e in entry.items()))


@bench_app.command("families")
def bench_families(
    mode: str = typer.Option("quick", help="quick (the c10c quick data, short runs) or full (the c10c full data, longer runs)."),
    severity: int = typer.Option(5, min=1, max=5, help="Corruption severity."),
    families: Optional[str] = typer.Option(None, help="Comma-separated subset of mae,mocov3,mmcr,noisy,partition."),
    stock: BenchStock = None,
    decoder: BenchDecoder = None,
    data: BenchData = None,
    out_dir: BenchOut = RESULTS,
    work: BenchWork = None,
    device: BenchDevice = "cpu",
    warm_decoder: BenchWarmDecoder = False,
    label: BenchLabel = "",
    settings: BenchSet = None,
    progress: BenchProgress = True,
) -> None:
    """Do MAE, MoCo v3, MMCR, noisy and partition ingredients mix? Family soups, all-family soups, on CIFAR-10-C."""
    require_bench_extra()
    from adaptsoup_bench.shift import BenchConfig
    from adaptsoup_bench.families import FamiliesConfig, run_families
    from adaptsoup.pipeline.recipe import parse_settings
    from adaptsoup.core.progress import progress_bars

    chosen = parse_names(families)
    cfg = FamiliesConfig.for_mode(mode, severity=severity, stock=str(stock) if stock else None, decoder=str(decoder) if decoder else None,
                                  data=str(data) if data else None, out=str(out_dir), work=str(work) if work else None,
                                  device=device, families=chosen, decoder_warmup_loaded=warm_decoder, label=label,
                                  **parse_settings(settings or [], FamiliesConfig, BenchConfig, reserved=BENCH_FLAGS))
    with progress_bars(progress) as bars:
        result = run_families(cfg, command=command_line(), progress=bars,
                              log=log_line)
    print_rows(f"ingredient families, CIFAR-10-C severity {severity} ({mode})", result["rows"], ("clean", "disjoint"))


@bench_app.command("imagenet-c")
def bench_imagenet_c(
    root: Path = typer.Option(..., help="ImageNet-C (<corruption>/<severity>/<wnid>/<image>) or LAION-C (<distortion>/intensity_level_<k>/<superclass>/<image>) root."),
    model: Path = typer.Option(..., "--model", "-m", help="A 1000-way ImageNet ViT checkpoint (the deployed model)."),
    source: Path = typer.Option(..., help="Labeled ImageNet source images in <wnid>/<image> folders (a subset of train is fine)."),
    decoder: Optional[Path] = typer.Option(None, help="MAE decoder checkpoint (original MAE key names)."),
    clean: Optional[Path] = typer.Option(None, help="Clean labeled images (e.g. ImageNet val) in <wnid>/<image> folders (LAION-C: <superclass>/ or member <wnid>/ folders): the clean column, halved by --split like the corrupted images."),
    layout: str = typer.Option("auto", help="auto, imagenet-c or laion-c."),
    mapping_dir: Optional[Path] = typer.Option(None, help="Folder with imagenet_class_index.json and category_mapping.json (default: ../shared/reference/laion-c)."),
    mode: str = typer.Option("quick", help="quick or full (sizes of the recipe, as for c10c)."),
    severity: Optional[int] = typer.Option(None, min=1, max=5, help="Severity / intensity level (default 5; 3 with --split tuning)."),
    corruptions: Optional[str] = typer.Option(None, help="Comma-separated subset of corruption folders."),
    protocol: str = typer.Option("deployed", help="deployed (ingredients from the deployed model) or pretrained (the paper's: every ingredient LP-FT from the pre-trained stock, plus the task-vector rows)."),
    pretrained: Optional[Path] = typer.Option(None, help="The pre-trained stock of --protocol pretrained (default: <model stem>_mae.safetensors beside --model)."),
    split: str = typer.Option("all", help="Images drawn from: all, tuning (first half of each class folder's images in sorted order; choose settings here) or report (second half; the frozen recipe, once)."),
    out_dir: BenchOut = RESULTS,
    work: BenchWork = None,
    device: BenchDevice = "cpu",
    warm_decoder: BenchWarmDecoder = False,
    label: BenchLabel = "",
    settings: BenchSet = None,
    progress: BenchProgress = True,
) -> None:
    """ImageNet-C / LAION-C: the same protocol, splits, rows and tables as c10c on the released layouts."""
    require_bench_extra()
    from adaptsoup_bench.shift import BenchConfig
    from adaptsoup_bench.imagenet_c import run_imagenet_c
    from adaptsoup.pipeline.recipe import parse_settings
    from adaptsoup.core.progress import progress_bars

    if layout not in ("auto", "imagenet-c", "laion-c"):
        fail(f"--layout must be auto, imagenet-c or laion-c, got {layout!r}")
    chosen = parse_names(corruptions)
    reserved = {**BENCH_FLAGS, "pretrained": "--pretrained", "data": "--root, --source and --clean"}
    cfg = BenchConfig.for_mode(mode, severity=severity, stock=str(model), decoder=str(decoder) if decoder else None, out=str(out_dir),
                               work=str(work) if work else None, corruptions=chosen, device=device,
                               decoder_warmup_loaded=warm_decoder, label=label, protocol=protocol, split=split,
                               **({"pretrained": str(pretrained)} if pretrained else {}),
                               **parse_settings(settings or [], BenchConfig, reserved=reserved))
    if chosen is None:
        cfg.corruptions = []
    with progress_bars(progress) as bars:
        result = run_imagenet_c(cfg, str(root), str(source), layout=layout, mapping_dir=str(mapping_dir) if mapping_dir else None,
                                clean=str(clean) if clean else None, command=command_line(), progress=bars,
                                log=log_line)
    print_rows(f"{result['benchmark']} severity {cfg.severity} ({mode}, protocol {cfg.protocol}, split {cfg.split})", result["rows"],
               ("clean", "disjoint", "joint"))
    for key, entry in result.get("paired", {}).items():
        out.print(f"{key}: " + ", ".join(f"{where} {e['mean']:+.2f} [{e['ci95'][0]:+.2f}, {e['ci95'][1]:+.2f}]" for where, e in entry.items()))


@bench_app.command("label-free")
def bench_label_free(
    tasks: Optional[List[str]] = typer.Option(None, "--task", help="NAME=TRAIN_DIR:TEST_DIR[:LABELED_DIR] (labeled class_name/<image> folders), repeatable."),
    preset: Optional[str] = typer.Option(None, help="'cifar': build CIFAR-10, digits and the four CIFAR-10-C corruption-family tasks."),
    families: Optional[str] = typer.Option(None, help="With --preset cifar: comma-separated corruption families (default: noise,blur,weather,digital)."),
    mode: str = typer.Option("quick", help="quick or full: the defaults of every size below (see the README)."),
    train_images: Optional[int] = typer.Option(None, help="With --preset: training images per task (SSL data and k-NN bank); quick 2000, full 5000."),
    test_images: Optional[int] = typer.Option(None, help="With --preset: test images per task; quick 1000, full 2000."),
    labeled_images: Optional[int] = typer.Option(None, help="With --preset: the few labels per task for best/season; quick 500, full 1000."),
    data: BenchData = None,
    stock: BenchStock = None,
    decoder: BenchDecoder = None,
    steps: Optional[int] = typer.Option(None, help="Inter-training steps per SSL ingredient; quick 100, full 400."),
    lr: Optional[float] = typer.Option(None, help="Inter-training learning rate; quick and full 2e-5."),
    mmcr_views: Optional[int] = typer.Option(None, min=2, help="MMCR: augmented views per image; quick 2, full 4."),
    samples: Optional[int] = typer.Option(None, help="Seasoning: Dirichlet samples scored by k-NN on the few labels; quick 100, full 300."),
    self_season_epochs: Optional[int] = typer.Option(None, help="Self-Seasoning epochs over the task's training images; quick 5, full 10."),
    out_dir: BenchOut = RESULTS,
    work: BenchWork = None,
    device: BenchDevice = "cpu",
    progress: BenchProgress = True,
) -> None:
    """Label-free soups for new tasks (Table 3): SSL-only ingredients + the stock, mixed four ways, scored by k-NN."""
    require_bench_extra()
    from adaptsoup.core.data import default_cache_dir
    from adaptsoup_bench.datasets import default_stock_path
    from adaptsoup.core.progress import progress_bars
    from adaptsoup_bench.label_free import METHODS, LabelFreeConfig, Task, prepare_cifar_tasks, run_label_free

    parsed: dict = {}
    for spec in tasks or []:
        name, sep, dirs = spec.partition("=")
        parts = dirs.split(":")
        if not (sep and name and len(parts) in (2, 3) and all(parts)):
            fail(f"--task takes NAME=TRAIN_DIR:TEST_DIR[:LABELED_DIR], got {spec!r}")
        parsed[name] = Task(*parts)
    if preset not in (None, "cifar"):
        fail(f"--preset must be 'cifar', got {preset!r}")
    cfg = LabelFreeConfig.for_mode(mode, steps=steps, lr=lr, mmcr_views=mmcr_views, samples=samples, self_season_epochs=self_season_epochs,
                                   train_images=train_images, test_images=test_images, labeled_images=labeled_images, device=device)
    if not parsed and preset is None:
        fail("give --task NAME=TRAIN_DIR:TEST_DIR (repeatable) or --preset cifar")
    stock_path = stock or default_stock_path()
    if not Path(stock_path).is_file():
        fail(f"stock not found: {stock_path} (train it with `make stock`, or pass --stock)")
    dec = decoder or Path(stock_path).with_name(Path(stock_path).stem + "_mae_decoder.safetensors")
    work_dir = work or default_cache_dir() / "bench" / "label-free"
    with progress_bars(progress) as bars:
        if preset == "cifar":
            fams = tuple(parse_names(families)) if families else None
            built = prepare_cifar_tasks(work_dir / "tasks", data, train_images=cfg.train_images, test_images=cfg.test_images,
                                        labeled_images=cfg.labeled_images, families=fams, progress=bars)
            parsed = {**built, **parsed}
        result = run_label_free(str(stock_path), str(dec) if Path(dec).is_file() else None, parsed, cfg, str(out_dir), str(work_dir), command=command_line(), progress=bars,
                                log=log_line)
    table = Table(title="label-free soups: k-NN top-1")
    cols = ["stock", *METHODS]
    table.add_column("task")
    for c in cols:
        table.add_column(c, justify="right")
    for name, r in result["tasks"].items():
        table.add_row(name, *(f"{r['top1_knn'][c]:.2f}" for c in cols))
    out.print(table)
