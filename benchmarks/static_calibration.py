"""Which static-int8 calibration to default to, chosen without the test images: Percentile against MinMax.

    python -m adaptsoup_bench.static_calibration [--data PATH_TO_CIFAR10] [--calibration-images 512]
                                                 [--check-images 5000] [--seed 1]

The reference stock is exported (optimised, as ``adaptsoup export`` writes it), then quantized to static
int8 with each calibration method on the same ``--calibration-images`` seeded CIFAR-10 *training* images
(the images ``benchmarks/deploy_speed.py`` calibrates on). Each int8 model is compared with the fp32 model
on ``--check-images`` *other* training images: top-1 agreement with fp32 and the mean absolute logit
difference. The criterion needs no labels and never touches the test images that the deployment table
scores, so the choice it makes is not tuned on the reported accuracy. Writes
``benchmarks/results/static_calibration.{json,md}``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> dict:
    from adaptsoup.core.data import Preprocess, load_folder
    from adaptsoup.core.io import write_json_atomic, write_text_atomic
    from adaptsoup.core.manifest import cpu_model, git_commit, git_dirty
    from adaptsoup.core.models import load_model
    from adaptsoup.deploy.onnx import export_onnx
    from adaptsoup.deploy.quantize import CALIBRATIONS, StaticConfig, quantize_and_compare
    from adaptsoup.deploy.runtime import onnx_logits, ort_session
    from adaptsoup_bench.datasets import CALIBRATION_SEED, calibration_split, default_stock_path, require_cifar10

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="CIFAR-10 (see benchmarks/datasets.py)")
    parser.add_argument("--stock", default=str(default_stock_path()))
    parser.add_argument("--calibration-images", type=int, default=512)
    parser.add_argument("--check-images", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=CALIBRATION_SEED, help="the permutation of the training images (deploy_speed's by default)")
    parser.add_argument("--out", default=str(RESULTS / "static_calibration"), help="output prefix (.json and .md are added)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model = load_model(None, args.stock).eval()
    pre = Preprocess.for_model(model)
    train = load_folder(require_cifar10(args.data) / "train", pre, labeled=False)
    calib_idx, check_idx = calibration_split(len(train), args.calibration_images, args.check_images, args.seed)
    calibration = pre.normalize(train.images[torch.from_numpy(calib_idx)]).numpy()
    check = pre.normalize(train.images[torch.from_numpy(check_idx)]).numpy()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="static_calibration.") as tmp:
        fp32 = export_onnx(model, Path(tmp) / "model.onnx", log=lambda _line: None).path
        fp32_logits = onnx_logits(ort_session(fp32), check)
        for method in CALIBRATIONS:
            result = quantize_and_compare(Path(fp32), check, fp32_logits, kind="static", calibration=calibration,
                                          config=StaticConfig(calibration=method, max_images=args.calibration_images))
            rows[method] = {"top1_agreement": round(result.top1_agreement, 2), "mean_abs_diff": round(result.mean_abs_diff, 5),
                            "max_abs_diff": round(result.max_abs_diff, 4)}
            print(f"{method}: {rows[method]}", flush=True)
    best = max(rows, key=lambda m: (rows[m]["top1_agreement"], -rows[m]["mean_abs_diff"]))
    result = {"command": shlex.join(["python", "-m", "adaptsoup_bench.static_calibration", *(sys.argv[1:] if argv is None else argv)]),
              "commit": git_commit(), "source_dirty": git_dirty(), "cpu": cpu_model(), "stock": Path(args.stock).name,
              "calibration_images": len(calib_idx), "check_images": len(check_idx), "seed": args.seed,
              "images": "CIFAR-10 training images: calibration and check sets disjoint; no test image is used",
              "rows": rows, "closest_to_fp32": best, "wall_time_s": round(time.perf_counter() - start, 1)}
    lines = ["# Static int8 calibration, chosen on held-out training images", "", f"Command: `{result['command']}`  ",
             f"Commit {result['commit']}{' (with uncommitted changes)' if result['source_dirty'] else ''}, {result['cpu']}, "
             f"stock {result['stock']}: calibrated on {len(calib_idx)} seeded CIFAR-10 training images, compared with fp32 on "
             f"{len(check_idx)} other training images (no labels, no test images).", "",
             "| calibration | top-1 agreement with fp32 (%) | mean abs logit diff | max abs logit diff |", "|---|---|---|---|"]
    lines += [f"| {m} | {r['top1_agreement']:.2f} | {r['mean_abs_diff']:.5f} | {r['max_abs_diff']:.4f} |" for m, r in rows.items()]
    lines += ["", f"Closest to fp32: **{best}**."]
    write_json_atomic(args.out + ".json", result)
    write_text_atomic(args.out + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
