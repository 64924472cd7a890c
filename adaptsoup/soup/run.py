"""Mixing the ingredients of an ``adapt`` run directory: ``adaptsoup mix`` and ``adapt --mix``.

Writes ``soups/<method>.safetensors``, records coefficients, diagnostics, wall time and accuracies in the
run's manifest (next to the uniform soup and the best ingredient), and draws the coefficients heat map.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from adaptsoup.core.evaluation import evaluate_checkpoints
from adaptsoup.core.run_dir import DEPLOYED, SOUP, SUPERVISED_SOUP
from adaptsoup.core.checkpoint import read_checkpoint, save_checkpoint
from adaptsoup.core.data import ImageSet, Preprocess, load_folder
from adaptsoup.errors import AdaptsoupError
from adaptsoup.core.manifest import Manifest
from adaptsoup.core.models import class_names, load_model, model_meta
from adaptsoup.core.progress import NullProgress
from adaptsoup.core.resources import PeakMemory
from adaptsoup.soup import methods as mixing_methods
from adaptsoup.soup.average import weighted_average
from adaptsoup.soup.registry import MixContext

MIX_PLOT = "mix_coefficients.png"
RESERVED = (SUPERVISED_SOUP,)  # soups/ names that adapt itself writes


@dataclass
class MixRequest:
    run_dir: Path
    methods: list[str]
    target: str | None = None  # default: the run's target folder
    labeled: str | None = None  # few labels for season / greedy / best
    evals: list[str] | None = None  # default: the run's --eval folders
    ingredients: str = "self"  # "self", "vanilla" or "all"
    options: dict[str, Any] = field(default_factory=dict)  # method -> its options dataclass; absent: the defaults
    include_stock: bool = False  # add the stock as one more ingredient
    device: str = "cpu"  # where the methods that hold the ingredients in memory run the mixed model
    save_as: str | None = None  # one method only: write soups/<save_as>.safetensors and record it under that name

    def keys(self) -> list[tuple[str, str]]:
        """(method, name it is saved and recorded under) for each requested method."""
        return [(self.methods[0], self.save_as)] if self.save_as else [(m, m) for m in self.methods]

    def options_for(self, method: str) -> Any:
        return self.options.get(method) or mixing_methods.get(method).default_options()

    def check(self) -> None:
        """Unknown methods, options for a method not requested, and a bad ``save_as`` fail before any work."""
        for method in self.methods:
            mixing_methods.get(method)
        stray = sorted(set(self.options) - set(self.methods))
        if stray:
            raise AdaptsoupError(f"options given for {', '.join(stray)}, which is not among the methods to run")
        if self.save_as is not None and (len(self.methods) != 1 or not self.save_as.replace("-", "").replace("_", "").isalnum()):
            raise AdaptsoupError("--as names one method's soup: give a single --method and a name of letters, digits, - and _")
        if self.save_as in RESERVED:
            raise AdaptsoupError(f"--as {self.save_as} would overwrite the soup that adapt wrote; choose another name")

    def needing(self, data: str) -> list[str]:
        """The requested methods that need ``data`` ("target" or "labels")."""
        return [m for m in self.methods if mixing_methods.get(m).needs == data]


def load_run(run_dir: Path) -> Manifest:
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise AdaptsoupError(f"{run_dir} is not an adapt run directory (no manifest.json)")
    manifest = Manifest.load_or_new(path)
    if not manifest.data.get("ingredients"):
        raise AdaptsoupError(f"{run_dir} has no finished ingredients yet: finish it with adaptsoup adapt --resume {run_dir}")
    return manifest


def run_ingredients(manifest: Manifest, run_dir: Path, which: str) -> tuple[list[str], list[Path]]:
    if which not in ("self", "vanilla", "all"):
        raise AdaptsoupError(f"--ingredients must be self, vanilla or all, got {which!r}")
    items = sorted((name, rec) for name, rec in manifest.data["ingredients"].items() if which == "all" or rec["kind"] == which
                   or (which == "self" and rec["kind"] == "ssl-only"))
    if not items:
        raise AdaptsoupError(f"the run has no {which} ingredients")
    missing = [name for name, rec in items if not (run_dir / rec["path"]).is_file()]
    if missing:
        raise AdaptsoupError(f"ingredient file(s) missing from {run_dir}: {', '.join(missing)}")
    return [n for n, _ in items], [run_dir / rec["path"] for _, rec in items]


@dataclass
class MixData:
    """The images the requested methods and the scoring use, decoded once."""

    target: ImageSet | None
    labeled: ImageSet | None
    evals: dict[str, ImageSet]


def load_mix_data(req: MixRequest, config: dict, pre: Preprocess, classes: list[str], progress) -> MixData:
    target = labeled = None
    if req.needing("target"):
        target = load_folder(req.target or config["target"], pre, progress=progress, description="decode target")
    if req.needing("labels"):
        if not req.labeled:
            raise AdaptsoupError(f"{', '.join(req.needing('labels'))} need(s) a few labels: pass --labeled DIR")
        labeled = load_folder(req.labeled, pre, labeled=True, progress=progress, description="decode labeled")
    eval_dirs = req.evals if req.evals is not None else config.get("evals", [])
    evals = {Path(e).name: load_folder(e, pre, labeled=True, class_names=classes, progress=progress, description=f"decode {Path(e).name}")
             for e in eval_dirs}
    return MixData(target, labeled, evals)


def mix_run(req: MixRequest, *, progress=None, log: Callable[[str], None] = print) -> dict:
    """Run each requested method on the run's ingredients; returns ``manifest['mixes']``."""
    run_dir = Path(req.run_dir)
    manifest = load_run(run_dir)
    config = manifest.data["config"]
    progress = progress or NullProgress()
    names, paths = run_ingredients(manifest, run_dir, req.ingredients)
    stock_path = Path(config["model"])
    if req.include_stock:
        names, paths = names + ["stock"], paths + [stock_path]
    req.check()
    first = load_model(None, paths[0])
    pre = Preprocess.for_model(first)
    data = load_mix_data(req, config, pre, class_names(first), progress)
    context = MixContext(paths=paths, names=names, stock_path=stock_path, target=data.target, labeled=data.labeled,
                         device=req.device, progress=progress, log=log)
    mixes = manifest.data.setdefault("mixes", {})
    for method, key in req.keys():
        mixes[key] = mix_one(method, key, req.options_for(method), context, model_meta(first), run_dir, log)
        for scores in manifest.data.get("metrics", {}).values():
            scores.pop(f"mix:{key}", None)  # this soup is new: an earlier one's accuracy no longer applies
        manifest.save()
    if data.evals:
        score_mixes(manifest, req, run_dir, names, paths, data.evals, pre, progress)
        manifest.save()
    plot_coefficients(mixes, run_dir / MIX_PLOT)
    return mixes


def mix_one(method: str, key: str, options: Any, context: MixContext, meta, run_dir: Path, log: Callable[[str], None]) -> dict:
    """Run one method, write ``soups/<key>.safetensors`` and return its manifest record."""
    t0 = time.perf_counter()
    with PeakMemory() as memory:
        result = mixing_methods.get(method)(context, options)
    wall = time.perf_counter() - t0
    out = run_dir / "soups" / f"{key}.safetensors"
    provenance = {"made_by": "adaptsoup mix", "stage": "soup", "method": method, "saved_as": key, "parents": context.names,
                  "coefficients": result.coefficients}
    save_checkpoint(out, result.state_dict, dataclasses.replace(meta, provenance=provenance))
    log(f"{key}: wrote {out} in {wall:.1f}s")
    names = context.names
    return {
        "method": method, "path": str(out.relative_to(run_dir)), "wall_s": round(wall, 2), "memory": memory.to_dict(), "ingredients": names,
        "coefficients": dict(zip(names, result.coefficients)) if result.coefficients is not None else None,
        "options": dataclasses.asdict(options), "device": context.device, "info": _jsonable(result.info),
    }


def score_mixes(manifest: Manifest, req: MixRequest, run_dir: Path, names: list[str], paths: list[Path],
                evals: dict[str, ImageSet], pre: Preprocess, progress) -> None:
    """Accuracy of the new soups, the uniform soup and the ingredients; each record gets its comparison."""
    mixes = manifest.data["mixes"]
    metrics = manifest.data.setdefault("metrics", {})
    candidates = {f"mix:{key}": run_dir / mixes[key]["path"] for _, key in req.keys()}
    candidates[SOUP] = run_dir / "soup.safetensors"
    candidates.update(dict(zip(names, paths)))
    candidates.pop("stock", None)
    metrics.update(evaluate_checkpoints(candidates, evals, pre, progress=progress, known=metrics))
    for _, key in req.keys():
        mixes[key]["metrics"] = {
            e: {"soup": scores.get(f"mix:{key}"), "uniform": scores.get(SOUP),
                "best_ingredient": max((scores[n] for n in names if n in scores), default=None),
                "deployed": scores.get(DEPLOYED)}
            for e, scores in metrics.items() if e in evals
        }


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def plot_coefficients(mixes: dict, out: Path) -> Path | None:
    """Heat map of mixture coefficients: ingredients (rows) x methods (columns)."""
    with_coeffs = {m: r["coefficients"] for m, r in mixes.items() if r.get("coefficients")}
    if not with_coeffs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adaptsoup.core.io import atomic_path

    ingredients = sorted({n for c in with_coeffs.values() for n in c})
    columns = sorted(with_coeffs)
    grid = torch.tensor([[with_coeffs[m].get(n, 0.0) for m in columns] for n in ingredients])
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(columns), 1.0 + 0.35 * len(ingredients)))
    im = ax.imshow(grid.numpy(), cmap="viridis", vmin=0.0, vmax=max(1e-9, float(grid.max())), aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(ingredients)), ingredients)
    for i in range(len(ingredients)):
        for j in range(len(columns)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w" if grid[i, j] < grid.max() / 2 else "k", fontsize=7)
    fig.colorbar(im, ax=ax, label="coefficient")
    ax.set_title("mixture coefficients")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return out


def interpolate(run_dir: Path, a: str, b: str, steps: int, eval_dir: str, *, progress=None) -> dict:
    """Accuracy along θ(λ) = (1−λ)·θ_a + λ·θ_b: linear mode connectivity of two ingredients (JSON + PNG)."""
    run_dir = Path(run_dir)
    manifest = load_run(run_dir)
    names, paths = run_ingredients(manifest, run_dir, "all")
    lookup = dict(zip(names, paths))
    lookup[SOUP] = run_dir / "soup.safetensors"
    for n in (a, b):
        if n not in lookup:
            raise AdaptsoupError(f"no ingredient {n!r} in {run_dir}; known: {', '.join(names)}")
    if steps < 2:
        raise AdaptsoupError("--steps must be at least 2")
    model = load_model(None, lookup[a])
    pre = Preprocess.for_model(model)
    images = load_folder(eval_dir, pre, labeled=True, class_names=class_names(model))
    from adaptsoup.core.evaluation import run_model, top1

    lambdas = [i / (steps - 1) for i in range(steps)]
    accs = []
    ends = [read_checkpoint(lookup[a])[0], read_checkpoint(lookup[b])[0]]  # two models: mixing in memory is cheap
    for lam in lambdas:
        state = weighted_average(ends, [1 - lam, lam])
        model.load_state_dict(state)
        accs.append(top1(run_model(model, images, pre).logits, images.labels))
    result = {"a": a, "b": b, "eval": str(eval_dir), "lambda": lambdas, "accuracy": accs}
    stem = f"interpolate_{a}_{b}"
    from adaptsoup.core.io import write_json_atomic

    write_json_atomic(run_dir / f"{stem}.json", result)
    result["png"] = str(plot_interpolation(result, run_dir / f"{stem}.png"))
    return result


def plot_interpolation(result: dict, out: Path) -> Path:
    """Accuracy against λ, as :func:`interpolate` measured it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adaptsoup.core.io import atomic_path

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(result["lambda"], result["accuracy"], marker="o")
    ax.set_xlabel(f"λ  (0 = {result['a']}, 1 = {result['b']})")
    ax.set_ylabel(f"top-1 on {Path(result['eval']).name} (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return out
