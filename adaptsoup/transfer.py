"""Label-free soups for new tasks (the paper's Table 3).

For each task, SSL-only ingredients are inter-trained from the stock on the task's training images without
labels (MAE; MMCR global-only and global+local; MoCo v3 with τ = 0.1 and τ = 1.0), and mixed *with the
stock* by: uniform, the best ingredient (by labeled k-NN accuracy), seasoning (labels) and Self-Seasoning
(no labels).  No classifier is trained: every soup is scored by k-NN accuracy (k = 16), retrieving among
the task's labeled training images for each test image.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .adapt import run_adapt
from .data import Preprocess, default_cache_dir, load_folder
from .evaluation import run_model
from .io import write_json_atomic, write_text_atomic
from .manifest import environment, git_commit
from .mixing import MixOptions
from .mixrun import MixRequest, mix_run
from .models import load_model
from .progress import NullProgress
from .recipe import AdaptConfig, InterTrainConfig, MMCRGrid, MoCoV3Grid
from .seasoning import knn_predict

METHODS = ("uniform", "best", "season", "self-season")


@dataclass
class LabelFreeConfig:
    lr: float = 1e-4
    steps: int = 200
    batch_size: int = 64
    mmcr_lambdas: list[float] = field(default_factory=lambda: [0.0, 0.1])
    mocov3_temperatures: list[float] = field(default_factory=lambda: [0.1, 1.0])
    k: int = 16
    samples: int = 100
    self_season_epochs: int = 5
    self_season_subset: int = 2048
    max_train_images: int = 0
    seed: int = 0
    bf16: bool = True
    device: str = "cpu"


@torch.no_grad()
def knn_transfer_accuracy(checkpoint: Path, train, test, pre: Preprocess, k: int, device: str = "cpu") -> float:
    """k-NN top-1 (percent): each test image votes among its k nearest labeled training images."""
    model = load_model(None, checkpoint)
    bank = run_model(model, train, pre, want_logits=False, want_features=True, device=device).features
    query = run_model(model, test, pre, want_logits=False, want_features=True, device=device).features
    num_classes = len(train.class_names) or int(train.labels.max()) + 1
    pred = knn_predict(query, bank, train.labels, num_classes, k)
    return float((pred == test.labels).float().mean() * 100)


def run_label_free(stock: str, decoder: str | None, tasks: dict[str, tuple[str, str]], cfg: LabelFreeConfig, out: str,
                   work: str | None = None, *, command: str = "", progress=None, log: Callable[[str], None] = print) -> dict:
    """Inter-train, mix and score label-free soups on each ``name -> (train_dir, test_dir)`` task."""
    progress = progress or NullProgress()
    t_start = time.perf_counter()
    work_dir = Path(work or default_cache_dir() / "bench" / "label-free")
    results: dict[str, dict] = {}
    pre = Preprocess.for_model(load_model(None, stock))
    for name, (train_dir, test_dir) in tasks.items():
        t0 = time.perf_counter()
        inter = InterTrainConfig(ssl=["mae", "mmcr", "mocov3"], lrs=[cfg.lr], steps=[cfg.steps], batch_size=cfg.batch_size,
                                 mmcr=MMCRGrid(lambdas=list(cfg.mmcr_lambdas)), mocov3=MoCoV3Grid(temperatures=list(cfg.mocov3_temperatures)))
        run = run_adapt(AdaptConfig(model=stock, stock=decoder, target=train_dir, out=str(work_dir / name), finetune_back=False,
                                    max_target_images=cfg.max_train_images, seed=cfg.seed, bf16=cfg.bf16, device=cfg.device, inter=inter),
                        progress=progress, echo=log, command=command)
        options = MixOptions(epochs=cfg.self_season_epochs, subset=cfg.self_season_subset, k=cfg.k, samples=cfg.samples, score="knn",
                             include_stock=True, seed=cfg.seed, bf16=cfg.bf16)
        mixes = mix_run(MixRequest(run_dir=run.run_dir, methods=list(METHODS), labeled=train_dir, evals=[], options=options),
                        progress=progress, log=log)
        train = load_folder(train_dir, pre, labeled=True)
        test = load_folder(test_dir, pre, labeled=True, class_names=train.class_names)
        scores = {"stock": knn_transfer_accuracy(Path(stock), train, test, pre, cfg.k, cfg.device)}
        for method in METHODS:
            scores[method] = knn_transfer_accuracy(run.run_dir / mixes[method]["path"], train, test, pre, cfg.k, cfg.device)
        results[name] = {
            "train_images": len(train), "test_images": len(test), "top1_knn": scores,
            "coefficients": {m: mixes[m]["coefficients"] for m in METHODS}, "wall_s": round(time.perf_counter() - t0, 1),
        }
        log(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    env = environment()
    result = {"benchmark": "label-free", "command": command, "commit": git_commit(), "machine": {k: v for k, v in env.items() if k != "packages"},
              "config": dataclasses.asdict(cfg), "wall_time_s": round(time.perf_counter() - t_start, 1), "tasks": results}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "label_free.json", result)
    write_text_atomic(out_dir / "label_free.md", markdown(result))
    return result


def markdown(result: dict) -> str:
    cols = ["stock", *METHODS]
    lines = [f"Command: `{result['command']}`; wall time {result['wall_time_s'] / 60:.1f} min", "",
             "k-NN top-1 (k = 16) per task:", "", "| task | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in result["tasks"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['top1_knn'][c]:.2f}" for c in cols) + " |")
    lines += ["", "Mixture coefficients:", ""]
    for name, r in result["tasks"].items():
        for method, coeffs in r["coefficients"].items():
            lines.append(f"- {name} / {method}: " + ", ".join(f"{k} {v:.2f}" for k, v in coeffs.items()))
    return "\n".join(lines) + "\n"
