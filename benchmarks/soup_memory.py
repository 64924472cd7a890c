"""Peak memory of mixing, in units of one ingredient's state-dict size.

Writes ``--ingredients`` synthetic float32 checkpoints of ``--mb`` MB each (many 1M-element tensors plus an
integer buffer, as a ViT's state dict has), then measures, each in a fresh subprocess so that one
measurement's freed memory cannot hide another's peak, the rise of the resident set size
(:class:`adaptsoup.core.resources.PeakMemory`) while

* ``stream``: :func:`adaptsoup.soup.average.stream_weighted_average` mixes them;
* ``stacked``: :class:`adaptsoup.soup.stacked.StackedIngredients` loads them (the stack itself is M units).

Run: ``python -m adaptsoup_bench.soup_memory`` (the figures quoted in those docstrings).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from adaptsoup.core.checkpoint import save_checkpoint

TENSOR_ELEMENTS = 2**20  # 4 MiB of float32 per tensor


def write_ingredients(folder: Path, count: int, mb: int) -> list[Path]:
    tensors = max(1, mb * 2**20 // (4 * TENSOR_ELEMENTS))
    paths = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        state = {f"w{j}": torch.randn(TENSOR_ELEMENTS, generator=gen) for j in range(tensors)}
        state["index"] = torch.arange(16)
        paths.append(save_checkpoint(folder / f"ingredient{i}.safetensors", state, None))
    return paths


def measure(kind: str, paths: list[str]) -> dict:
    """Run in the child process: the RSS rise of one mixing call, in MB and in ingredient units."""
    from adaptsoup.core.resources import PeakMemory

    unit = Path(paths[0]).stat().st_size
    with PeakMemory(interval_s=0.002) as memory:
        if kind == "stream":
            from adaptsoup.soup.average import stream_weighted_average

            result, _ = stream_weighted_average(paths)
        else:
            from adaptsoup.soup.stacked import StackedIngredients

            result = StackedIngredients(paths)
    del result
    rise = memory.peak - memory.start
    return {"kind": kind, "ingredients": len(paths), "unit_mb": round(unit / 2**20, 1),
            "rise_mb": round(rise / 2**20, 1), "rise_units": round(rise / unit, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingredients", type=int, default=4)
    parser.add_argument("--mb", type=int, default=100, help="size of one ingredient")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1:])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        paths = [str(p) for p in write_ingredients(Path(tmp), args.ingredients, args.mb)]
        for kind in ("stream", "stacked"):
            out = subprocess.run([sys.executable, "-m", "adaptsoup_bench.soup_memory", "--child", kind, *paths],
                                 check=True, capture_output=True, text=True).stdout
            print(out.strip())


if __name__ == "__main__":
    main()
