"""The ``adaptsoup`` command: thin Typer wrappers over the library.

Errors a user can fix (bad paths, bad options, unreadable checkpoints) print one line and exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, List, Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from adaptsoup.errors import AdaptsoupError
from adaptsoup.core.progress import console as progress_console

app = typer.Typer(
    name="adaptsoup",
    help="Self-Soupervision: make a deployed ViT robust to distribution shift without target labels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True, markup=False, highlight=False)
err = progress_console  # the progress bars draw on this console too, so log lines and bars do not collide


def log_line(line: str) -> None:
    """A library log line on stderr, as it is (no rich markup), above any progress bars."""
    err.print(line, markup=False, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> None:
    err.print(f"adaptsoup: error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# ----------------------------------------------------------------------------------------------------------------


@app.command()
def info(model: Path = typer.Argument(..., help="A checkpoint (.safetensors, .pt, .pth, .bin) or an ONNX file.")) -> None:
    """Show what a checkpoint or exported model holds: architecture, classes, preprocessing, provenance."""
    from adaptsoup.core.checkpoint import read_checkpoint

    if model.suffix == ".onnx":
        from adaptsoup.deploy.onnx import read_onnx_metadata

        if not model.is_file():
            fail(f"ONNX model not found: {model}")
        meta = read_onnx_metadata(model)
        for key, value in meta.items():
            out.print(f"{key}: {value}")
        return
    state, meta = read_checkpoint(model)
    table = Table(title=str(model), show_header=False)
    table.add_row("tensors", str(len(state)))
    table.add_row("parameters", f"{sum(v.numel() for v in state.values()):,}")
    if meta is None:
        table.add_row("metadata", "none (not written by adaptsoup: pass --arch when loading)")
    else:
        for key, value in meta.__dict__.items():
            table.add_row(key, str(value))
    out.print(table)


@app.command()
def export(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint to export (adaptsoup .safetensors, or a state dict with --arch)."),
    onnx: Path = typer.Option(..., "--onnx", "-o", help="Where to write the ONNX model."),
    arch: Optional[str] = typer.Option(None, help="timm architecture, if the checkpoint carries no adaptsoup metadata."),
    images: Optional[Path] = typer.Option(None, help="Image folder for the parity batch (and accuracy, if labeled)."),
    labeled: bool = typer.Option(False, help="--images is an ImageFolder layout: also report accuracy."),
    quantize: Optional[str] = typer.Option(None, help="'int8': also write NAME.int8.onnx (onnxruntime dynamic quantization)."),
    opset: int = typer.Option(18, min=17, help="ONNX opset (17 or newer)."),
    tolerance: float = typer.Option(1e-3, help="Largest allowed |logit difference| between ONNX and PyTorch."),
) -> None:
    """Export a checkpoint to ONNX, check parity in onnxruntime, optionally quantize to int8."""
    from adaptsoup.core.data import Preprocess, load_folder
    from adaptsoup.deploy.onnx import ParityError, export_and_check
    from adaptsoup.core.models import class_names, load_model

    net = load_model(arch, model)
    image_set = None
    if images is not None:
        pre = Preprocess.for_model(net)
        image_set = load_folder(images, pre, labeled=labeled, class_names=class_names(net) if labeled else None)
    try:
        report = export_and_check(net, onnx, images=image_set, quantize=quantize, opset=opset, tolerance=tolerance)
    except ParityError as exc:
        fail(str(exc), code=1)
    out.print(f"wrote {report.path} ({report.size_bytes / 1e6:.2f} MB, opset {report.opset}, {report.exporter} exporter)")
    out.print(f"parity on {report.batch_size} images: max |logit diff| {report.max_abs_diff:.2e}, top-1 agreement {report.top1_agreement:.1f}%")
    if report.fp32_accuracy is not None:
        out.print(f"fp32 accuracy: {report.fp32_accuracy:.2f}%")
    if report.quantized_path:
        out.print(
            f"wrote {report.quantized_path} ({report.int8_size_bytes / 1e6:.2f} MB): top-1 agreement with fp32 "
            f"{report.int8_top1_agreement:.1f}%, max |logit diff| {report.int8_max_abs_diff:.2e}"
            + (f", accuracy {report.int8_accuracy:.2f}%" if report.int8_accuracy is not None else "")
        )


@app.command()
def predict(
    onnx: Path = typer.Option(..., "--onnx", help="An ONNX model exported by adaptsoup."),
    images: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    csv: Path = typer.Option(Path("predictions.csv"), "--csv", help="Where to write path,class,probability."),
) -> None:
    """Run an exported model over a folder of images in onnxruntime; write a CSV of top-1 predictions."""
    from adaptsoup.deploy.onnx import predict_folder

    report = predict_folder(onnx, images, csv)
    out.print(f"wrote {report.csv_path}: {report.images} images" + (f", {len(report.skipped)} unreadable skipped" if report.skipped else ""))
    for path, reason in report.skipped[:10]:
        err.print(f"  skipped {path}: {reason}", markup=False, highlight=False, soft_wrap=True)


def _floats(text: Optional[str], option: str) -> Optional[List[float]]:
    if text is None:
        return None
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        fail(f"{option} takes comma-separated numbers, got {text!r}")
    if not values:
        fail(f"{option} is empty")
    return values


def _ints(text: Optional[str], option: str) -> Optional[List[int]]:
    values = _floats(text, option)
    if values is None:
        return None
    if any(v != int(v) for v in values):
        fail(f"{option} takes comma-separated integers, got {text!r}")
    return [int(v) for v in values]


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
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: make only the I-th of N parts of the ingredient grid, in the shared --out (one job of a cluster array); the job that finds the grid complete writes the soups."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Inter-train the stock with MAE on unlabeled target images, fine-tune back on source, and mix a soup.

    Under torchrun (--nproc-per-node N) every training run is data-parallel; rank 0 writes and prints."""
    from adaptsoup.core.distributed import world
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
    request = AdaptRequest(settings=settings, recipe_file=config, resume=resume, command="adaptsoup " + " ".join(sys.argv[1:]), shard=shard)
    with progress_bars(progress) as bars:
        result = run_adapt_job(request, progress=bars, echo=log_line)
    if not world().is_main:
        return
    if not result.complete:
        out.print(f"shard {shard}: done; {len(result.missing)} ingredient(s) still to come from other shards")
        out.print(f"manifest: {result.manifest_path}")
        return
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
    from adaptsoup.soup.mixing import MixOptions
    from adaptsoup.soup.run import MixRequest, mix_run
    from adaptsoup.core.progress import progress_bars

    if score not in ("auto", "classifier", "knn"):
        fail(f"--score must be auto, classifier or knn, got {score!r}")
    options = MixOptions(epochs=epochs, subset=subset, batch_size=batch_size, lr=lr, min_lr=min_lr, k=k, temperature=temperature,
                         center=center, samples=samples, split=split, seed=seed, greedy_tie=greedy_tie, score=score, include_stock=include_stock, bf16=bf16, device=device)
    req = MixRequest(run_dir=run_dir, methods=list(methods), target=str(target) if target else None,
                     labeled=str(labeled) if labeled else None, evals=[str(e) for e in eval_dirs] if eval_dirs else None,
                     ingredients=ingredients, options=options, save_as=save_as)
    with progress_bars(progress) as bars:
        mixes = mix_run(req, progress=bars, log=log_line)
    print_mixes({key: mixes[key] for _, key in req.keys()})


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


@app.command()
def tta(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint to adapt (a soup, or any adaptsoup checkpoint)."),
    target: Optional[Path] = typer.Option(None, "--target", "-t", help="Unlabeled image stream (folder, searched recursively)."),
    eval_labels: Optional[Path] = typer.Option(None, help="A labeled class_name/<image> folder used as the stream; its labels only score the online predictions."),
    method: str = typer.Option("sar", help="sar or tent."),
    out_dir: Path = typer.Option(Path("tta_out"), "--out", "-o", help="Where predictions.csv, adapted.safetensors and manifest.json go."),
    arch: Optional[str] = typer.Option(None, help="timm architecture, if the checkpoint carries no adaptsoup metadata."),
    batch_size: int = typer.Option(64, help="Stream batch size."),
    base_lr: Optional[float] = typer.Option(None, help="Learning rate per 64 images (lr = base_lr / 64 x batch); default SAR 1e-3, Tent 2.5e-4."),
    rho: float = typer.Option(0.05, help="SAR: SAM radius."),
    e0_factor: float = typer.Option(0.4, help="SAR: entropy filter E0 = factor x ln(classes)."),
    reset_threshold: float = typer.Option(0.2, help="SAR: reset the model when the loss EMA falls below this."),
    episodic: bool = typer.Option(False, help="Reset to the initial model after every batch."),
    optimizer: str = typer.Option("sgd", help="Tent: sgd (momentum 0.9, its ImageNet setting) or adam (its CIFAR setting)."),
    seed: int = typer.Option(0, help="Seed of the stream order."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Test-time adaptation (SAR or Tent) over a stream of images; writes online predictions and the adapted model."""
    from adaptsoup.core.progress import progress_bars
    from adaptsoup.tta.stream import TTA_METHODS, TTAConfig, tta_run_dir

    if method not in TTA_METHODS:
        fail(f"--method must be one of {', '.join(TTA_METHODS)}, got {method!r}")
    cfg = TTAConfig(method=method, batch_size=batch_size, base_lr=base_lr, rho=rho, e0_factor=e0_factor,
                    reset_threshold=reset_threshold, episodic=episodic, optimizer=optimizer, seed=seed, device=device)
    with progress_bars(progress) as bars:
        summary = tta_run_dir(str(model), str(out_dir), cfg, target=str(target) if target else None,
                              eval_labels=str(eval_labels) if eval_labels else None, arch=arch, progress=bars,
                              log=log_line)
    out.print(f"wrote {out_dir / 'predictions.csv'}, {out_dir / 'adapted.safetensors'}, {out_dir / 'manifest.json'}")
    if summary["online_accuracy"] is not None:
        out.print(f"online accuracy: {summary['online_accuracy']:.2f}%")


bench_app = typer.Typer(help="Benchmarks: accuracy under shift with the paper's protocol.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


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
               "decoder_warmup_loaded": "--warm-decoder", "label": "--label", "families": "--families"}
BenchWarmDecoder = Annotated[bool, typer.Option("--warm-decoder/--no-warm-decoder", help="Warm up the stock's MAE decoder (encoder frozen) before inter-training.")]
BenchSet = Annotated[Optional[List[str]], typer.Option("--set", help="KEY=VALUE: any other setting of the benchmark (e.g. inter_lrs=1e-5,2e-5 or ft_steps=500; lists comma-separated), repeatable.")]
BenchLabel = Annotated[str, typer.Option(help="Appended to the results' file names (<benchmark>_<mode>_s<severity>_<label>.json), to keep variants apart.")]
RESULTS = Path("benchmarks/results")


def print_rows(title: str, rows: list[dict], columns: tuple[str, ...]) -> None:
    """A benchmark's rows as a table: the row name, then each column's accuracy ('-' where it has none)."""
    table = Table(title=title)
    table.add_column("row")
    for col in columns:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["name"], *("-" if r.get(k) is None else f"{r[k]:.2f}" for k in columns))
    out.print(table)


@bench_app.command("c10c")
def bench_c10c(
    mode: str = typer.Option("quick", help="quick (under 15 min on 2 cores) or full (under 2 h on 2 cores)."),
    severity: int = typer.Option(5, min=1, max=5, help="Corruption severity (5 is the headline, 3 the second)."),
    stock: BenchStock = None,
    decoder: BenchDecoder = None,
    data: BenchData = None,
    out_dir: BenchOut = RESULTS,
    work: BenchWork = None,
    corruptions: Optional[str] = typer.Option(None, help="Comma-separated subset of the 15 corruptions."),
    device: BenchDevice = "cpu",
    warm_decoder: BenchWarmDecoder = False,
    label: BenchLabel = "",
    settings: BenchSet = None,
    progress: BenchProgress = True,
) -> None:
    """CIFAR-10 -> CIFAR-10-C: deployed, supervised soup, continued-SSL soup, Self-Soup (+ best, Self-Seasoned), + SAR."""
    from adaptsoup_bench.shift import C10CConfig, run_c10c
    from adaptsoup.pipeline.recipe import parse_settings
    from adaptsoup_bench.corruptions import CORRUPTIONS
    from adaptsoup.core.progress import progress_bars

    chosen = None
    if corruptions:
        chosen = [c.strip() for c in corruptions.split(",") if c.strip()]
        unknown = [c for c in chosen if c not in CORRUPTIONS]
        if unknown:
            fail(f"unknown corruption(s) {', '.join(unknown)}; known: {', '.join(CORRUPTIONS)}")
    cfg = C10CConfig.for_mode(mode, severity=severity, stock=str(stock) if stock else None, decoder=str(decoder) if decoder else None,
                              data=str(data) if data else None, out=str(out_dir), work=str(work) if work else None,
                              corruptions=chosen, device=device, decoder_warmup_loaded=warm_decoder, label=label,
                              **parse_settings(settings or [], C10CConfig, reserved=BENCH_FLAGS))
    with progress_bars(progress) as bars:
        result = run_c10c(cfg, command="adaptsoup " + " ".join(sys.argv[1:]), progress=bars,
                          log=log_line)
    print_rows(f"CIFAR-10-C severity {severity} ({mode})", result["rows"], ("clean", "disjoint", "joint"))


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
    from adaptsoup_bench.shift import BenchConfig
    from adaptsoup_bench.families import FamiliesConfig, run_families
    from adaptsoup.pipeline.recipe import parse_settings
    from adaptsoup.core.progress import progress_bars

    chosen = [f.strip() for f in families.split(",") if f.strip()] if families else None
    cfg = FamiliesConfig.for_mode(mode, severity=severity, stock=str(stock) if stock else None, decoder=str(decoder) if decoder else None,
                                  data=str(data) if data else None, out=str(out_dir), work=str(work) if work else None,
                                  device=device, families=chosen, decoder_warmup_loaded=warm_decoder, label=label,
                                  **parse_settings(settings or [], FamiliesConfig, BenchConfig, reserved=BENCH_FLAGS))
    with progress_bars(progress) as bars:
        result = run_families(cfg, command="adaptsoup " + " ".join(sys.argv[1:]), progress=bars,
                              log=log_line)
    print_rows(f"ingredient families, CIFAR-10-C severity {severity} ({mode})", result["rows"], ("clean", "disjoint"))


@bench_app.command("imagenet-c")
def bench_imagenet_c(
    root: Path = typer.Option(..., help="ImageNet-C (<corruption>/<severity>/<wnid>/<image>) or LAION-C (<distortion>/intensity_level_<k>/<superclass>/<image>) root."),
    model: Path = typer.Option(..., "--model", "-m", help="A 1000-way ImageNet ViT checkpoint (the deployed model)."),
    source: Path = typer.Option(..., help="Labeled ImageNet source images in <wnid>/<image> folders (a subset of train is fine)."),
    decoder: Optional[Path] = typer.Option(None, help="MAE decoder checkpoint (original MAE key names)."),
    layout: str = typer.Option("auto", help="auto, imagenet-c or laion-c."),
    mapping_dir: Optional[Path] = typer.Option(None, help="Folder with imagenet_class_index.json and category_mapping.json (default: ../shared/reference/laion-c)."),
    mode: str = typer.Option("quick", help="quick or full (sizes of the recipe, as for c10c)."),
    severity: int = typer.Option(5, min=1, max=5, help="Severity / intensity level."),
    corruptions: Optional[str] = typer.Option(None, help="Comma-separated subset of corruption folders."),
    out_dir: BenchOut = RESULTS,
    work: BenchWork = None,
    device: BenchDevice = "cpu",
    warm_decoder: BenchWarmDecoder = False,
    label: BenchLabel = "",
    settings: BenchSet = None,
    progress: BenchProgress = True,
) -> None:
    """ImageNet-C / LAION-C: the same rows and tables as c10c on the released layouts."""
    from adaptsoup_bench.shift import BenchConfig, run_imagenet_c
    from adaptsoup.pipeline.recipe import parse_settings
    from adaptsoup.core.progress import progress_bars

    if layout not in ("auto", "imagenet-c", "laion-c"):
        fail(f"--layout must be auto, imagenet-c or laion-c, got {layout!r}")
    chosen = [c.strip() for c in corruptions.split(",") if c.strip()] if corruptions else None
    cfg = BenchConfig.for_mode(mode, severity=severity, stock=str(model), decoder=str(decoder) if decoder else None, out=str(out_dir),
                               work=str(work) if work else None, corruptions=chosen, device=device,
                               decoder_warmup_loaded=warm_decoder, label=label,
                               **parse_settings(settings or [], BenchConfig, reserved=BENCH_FLAGS))
    if chosen is None:
        cfg.corruptions = []
    with progress_bars(progress) as bars:
        result = run_imagenet_c(cfg, str(root), str(source), layout=layout, mapping_dir=str(mapping_dir) if mapping_dir else None,
                                command="adaptsoup " + " ".join(sys.argv[1:]), progress=bars,
                                log=log_line)
    print_rows(f"{result['benchmark']} severity {severity} ({mode})", result["rows"], ("disjoint", "joint"))


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
    lr: Optional[float] = typer.Option(None, help="Inter-training learning rate (1e-4)."),
    mmcr_views: Optional[int] = typer.Option(None, min=2, help="MMCR: augmented views per image; quick 2, full 4."),
    samples: Optional[int] = typer.Option(None, help="Seasoning: Dirichlet samples scored by k-NN on the few labels; quick 100, full 300."),
    self_season_epochs: Optional[int] = typer.Option(None, help="Self-Seasoning epochs over the task's training images; quick 5, full 10."),
    out_dir: BenchOut = RESULTS,
    work: BenchWork = None,
    device: BenchDevice = "cpu",
    progress: BenchProgress = True,
) -> None:
    """Label-free soups for new tasks (Table 3): SSL-only ingredients + the stock, mixed four ways, scored by k-NN."""
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
            fams = tuple(f.strip() for f in families.split(",")) if families else None
            built = prepare_cifar_tasks(work_dir / "tasks", data, train_images=cfg.train_images, test_images=cfg.test_images,
                                        labeled_images=cfg.labeled_images, families=fams, progress=bars)
            parsed = {**built, **parsed}
        result = run_label_free(str(stock_path), str(dec) if Path(dec).is_file() else None, parsed, cfg, str(out_dir), str(work_dir), command="adaptsoup " + " ".join(sys.argv[1:]), progress=bars,
                                log=log_line)
    table = Table(title="label-free soups: k-NN top-1")
    cols = ["stock", *METHODS]
    table.add_column("task")
    for c in cols:
        table.add_column(c, justify="right")
    for name, r in result["tasks"].items():
        table.add_row(name, *(f"{r['top1_knn'][c]:.2f}" for c in cols))
    out.print(table)


def print_metrics(metrics: dict) -> None:
    """One table per eval folder: top-1 of the deployed model, each soup and each ingredient."""
    for eval_name, scores in metrics.items():
        table = Table(title=f"top-1 on {eval_name}")
        table.add_column("model")
        table.add_column("top-1 %", justify="right")
        for name, acc in sorted(scores.items(), key=lambda kv: (kv[0] not in ("deployed", "soup", "supervised_soup"), kv[0])):
            table.add_row(name, f"{acc:.2f}")
        out.print(table)


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
