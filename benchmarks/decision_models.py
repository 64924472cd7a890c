"""The models and logits of the deploy-decision benchmark (:mod:`adaptsoup_bench.decision`): a finished
``bench c10c --protocol pretrained`` configuration, the candidates made from its runs (task-vector soups at
each scale, and with Self-Seasoned scales), every model's logits on the validation, target and evaluation
images (cached), and the validation images themselves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptsoup.core.evaluation import run_model
from adaptsoup.core.models import load_model
from adaptsoup_bench.decision_scoring import DEPLOYED


@dataclass
class BenchRun:
    """A ``bench c10c --protocol pretrained`` configuration and what its adapt runs made."""

    cfg: object  # adaptsoup_bench.shift.BenchConfig
    data: object  # its ShiftData
    run: Path  # the self run directory (Self-Soup, its inter-trained encoders, the vanilla ingredients)
    cont: Path | None  # the continued-SSL run (MAE on source images), if the configuration made it
    stock: Path
    pretrained: Path
    split: dict  # data.notes["split"]: which test images are corrupted, which clean


def open_bench_run(args: argparse.Namespace) -> BenchRun:
    """From a finished result JSON (``--result``) or from the configuration alone (``--bench-config``: its adapt
    runs must be complete; the bench's own evaluation is not needed, this benchmark runs every model itself)."""
    from adaptsoup.errors import AdaptsoupError
    from adaptsoup_bench.shift import BenchConfig, bench_work_dir, prepare_c10c, pretrained_path

    settings = json.loads(Path(args.result or args.bench_config).read_text())
    # --bench-config: the settings themselves, or an earlier decision result that recorded them (``bench_config``)
    cfg = BenchConfig(**(settings["config"] if args.result else settings.get("bench_config", settings)))
    if cfg.protocol != "pretrained":
        raise AdaptsoupError("the decision benchmark needs a --protocol pretrained configuration (its task-vector soups)")
    data = prepare_c10c(cfg, log=print)
    runs = bench_work_dir(cfg, "c10c") / "runs"

    def complete(run: Path) -> bool:
        manifest = run / "manifest.json"
        return manifest.is_file() and json.loads(manifest.read_text()).get("status") == "complete"

    if not complete(runs / "self"):
        raise AdaptsoupError(f"{runs / 'self'} is not a complete adapt run: run the bench configuration first")
    return BenchRun(cfg, data, runs / "self", runs / "cont_ssl" if complete(runs / "cont_ssl") else None, Path(data.stock),
                    pretrained_path(cfg), data.notes["split"])


SELF_SEASONED = "task_vector_soup_self_seasoned"


def tv_name(scale: float) -> str:
    return f"task_vector_soup_x{scale:g}"


def bench_models(bench: BenchRun, tv_candidates: list[str], work: Path) -> dict[str, Path]:
    """Every model by name: the deployed model, the task-vector candidates (written here), the fine-tuned soups,
    the source-MAE control and the ingredients (these three only join ALine's pool)."""
    from adaptsoup_bench.shift import inter_encoders, write_task_vector_soup

    run, stock, pretrained = bench.run, bench.stock, bench.pretrained
    models = {DEPLOYED: stock}
    for name in tv_candidates:
        path = work / "models" / f"{name}.safetensors"
        if not path.is_file():
            if name == SELF_SEASONED:
                self_seasoned_task_vectors(bench, path, work)
            else:
                write_task_vector_soup(path, stock, pretrained, inter_encoders(run), float(name.rsplit("_x", 1)[1]))
        models[name] = path
    models.update({"supervised_soup": run / "soups" / "supervised_soup.safetensors", "self_soup_target": run / "soup.safetensors"})
    if bench.cont is not None:
        control = work / "models" / "cont_ssl_task_vector_soup_x1.safetensors"
        if not control.is_file():
            write_task_vector_soup(control, stock, pretrained, inter_encoders(bench.cont), 1.0)
        models["cont_ssl_task_vector_soup_x1"] = control
    for ingredient in sorted((run / "ingredients").glob("*.safetensors")):
        models[f"ingredient:{ingredient.stem}"] = ingredient
    return models


def self_seasoned_task_vectors(bench: BenchRun, out: Path, work: Path) -> Path:
    """``mix --method self-season-tv`` on the deployed model plus each inter-training's task vector, learned on the
    pooled unlabeled target images with the bench's Self-Seasoning budget."""
    from adaptsoup.core.checkpoint import save_checkpoint
    from adaptsoup.core.data import load_folder
    from adaptsoup.core.models import model_meta
    from adaptsoup.soup import methods
    from adaptsoup.soup.methods.task_vector_season import TaskVectorSeasonOptions
    from adaptsoup.soup.registry import MixContext
    from adaptsoup_bench.shift import inter_encoders, write_task_vector_soup

    cfg = bench.cfg
    singles = [write_task_vector_soup(work / "models" / f"task_vector_{enc.stem}.safetensors", bench.stock, bench.pretrained, [enc], 1.0)
               for enc in inter_encoders(bench.run)]
    target = load_folder(bench.data.target, bench.data.preprocess)
    options = TaskVectorSeasonOptions(epochs=cfg.self_season_epochs, subset=cfg.self_season_subset, seed=cfg.seed, bf16=cfg.bf16)
    result = methods.get("self-season-tv")(MixContext(paths=singles, names=[p.stem for p in singles], stock_path=bench.stock,
                                                      target=target, log=print), options)
    meta = dataclasses.replace(model_meta(load_model(None, bench.stock)),
                               provenance={"made_by": "adaptsoup_bench.decision", "method": "self-season-tv", "scales": result.coefficients,
                                           "info": {k: v for k, v in result.info.items() if k != "initial_geometry"}})
    return save_checkpoint(out, result.state_dict, meta)


def cached_logits(name: str, path: Path, sets: dict, pre, cache: Path, log) -> dict[str, torch.Tensor]:
    """``{set: logits}`` of one model, computed once and kept in ``cache`` (loaded with weights_only)."""
    file = cache / (name.replace(":", "_") + ".pt")
    if file.is_file():
        stored = torch.load(file, weights_only=True)
        if set(stored) == set(sets):
            return stored
    t0 = time.perf_counter()
    model = load_model(None, path)
    logits = {key: run_model(model, images, pre, batch_size=500).logits.float() for key, images in sets.items()}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    torch.save(logits, tmp)
    tmp.replace(file)
    log(f"logits of {name}: {sum(len(v) for v in sets.values())} images in {time.perf_counter() - t0:.0f}s")
    return logits


def validation_images(bench: BenchRun):
    """Clean images of the split that are not the originals of any corrupted image (files are named by test index)."""
    corrupted = set(bench.split["corrupted_indices"])
    clean = bench.data.evals["clean"]
    keep = [i for i, p in enumerate(clean.paths) if int(Path(p).stem) not in corrupted]
    return clean.subset(keep)
