"""Peak memory of mixing, in units of one ingredient's state-dict size, and of Self-Seasoning, in MB.

Each measurement runs in a fresh subprocess (so that one measurement's freed memory cannot hide another's
peak), with the modules imported before it starts, and reports the rise of the resident set size
(:class:`adaptsoup.core.resources.PeakMemory`, sampled every 2 ms) while

* ``stream``: :func:`adaptsoup.soup.average.stream_weighted_average` mixes M synthetic float32 checkpoints
  of ``--mb`` MB each (many 1M-element tensors plus an integer buffer, as a ViT's state dict has);
* ``stacked``: :class:`adaptsoup.soup.stacked.StackedIngredients` loads them (the stack itself is M units);
* ``self-season``: one Self-Seasoning step (``epochs=1``, a target of exactly one batch) over M random
  ``--season-arch`` ingredients (default vit_small_patch16_224, the issue's case) at batch 32 and 256, with
  gradient caching (``chunk_size`` 32, the default) and, for comparison, without (``chunk_size`` 0: the
  whole batch's graph at once).  The stack is loaded before the measurement: the rise is the step's own.

    python -m adaptsoup_bench.soup_memory                      # mixing, M = 4 and 8
    python -m adaptsoup_bench.soup_memory --self-season        # and Self-Seasoning, M = 4/8/16, batch 32/256

Writes benchmarks/results/soup_memory.{json,md} (``--out``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from adaptsoup.core.checkpoint import save_checkpoint

TENSOR_ELEMENTS = 2**20  # 4 MiB of float32 per tensor
RESULTS = Path(__file__).resolve().parent / "results"


def write_ingredients(folder: Path, count: int, mb: int) -> list[Path]:
    tensors = max(1, mb * 2**20 // (4 * TENSOR_ELEMENTS))
    paths = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        state = {f"w{j}": torch.randn(TENSOR_ELEMENTS, generator=gen) for j in range(tensors)}
        state["index"] = torch.arange(16)
        paths.append(save_checkpoint(folder / f"ingredient{i}.safetensors", state, None))
    return paths


def write_model_ingredients(folder: Path, arch: str, count: int) -> list[Path]:
    """``count`` randomly initialised ``arch`` checkpoints (seeds 0..count-1) with adaptsoup metadata."""
    from adaptsoup.core.models import create_model, model_meta

    paths = []
    for i in range(count):
        torch.manual_seed(i)
        model = create_model(arch, num_classes=10)
        paths.append(save_checkpoint(folder / f"{arch}_{i}.safetensors", model.state_dict(), model_meta(model)))
    return paths


def measure_mixing(kind: str, paths: list[str]) -> dict:
    """In the child: the RSS rise of one mixing call, in MB and in ingredient units."""
    from adaptsoup.core.resources import PeakMemory
    from adaptsoup.soup.average import stream_weighted_average
    from adaptsoup.soup.stacked import StackedIngredients

    unit = Path(paths[0]).stat().st_size
    with PeakMemory(interval_s=0.002) as memory:
        if kind == "stream":
            result, _ = stream_weighted_average(paths)
        else:
            result = StackedIngredients(paths)
    del result
    rise = memory.peak - memory.start
    return {"kind": kind, "ingredients": len(paths), "unit_mb": round(unit / 2**20, 1),
            "rise_mb": round(rise / 2**20, 1), "rise_units": round(rise / unit, 2)}


def measure_self_season(batch: int, chunk: int, paths: list[str]) -> dict:
    """In the child: the RSS rise of one Self-Seasoning step at ``batch`` (stack loaded beforehand)."""
    from adaptsoup.core.data import ImageSet
    from adaptsoup.core.resources import PeakMemory
    from adaptsoup.soup.methods.self_season import SelfSeasonOptions, self_season
    from adaptsoup.soup.stacked import open_stack

    model, stack, pre = open_stack(paths)
    images = torch.randint(0, 256, (batch, 3, *pre.size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    target = ImageSet(images=images, paths=[f"{i}.png" for i in range(batch)])
    options = SelfSeasonOptions(epochs=1, batch_size=batch, chunk_size=chunk)
    t0 = time.perf_counter()
    with PeakMemory(interval_s=0.005) as memory:
        result = self_season(model, stack, target, pre, options)
    unit = stack.nbytes() / len(paths)
    return {"kind": "self-season", "ingredients": len(paths), "batch": batch, "chunk_size": chunk, "steps": result.steps,
            "unit_mb": round(unit / 2**20, 1), "rise_mb": round((memory.peak - memory.start) / 2**20, 1),
            "wall_s": round(time.perf_counter() - t0, 1)}


def in_child(args: list[str]) -> dict:
    """Run one measurement in a fresh interpreter and return its JSON line."""
    out = subprocess.run([sys.executable, "-m", "adaptsoup_bench.soup_memory", "--child", *args],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def mixing_section(tmp: Path, counts: list[int], mb: int) -> list[dict]:
    rows = []
    for count in counts:
        paths = [str(p) for p in write_ingredients(tmp / f"mix{count}", count, mb)]
        for kind in ("stream", "stacked"):
            rows.append(in_child([kind, *paths]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def self_season_section(tmp: Path, arch: str, counts: list[int], batches: list[int], baseline_batch: int) -> list[dict]:
    paths = [str(p) for p in write_model_ingredients(tmp / "models", arch, max(counts))]
    rows = []
    for count in counts:
        for batch in batches:
            rows.append(in_child(["self-season", str(batch), "32", *paths[:count]]))
            print(json.dumps(rows[-1]), flush=True)
    rows.append(in_child(["self-season", str(baseline_batch), "0", *paths[: min(counts)]]))  # without gradient caching
    print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = ["# Memory of mixing and of Self-Seasoning", "", f"Command: `{result['command']}`", "",
             f"CPU: {result['environment'].get('cpu', '?')}; torch {result['environment'].get('torch')}.", "",
             "| what | M | peak RSS rise (MB) | in ingredient units |", "|---|---|---|---|"]
    for row in result["mixing"]:
        name = "uniform average (streamed)" if row["kind"] == "stream" else "stacked ingredients"
        lines.append(f"| {name} | {row['ingredients']} | {row['rise_mb']} | {row['rise_units']} |")
    if result.get("self_season"):
        lines += ["", f"Self-Seasoning, one step, {result['season_arch']} (one ingredient = {result['self_season'][0]['unit_mb']} MB):", "",
                  "| M | batch | chunk (0 = no gradient caching) | peak RSS rise (MB) | wall (s) |", "|---|---|---|---|---|"]
        for row in result["self_season"]:
            lines.append(f"| {row['ingredients']} | {row['batch']} | {row['chunk_size']} | {row['rise_mb']} | {row['wall_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingredients", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--mb", type=int, default=100, help="size of one synthetic ingredient")
    parser.add_argument("--self-season", action="store_true", help="also measure Self-Seasoning (minutes of CPU)")
    parser.add_argument("--season-arch", default="vit_small_patch16_224")
    parser.add_argument("--season-ingredients", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--season-batches", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, rest = args.child[0], args.child[1:]
        got = measure_self_season(int(rest[0]), int(rest[1]), rest[2:]) if kind == "self-season" else measure_mixing(kind, rest)
        print(json.dumps(got))
        return
    import adaptsoup
    from adaptsoup.core.io import write_json_atomic, write_text_atomic
    from adaptsoup.core.manifest import environment

    result = {"command": "python -m adaptsoup_bench.soup_memory " + " ".join(argv if argv is not None else sys.argv[1:]),
              "environment": environment(), "adaptsoup": adaptsoup.__version__, "season_arch": args.season_arch}
    with tempfile.TemporaryDirectory() as tmp:
        result["mixing"] = mixing_section(Path(tmp), args.ingredients, args.mb)
        if args.self_season:
            result["self_season"] = self_season_section(Path(tmp), args.season_arch, args.season_ingredients, args.season_batches,
                                                        max(args.season_batches))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "soup_memory.json", result)
    write_text_atomic(args.out / "soup_memory.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
