"""Label-free soups for new tasks (the paper's Table 3).

For each task, SSL-only ingredients are inter-trained from the stock on the task's training images without
labels (MAE; MMCR global-only and global+local; MoCo v3 with τ = 0.1 and τ = 1.0), and mixed *with the
stock* by: uniform, the best ingredient (by labeled k-NN accuracy), seasoning (labels) and Self-Seasoning
(no labels; as the paper defines it, and on batch-centred embeddings).  No classifier is trained: every soup is scored by k-NN accuracy (k = 16), retrieving among
the task's labeled training images for each test image.

:func:`prepare_cifar_tasks` builds the tasks this machine can make without downloads: CIFAR-10 itself, the
embedded handwritten digits, and the four CIFAR-10-C corruption families (noise, blur, weather, digital) as
separate tasks, each a labeled ``train`` / ``test`` pair of ImageFolder trees and a few-label subset of
``train`` (``labeled``) for the methods that need labels.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from adaptsoup.pipeline.adapt import run_adapt
from adaptsoup.core.data import Preprocess, default_cache_dir, load_folder
from adaptsoup.core.evaluation import run_model
from adaptsoup.errors import AdaptsoupError
from adaptsoup.core.io import atomic_path, write_json_atomic, write_text_atomic
from adaptsoup.core.manifest import config_tag, environment, file_digest, provenance_lines, source_state
from adaptsoup.soup.run import MixRequest, mix_run
from adaptsoup.core.models import load_model
from adaptsoup.core.progress import NullProgress
from adaptsoup.pipeline.recipe import AdaptConfig, InterTrainConfig, MMCRGrid, MoCoV3Grid, with_overrides
from adaptsoup.soup.knn import knn_predict
from adaptsoup.soup.methods.best import BestOptions
from adaptsoup.soup.methods.season import SeasonOptions
from adaptsoup.soup.methods.self_season import SelfSeasonOptions

METHODS = ("uniform", "best", "season", "self-season", "self-season-centered")
CENTERED = "self-season-centered"  # Self-Seasoning on batch-centred embeddings (mix --center), beside the paper's


@dataclass(frozen=True)
class Task:
    """A new task: labeled ``train`` (SSL images and the k-NN bank), ``test``, and the few labels for seasoning."""

    train: str
    test: str
    labeled: str | None = None  # default: ``train``


@dataclass
class LabelFreeConfig:
    mode: str = "quick"
    lr: float = 2e-5  # the middle of the paper's MAE inter-training grid (1e-5 … 4e-5), as bench families
    steps: int = 100
    batch_size: int = 64
    mmcr_lambdas: list[float] = field(default_factory=lambda: [0.0, 0.1])
    mmcr_views: int = 2  # views per image (the MMCR paper uses more; each view costs a forward and backward)
    mocov3_temperatures: list[float] = field(default_factory=lambda: [0.1, 1.0])
    k: int = 16
    samples: int = 100
    self_season_epochs: int = 5
    self_season_subset: int = 2048
    max_train_images: int = 0
    seed: int = 0
    bf16: bool = True
    device: str = "cpu"
    # the preset tasks' sizes (prepare_cifar_tasks)
    train_images: int = 2000
    test_images: int = 1000
    labeled_images: int = 500

    @classmethod
    def for_mode(cls, mode: str, **overrides) -> "LabelFreeConfig":
        """quick: short inter-training, 2-view MMCR, 100 seasoning samples; full: 4x the steps, 4 views, larger tasks."""
        if mode == "quick":
            cfg = cls(mode="quick")
        elif mode == "full":
            cfg = cls(mode="full", steps=400, mmcr_views=4, samples=300, self_season_epochs=10, train_images=5000,
                      test_images=2000, labeled_images=1000)
        else:
            raise AdaptsoupError(f"--mode must be quick or full, got {mode!r}")
        return with_overrides(cfg, overrides)


@torch.no_grad()
def knn_transfer_accuracy(checkpoint: Path, train, test, pre: Preprocess, k: int, device: str = "cpu") -> float:
    """k-NN top-1 (percent): each test image votes among its k nearest labeled training images."""
    model = load_model(None, checkpoint)
    bank = run_model(model, train, pre, want_logits=False, want_features=True, device=device).features
    query = run_model(model, test, pre, want_logits=False, want_features=True, device=device).features
    num_classes = len(train.class_names) or int(train.labels.max()) + 1
    pred = knn_predict(query, bank, train.labels, num_classes, k)
    return float((pred == test.labels).float().mean() * 100)


def run_label_free(stock: str, decoder: str | None, tasks: dict[str, Task | tuple[str, str]], cfg: LabelFreeConfig, out: str,
                   work: str | None = None, *, command: str = "", progress=None, log: Callable[[str], None] = print) -> dict:
    """Inter-train, mix and score label-free soups on each ``name -> Task`` (or ``(train_dir, test_dir)``)."""
    progress = progress or NullProgress()
    t_start, source = time.perf_counter(), source_state()
    work_dir = Path(work or default_cache_dir() / "bench" / "label-free")
    results: dict[str, dict] = {}
    pre = Preprocess.for_model(load_model(None, stock))
    stock_digest = file_digest(stock)
    for name, task in tasks.items():
        task = task if isinstance(task, Task) else Task(*task)
        train_dir, test_dir = task.train, task.test
        t0 = time.perf_counter()
        tag = config_tag(cfg, stock_digest, decoder, task)  # other settings, stock or data: another run folder
        inter = InterTrainConfig(ssl=["mae", "mmcr", "mocov3"], lrs=[cfg.lr], steps=[cfg.steps], batch_size=cfg.batch_size,
                                 mmcr=MMCRGrid(lambdas=list(cfg.mmcr_lambdas), views=cfg.mmcr_views), mocov3=MoCoV3Grid(temperatures=list(cfg.mocov3_temperatures)))
        run = run_adapt(AdaptConfig(model=stock, stock=decoder, target=train_dir, out=str(work_dir / "runs" / f"{name}-{tag}"), finetune_back=False,
                                    max_target_images=cfg.max_train_images, seed=cfg.seed, precision="bf16" if cfg.bf16 else "fp32", device=cfg.device, inter=inter),
                        progress=progress, echo=log, command=command)
        self_season = SelfSeasonOptions(epochs=cfg.self_season_epochs, subset=cfg.self_season_subset, k=cfg.k, seed=cfg.seed, bf16=cfg.bf16)
        options = {"self-season": self_season, "season": SeasonOptions(score="knn", k=cfg.k, seed=cfg.seed, samples=cfg.samples),
                   "best": BestOptions(score="knn", k=cfg.k, seed=cfg.seed)}
        mix_run(MixRequest(run_dir=run.run_dir, methods=[m for m in METHODS if m != CENTERED], labeled=task.labeled or train_dir,
                           evals=[], options=options, include_stock=True, device=cfg.device), progress=progress, log=log)
        mixes = mix_run(MixRequest(run_dir=run.run_dir, methods=["self-season"], evals=[], save_as=CENTERED, include_stock=True, device=cfg.device,
                                   options={"self-season": dataclasses.replace(self_season, center=True)}), progress=progress, log=log)
        train = load_folder(train_dir, pre, labeled=True)
        test = load_folder(test_dir, pre, labeled=True, class_names=train.class_names)
        scores = {"stock": knn_transfer_accuracy(Path(stock), train, test, pre, cfg.k, cfg.device)}
        for method in METHODS:
            scores[method] = knn_transfer_accuracy(run.run_dir / mixes[method]["path"], train, test, pre, cfg.k, cfg.device)
        results[name] = {
            "train": train_dir, "test": test_dir, "labeled": task.labeled or train_dir,
            "train_images": len(train), "test_images": len(test), "top1_knn": scores,
            "mix_wall_s": {m: mixes[m]["wall_s"] for m in METHODS},
            "coefficients": {m: mixes[m]["coefficients"] for m in METHODS}, "wall_s": round(time.perf_counter() - t0, 1),
        }
        log(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    env = environment()
    result = {"benchmark": "label-free", "command": command, "commit": source["commit"], "source_dirty": source["dirty"], "machine": {k: v for k, v in env.items() if k != "packages"},
              "config": dataclasses.asdict(cfg), "wall_time_s": round(time.perf_counter() - t_start, 1), "tasks": results}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / f"label_free_{cfg.mode}.json", result)
    write_text_atomic(out_dir / f"label_free_{cfg.mode}.md", markdown(result))
    return result


# --------------------------------------------------------------------------------------------------------------
# The tasks this machine can build: CIFAR-10, the digits, and CIFAR-10-C corruption families


def prepare_cifar_tasks(root: str | Path, cifar: str | Path | None = None, *, train_images: int = 2000, test_images: int = 1000,
                        labeled_images: int = 500, severity: int = 5, families: tuple[str, ...] | None = None, seed: int = 0,
                        progress=None) -> dict[str, Task]:
    """Write the label-free tasks under ``root`` (idempotent) and return them by name.

    * ``cifar10``: ``train_images`` CIFAR-10 train images and ``test_images`` test images (seeded subsets);
    * ``digits``: the embedded handwritten digits (its fixed source / held-out split, clean);
    * ``c10c-<family>``: ``train_images`` + ``test_images`` CIFAR-10 *test* images (a seeded split), each split
      cycling through the family's corruptions at ``severity`` with a per-image seed, so both hold every member.

    ``labeled`` is the first ``labeled_images`` of each task's train set in a seeded order (the few labels).
    """
    from PIL import Image

    from adaptsoup_bench.corruptions import FAMILIES, corrupt_batch
    from adaptsoup_bench.datasets import CIFAR10_CLASSES, require_cifar10
    from adaptsoup_bench.digits import DIGIT_CLASSES, digits_arrays, split_indices

    root = Path(root)
    progress = progress or NullProgress()
    families = tuple(FAMILIES) if families is None else families
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise AdaptsoupError(f"unknown corruption famil(ies) {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    tasks: dict[str, Task] = {}
    spec = f"train={train_images} test={test_images} labeled={labeled_images} seed={seed} severity={severity} layout=2"

    def write(task_root: Path, images: np.ndarray, labels: np.ndarray, ids: np.ndarray, classes: list[str], split: str) -> None:
        for img, label, i in zip(images, labels, ids):
            path = task_root / split / classes[int(label)] / f"{int(i):05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                Image.fromarray(img).save(tmp, format="PNG")

    def build(name: str, make: Callable[[], tuple]) -> None:
        """Write task ``name`` from ``make() -> (train (x, y, ids), test (x, y, ids), classes)`` unless it is there."""
        task_root = root / name
        marker = task_root / ".adaptsoup-task"
        if not (marker.is_file() and marker.read_text() == spec):
            marker.unlink(missing_ok=True)
            for split in ("train", "test", "labeled"):  # a different request: nothing of the old tree may remain
                shutil.rmtree(task_root / split, ignore_errors=True)
            (x_train, y_train, id_train), (x_test, y_test, id_test), classes = make()
            write(task_root, x_train, y_train, id_train, classes, "train")
            write(task_root, x_test, y_test, id_test, classes, "test")
            few = np.sort(np.random.default_rng(seed + 2).permutation(len(id_train))[:labeled_images])
            write(task_root, x_train[few], y_train[few], id_train[few], classes, "labeled")
            marker.write_text(spec)
        tasks[name] = Task(str(task_root / "train"), str(task_root / "test"), str(task_root / "labeled"))

    steps = 2 + len(families)
    bar = progress.add_task("prepare label-free tasks", total=steps)
    cifar_root = require_cifar10(cifar)
    loaded: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def cifar_split(split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in loaded:
            loaded[split] = _uint8_folder(cifar_root / split, CIFAR10_CLASSES)
        return loaded[split]

    def make_cifar10():
        (x_train, y_train), (x_test, y_test) = cifar_split("train"), cifar_split("test")
        rng = np.random.default_rng(seed)
        tr = np.sort(rng.permutation(len(y_train))[:train_images])
        te = np.sort(rng.permutation(len(y_test))[:test_images])
        return (x_train[tr], y_train[tr], tr), (x_test[te], y_test[te], te), CIFAR10_CLASSES

    def make_digits():
        digits, labels = digits_arrays()
        src, held = split_indices(len(labels))
        return (digits[src], labels[src], src), (digits[held], labels[held], held), DIGIT_CLASSES

    def make_family(members: tuple[str, ...]):
        # train_images + test_images CIFAR-10 *test* images (never seen by the stock), split by a seeded order;
        # within each split image j gets members[j % len(members)], so both splits hold every member equally.
        x_all, y_all = cifar_split("test")
        pool = np.random.default_rng(seed + 1).permutation(len(y_all))[: train_images + test_images]
        parts = []
        for ids in (np.sort(pool[:train_images]), np.sort(pool[train_images:])):
            x = np.empty_like(x_all[ids])
            for m, corruption in enumerate(members):
                at = np.arange(m, len(ids), len(members))
                x[at] = corrupt_batch(x_all[ids[at]], corruption, severity, indices=ids[at])
            parts.append((x, y_all[ids], ids))
        return parts[0], parts[1], CIFAR10_CLASSES

    build("cifar10", make_cifar10)
    progress.advance(bar)
    build("digits", make_digits)
    progress.advance(bar)
    for family in families:
        build(f"c10c-{family}", lambda members=FAMILIES[family]: make_family(members))
        progress.advance(bar)
    progress.remove_task(bar)
    return tasks


def _uint8_folder(folder: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A labeled folder as uint8 ``[N, H, W, 3]`` images and int labels (through the decode cache)."""
    images = load_folder(folder, Preprocess(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3), labeled=True, class_names=classes)
    return images.images.permute(0, 2, 3, 1).numpy(), images.labels.numpy()


def markdown(result: dict) -> str:
    cols = ["stock", *METHODS]
    lines = [f"# Label-free soups for new tasks ({result['config']['mode']} mode)", "", *provenance_lines(result), "",
             f"k-NN top-1 (k = {result['config']['k']}) per task:", "", "| task | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in result["tasks"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['top1_knn'][c]:.2f}" for c in cols) + " |")
    lines += ["", "Mixture coefficients:", ""]
    for name, r in result["tasks"].items():
        for method, coeffs in r["coefficients"].items():
            lines.append(f"- {name} / {method}: " + ", ".join(f"{k} {v:.2f}" for k, v in coeffs.items()))
    return "\n".join(lines) + "\n"
