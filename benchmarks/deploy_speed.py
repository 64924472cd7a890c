"""Deployment speed: images/s of eager PyTorch and of the onnxruntime files ``adaptsoup export`` writes.

    python benchmarks/deploy_speed.py [--threads 1] [--rounds 5] [--batches 1,8,64] [--models reference,vit_base]
                                      [--data PATH_TO_CIFAR10] [--accuracy-images 10000] [--quick]

Variants, per model and batch size: eager fp32, eager bf16 (autocast), ORT fp32 of the plain export
(``--no-optimize``), ORT fp32 of the optimised export (the default), ORT int8 dynamic and ORT int8 static
(QDQ), both quantized from the optimised file.  Models: the CIFAR-10 reference stock
(``benchmarks/stock/vit_tiny_patch4_32_cifar10.safetensors``, 32 px) and a ``vit_base_patch16_224`` with
random weights (224 px).  All variants are timed in one process, alternating in rounds (the median of the
rounds is reported), after a warm-up; ``--threads`` sets both torch's and onnxruntime's intra-op threads.
With CIFAR-10 (``--data`` or ``../shared/datasets``), the reference stock's variants are also scored on
``--accuracy-images`` test images; its static int8 model is calibrated on 512 seeded CIFAR-10 *training*
images, unlabeled, never on the images its accuracy is scored on.

How close fp32 is to the machine: each model's FLOPs per image are counted (``torch.utils.flop_counter``)
and each fp32 variant's images/s turned into GFLOP/s, against the **fp32 GEMM ceiling** measured in the
same run: the faster of ``torch.mm`` and an onnxruntime ``MatMul`` on 2048x2048 float32 matrices, at the
same threads. A variant near the ceiling cannot be made much faster in fp32 by any graph change.

Writes benchmarks/results/deploy_speed.json and .md (atomically).  ``main(argv)`` assembles a dict of
sections, one function each (:func:`eager_vs_onnx`); other sections can be added beside it.  The FLOP counts
and the ceiling are in :mod:`adaptsoup_bench.deploy_speed_flops`, the Markdown in :mod:`adaptsoup_bench.deploy_speed_report`.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adaptsoup.core.data import Preprocess  # noqa: E402
from adaptsoup.core.io import write_json_atomic, write_text_atomic  # noqa: E402
from adaptsoup.core.manifest import environment  # noqa: E402
from adaptsoup.deploy.onnx import export_onnx  # noqa: E402
from adaptsoup.deploy.quantize import StaticConfig, quantize_int8, quantize_static_int8  # noqa: E402
from adaptsoup.deploy.runtime import onnx_logits, ort_session  # noqa: E402
from adaptsoup_bench.deploy_speed_flops import FP32_VARIANTS, flops_per_image, fp32_efficiency, gemm_ceiling  # noqa: E402,F401
from adaptsoup_bench.deploy_speed_report import cpu_name, eager_vs_onnx_markdown, markdown  # noqa: E402,F401

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "deploy_speed"
VARIANTS = ("eager fp32", "eager bf16", "ORT fp32 (plain)", "ORT fp32 (optimised)", "ORT int8 dynamic", "ORT int8 static")
Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SpeedConfig:
    threads: int = 1
    rounds: int = 5
    batches: tuple[int, ...] = (1, 8, 64)
    min_seconds: float = 1.0  # each timed block repeats the batch until it lasts about this long
    calibration_images: int = 512
    quick: bool = False


@dataclass
class Subject:
    """One model to measure, with the images it is timed (and calibrated, and maybe scored) on."""

    name: str
    model: torch.nn.Module
    images: np.ndarray  # normalised float32 [N, 3, H, W]; timing batches are cut from it
    labels: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    calibration: np.ndarray | None = None  # static int8's calibration images (default: the first timing images)


# ----------------------------------------------------------------------------------------------------------------
# Variants


def eager_runner(model: torch.nn.Module, bf16: bool) -> Runner:
    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(torch.from_numpy(batch)).float().numpy()

    return run


def session_runner(path: Path, threads: int) -> Runner:
    session = ort_session(path, threads=threads)
    return lambda batch: session.run(None, {"input": batch})[0]


def build_variants(subject: Subject, workdir: Path, cfg: SpeedConfig) -> tuple[dict[str, Runner], dict[str, dict]]:
    """The six variants of ``subject`` as callables on a normalised batch, and what each file holds."""
    quiet = lambda _line: None  # noqa: E731 - the exporters' fallback notes are in the returned file info
    plain = export_onnx(subject.model, workdir / "plain.onnx", optimize=False, log=quiet)
    optimised = export_onnx(subject.model, workdir / "model.onnx", optimize=True, log=quiet)
    dynamic = quantize_int8(optimised.path)
    calibration = (subject.images if subject.calibration is None else subject.calibration)[: cfg.calibration_images]
    static = quantize_static_int8(optimised.path, calibration, StaticConfig(max_images=cfg.calibration_images))
    paths = {"ORT fp32 (plain)": plain.path, "ORT fp32 (optimised)": optimised.path, "ORT int8 dynamic": dynamic, "ORT int8 static": static}
    runners: dict[str, Runner] = {"eager fp32": eager_runner(subject.model, False), "eager bf16": eager_runner(subject.model, True)}
    runners.update({name: session_runner(path, cfg.threads) for name, path in paths.items()})
    info = {name: {"file": Path(path).name, "size_mb": round(Path(path).stat().st_size / 1e6, 2)} for name, path in paths.items()}
    info["ORT fp32 (plain)"]["exporter"] = plain.exporter
    info["ORT fp32 (optimised)"].update(exporter=optimised.exporter, fusions=optimised.optimization.fused,
                                        optimize_note=optimised.optimization.reason)
    info["ORT int8 static"]["calibration"] = f"{StaticConfig().calibration}, {len(calibration)} images"
    return runners, info


# ----------------------------------------------------------------------------------------------------------------
# Measurements


def repetitions(run: Runner, batch: np.ndarray, min_seconds: float) -> int:
    """Warm ``run`` up on ``batch`` (twice), then how many calls make a timed block of about ``min_seconds``."""
    run(batch)
    start = time.perf_counter()
    run(batch)
    return max(1, round(min_seconds / max(time.perf_counter() - start, 1e-6)))


def time_variants(runners: dict[str, Runner], batch: np.ndarray, cfg: SpeedConfig) -> dict[str, dict]:
    """images/s of each variant on ``batch``: the variants alternate within each round; median and spread of the rounds."""
    reps = {name: repetitions(run, batch, cfg.min_seconds) for name, run in runners.items()}
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(cfg.rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(reps[name]):
                run(batch)
            rates[name].append(len(batch) * reps[name] / (time.perf_counter() - start))
    return {name: {"images_per_s": round(statistics.median(r), 2), "min": round(min(r), 2), "max": round(max(r), 2),
                   "calls_per_round": reps[name]} for name, r in rates.items()}


def accuracy(runners: dict[str, Runner], images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> dict[str, float]:
    """Top-1 accuracy (percent) of each variant on the labeled ``images``."""
    scores = {}
    for name, run in runners.items():
        predictions = np.concatenate([run(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
        scores[name] = round(float((predictions == labels).mean() * 100), 2)
    return scores


def ratios(speeds: dict[str, dict]) -> dict[str, float]:
    """The ratios the issue's targets are stated in, from numbers of the same run."""
    rate = {name: s["images_per_s"] for name, s in speeds.items()}
    pairs = {"ORT fp32 (optimised) / eager fp32": ("ORT fp32 (optimised)", "eager fp32"),
             "ORT fp32 (plain) / eager fp32": ("ORT fp32 (plain)", "eager fp32"),
             "ORT fp32 (optimised) / ORT fp32 (plain)": ("ORT fp32 (optimised)", "ORT fp32 (plain)"),
             "eager bf16 / eager fp32": ("eager bf16", "eager fp32"),
             "ORT int8 dynamic / ORT fp32 (optimised)": ("ORT int8 dynamic", "ORT fp32 (optimised)"),
             "ORT int8 static / ORT fp32 (optimised)": ("ORT int8 static", "ORT fp32 (optimised)")}
    return {label: round(rate[a] / rate[b], 3) for label, (a, b) in pairs.items() if a in rate and b in rate}


def eager_vs_onnx(subject: Subject, cfg: SpeedConfig, workdir: Path, log: Callable[[str], None] = print,
                  ceiling: float | None = None) -> dict:
    """Section: every variant's images/s at each batch size (and accuracy when ``subject`` has labels); with the
    fp32 GEMM ``ceiling`` (GFLOP/s), each fp32 variant's GFLOP/s and fraction of it."""
    torch.set_num_threads(cfg.threads)
    gflop = flops_per_image(subject.model, tuple(subject.images.shape[1:])) / 1e9
    runners, files = build_variants(subject, workdir, cfg)
    rows = []
    for batch_size in cfg.batches:
        batch = np.ascontiguousarray(np.resize(subject.images, (batch_size, *subject.images.shape[1:])))
        speeds = time_variants(runners, batch, cfg)
        row = {"batch": batch_size, "speeds": speeds, "ratios": ratios(speeds)}
        if ceiling:
            row["fp32_efficiency"] = fp32_efficiency(speeds, gflop, ceiling)
        rows.append(row)
        log(f"{subject.name} batch {batch_size}: " + ", ".join(f"{n} {s['images_per_s']:.1f}/s" for n, s in speeds.items()))
    section = {"model": subject.name, "input_size": list(subject.images.shape[1:]), "gflop_per_image": float(f"{gflop:.6g}"),
               "files": files, "rows": rows, "notes": subject.notes}
    if subject.labels is not None:
        section["accuracy"] = accuracy(runners, subject.images, subject.labels)
        section["accuracy_images"] = int(len(subject.labels))
        log(f"{subject.name} accuracy: {section['accuracy']}")
    return section


# ----------------------------------------------------------------------------------------------------------------
# Subjects


def noise_images(model: torch.nn.Module, count: int, seed: int = 0) -> np.ndarray:
    """``count`` seeded uniform-noise images, normalised the way ``model`` expects."""
    pre = Preprocess.for_model(model)
    gen = torch.Generator().manual_seed(seed)
    return pre.normalize(torch.randint(0, 256, (count, 3, *pre.size), generator=gen, dtype=torch.uint8)).numpy()


def reference_subject(stock: Path, data: str | None, accuracy_images: int, minimum: int, log: Callable[[str], None]) -> Subject:
    """The reference stock with CIFAR-10 test images (a seeded subset of ``accuracy_images``) when found, else noise."""
    from adaptsoup.core.data import load_folder
    from adaptsoup.core.models import class_names, load_model
    from adaptsoup_bench.datasets import calibration_split, find_cifar10

    model = load_model(None, stock).eval()
    root = find_cifar10(data) if accuracy_images > 0 else None
    if root is None:
        note = "no CIFAR-10 found: timed on noise images, no accuracy" if accuracy_images > 0 else "accuracy not asked for"
        log(f"reference: {note}")
        return Subject(Path(stock).stem, model, noise_images(model, max(minimum, 64)), notes=[note])
    pre = Preprocess.for_model(model)
    test = load_folder(root / "test", pre, labeled=True, class_names=class_names(model))
    keep = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:accuracy_images]
    images = pre.normalize(test.images[keep]).numpy()
    # Calibrated on training images, never on the images the accuracy is reported on.
    train = load_folder(root / "train", pre, labeled=False)
    pick, _ = calibration_split(len(train), min(minimum, len(train)))
    calibration = pre.normalize(train.images[torch.from_numpy(pick)]).numpy()
    note = (f"accuracy on {len(keep)} CIFAR-10 test images (a seeded subset); static int8 calibrated on {len(pick)} "
            "seeded CIFAR-10 training images, unlabeled")
    return Subject(Path(stock).stem, model, images, test.labels[keep].numpy(), notes=[note], calibration=calibration)


def vit_base_subject(count: int) -> Subject:
    """A 224-px ViT-B/16 with random weights (timm, no download), timed on noise images."""
    import timm

    from adaptsoup.core.checkpoint import CheckpointMeta
    from adaptsoup.core.models import apply_meta

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    apply_meta(model, CheckpointMeta(arch="vit_base_patch16_224", num_classes=1000, class_names=[f"class_{i}" for i in range(1000)],
                                     input_size=(3, 224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                     interpolation="bicubic", crop_pct=0.9, provenance={"weights": "random"}))
    return Subject("vit_base_patch16_224 (random weights)", model, noise_images(model, count),
                   notes=["random weights: speed only; static int8 calibrated on noise images"])


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--models", default="reference,vit_base", help="comma list of: reference, vit_base")
    ap.add_argument("--stock", default=str(ROOT / "benchmarks" / "stock" / "vit_tiny_patch4_32_cifar10.safetensors"))
    ap.add_argument("--data", default=None, help="CIFAR-10 (see benchmarks/datasets.py); accuracy of the reference's variants")
    ap.add_argument("--accuracy-images", type=int, default=10000, help="CIFAR-10 test images scored (0: no accuracy)")
    ap.add_argument("--min-seconds", type=float, default=1.0, help="length of each timed block")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 round, batches 1 and 4, 64 accuracy images, short blocks")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output prefix (.json and .md are added)")
    return ap.parse_args(argv)


def config_from(args: argparse.Namespace) -> SpeedConfig:
    try:
        batches = tuple(int(b) for b in args.batches.split(",") if b.strip())
    except ValueError:
        raise SystemExit(f"deploy_speed: --batches must be a comma list of integers, got {args.batches!r}") from None
    if args.threads < 1 or args.rounds < 1 or not batches or min(batches) < 1:
        raise SystemExit("deploy_speed: --threads, --rounds and the --batches must be at least 1")
    if args.quick:
        return SpeedConfig(threads=args.threads, rounds=1, batches=(1, 4), min_seconds=0.0, calibration_images=16, quick=True)
    return SpeedConfig(threads=args.threads, rounds=args.rounds, batches=batches, min_seconds=args.min_seconds)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = config_from(args)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - {"reference", "vit_base"}:
        raise SystemExit(f"deploy_speed: --models takes reference and/or vit_base, got {args.models!r}")
    accuracy_images = min(args.accuracy_images, 64) if args.quick else args.accuracy_images
    torch.set_num_threads(cfg.threads)
    sections: dict = {"eager_vs_onnx": []}
    with tempfile.TemporaryDirectory(prefix="deploy_speed.") as scratch:
        sections["fp32_ceiling"] = gemm_ceiling(cfg.threads, Path(scratch), size=256 if cfg.quick else 2048,
                                                rounds=1 if cfg.quick else cfg.rounds)
        print(f"fp32 GEMM ceiling: {sections['fp32_ceiling']['gflops']} GFLOP/s")
        for name in models:
            subject = (reference_subject(Path(args.stock), args.data, accuracy_images, cfg.calibration_images, print) if name == "reference"
                       else vit_base_subject(max(cfg.calibration_images, max(cfg.batches))))
            workdir = Path(scratch) / name
            workdir.mkdir()
            sections["eager_vs_onnx"].append(eager_vs_onnx(subject, cfg, workdir, ceiling=sections["fp32_ceiling"]["ceiling_gflops"]))
    env = environment()
    machine = {k: v for k, v in env.items() if k != "packages"}
    machine.update(cpu=cpu_name(), torch=env["packages"].get("torch"), onnxruntime=env["packages"].get("onnxruntime"))
    result = {"command": "python benchmarks/deploy_speed.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "machine": machine, "threads": cfg.threads, "rounds": cfg.rounds, "quick": cfg.quick, "sections": sections}
    write_json_atomic(args.out + ".json", result)
    write_text_atomic(args.out + ".md", markdown(result) + "\n")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
