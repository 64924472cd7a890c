"""``make demo``: the whole of Self-Soupervision on data a package ships, offline, in a few minutes on 2 cores.

1. scikit-learn's handwritten digits are split into a clean labeled source set and a held-out set that is
   corrupted (noise, blur, contrast) into ``./shifted_images``;
2. the deployed model is the small ViT shipped in ``benchmarks/assets`` (trained on the clean source by
   ``benchmarks/train_demo_model.py``), with its MAE decoder;
3. ``adapt`` inter-trains it with MAE on the shifted images (no labels), fine-tunes back on source, and
   mixes the soup; a supervised soup (no inter-training) is built alongside as the baseline;
4. the soup is exported to ONNX and checked against PyTorch.

The run is deterministic at a given number of torch threads: the CPU kernels split their sums by thread
count, so 1 and 2 threads give gradients that differ by about 1e-6, which 150 MAE steps grow into other
accuracies. The demo therefore runs on ``DEMO_THREADS`` threads wherever it runs (``--threads`` to change).

Run ``python -m adaptsoup_bench.demo --help`` for options.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from adaptsoup.core.run_dir import DEPLOYED, SOUP, SUPERVISED_SOUP
from adaptsoup.pipeline.adapt import run_adapt
from adaptsoup.core.data import Preprocess, load_folder
from adaptsoup_bench.digits import DIGIT_CLASSES, make_digits_folders
from adaptsoup.deploy.onnx import export_and_check
from adaptsoup.core.models import load_model
from adaptsoup.core.progress import console, progress_bars
from adaptsoup.pipeline.recipe import AdaptConfig, FineTuneConfig, InterTrainConfig

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL = ASSETS / "digits_vit_mini.safetensors"
DEMO_DECODER = ASSETS / "digits_vit_mini_mae_decoder.safetensors"
DEMO_THREADS = 2  # the README's figures; another count gives other, equally valid, numbers


def demo_config(source: Path, shifted: Path, out: Path) -> AdaptConfig:
    """The demo's small recipe: 2 MAE runs x 2 fine-tunings (+2 vanilla), a few hundred steps each."""
    return AdaptConfig(
        model=str(DEMO_MODEL), stock=str(DEMO_DECODER), target=str(shifted), source=str(source), out=str(out),
        evals=[str(shifted)], vanilla=2, precision="fp32",  # fixed, not probed: the README's figures on any CPU
        inter=InterTrainConfig(lrs=[1e-4, 2e-4], steps=[150], batch_size=64, augment="crop-flip"),
        finetune=FineTuneConfig(lrs=[1e-4, 2e-4], steps=60, batch_size=64, augment="none"),
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m adaptsoup_bench.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=".", help="where demo_data/, shifted_images/ and runs/ are written")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--threads", type=int, default=DEMO_THREADS,
                    help=f"torch CPU threads (default {DEMO_THREADS}: the numbers in the README)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    work = Path(args.workdir)
    console.print("[bold]1. data[/bold]: scikit-learn digits -> clean source + corrupted ./shifted_images")
    source, shifted = make_digits_folders(work / "demo_data", shifted_dir=work / "shifted_images")
    out = work / "runs" / time.strftime("demo-%Y%m%d-%H%M%S")
    cfg = demo_config(source, shifted, out)
    console.print(f"[bold]2. adapt[/bold]: {DEMO_MODEL.name} -> {out}")
    with progress_bars(not args.no_progress) as bars:
        result = run_adapt(cfg, progress=bars, echo=lambda line: console.print(line, markup=False, highlight=False),
                           command="python -m adaptsoup_bench.demo")
    console.print("[bold]3. export[/bold]: soup -> ONNX")
    soup = load_model(None, result.soup_path)
    images = load_folder(shifted, Preprocess.for_model(soup), labeled=True, class_names=DIGIT_CLASSES)
    report = export_and_check(soup, out / "soup.onnx", images=images)
    scores = result.metrics[shifted.name]
    ingredients = [v for k, v in scores.items() if k.startswith("mae")]
    console.print()
    console.print(f"accuracy on the {len(images)} shifted images (labels used only to report this):")
    console.print(f"  deployed model            {scores[DEPLOYED]:6.2f}%")
    console.print(f"  supervised soup           {scores[SUPERVISED_SOUP]:6.2f}%   (fine-tuned on source only)")
    console.print(f"  self-soup                 {scores[SOUP]:6.2f}%   (MAE on the shifted images, then fine-tuned back)")
    console.print(f"  its ingredients           {min(ingredients):6.2f}% .. {max(ingredients):.2f}%")
    rec = result.recommendation
    if rec is not None:
        estimate = {m: row.get("atc-ne") for m, row in json.loads(result.manifest_path.read_text())["estimates"]["estimates"].items()}
        console.print(f"label-free estimate (ATC) of the deployed model {estimate[DEPLOYED]:.1f}%, of the self-soup {estimate[SOUP]:.1f}% "
                      f"(validation: {rec['validation'].split(';')[0]})")
        console.print("recommendation: " + (f"deploy {rec['model']}" if rec["switch"] else "keep the deployed model") + f" ({rec['reason']})")
    console.print(f"ONNX: {report.path}  (max |logit diff| vs PyTorch {report.max_abs_diff:.1e}, accuracy {report.fp32_accuracy:.2f}%)")
    console.print(f"done in {time.perf_counter() - t0:.0f}s on {torch.get_num_threads()} torch threads; manifest: {result.manifest_path}")


if __name__ == "__main__":
    main()
