"""The plan of an ``adapt`` run: its M inter-training runs and the ingredients made from them.  Pure
functions of the recipe (and the number of images); where each training run starts is :mod:`.start`.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from adaptsoup.errors import AdaptsoupError
from adaptsoup.pipeline.recipe import AdaptConfig, FineTuneConfig, InterTrainConfig
from adaptsoup.train.optim import steps_for_epochs


@dataclass(frozen=True)
class InterRun:
    """One inter-training run of the grid."""

    name: str
    lr: float
    mask_ratio: float
    decoder_depth: int
    steps: int
    seed: int
    ssl: str = "mae"
    temperature: float | None = None  # MoCo v3
    lam: float | None = None  # MMCR
    batch_size: int = 0  # 0: the config's batch size
    noise: float = 0.0  # parameter-noise multiplier (at ``noise_stage``)
    partition: int | None = None  # index of the source-class partition it is inter-trained on


@dataclass(frozen=True)
class FineTuneRun:
    name: str
    lr: float
    seed: int


@dataclass(frozen=True)
class Ingredient:
    name: str
    kind: str  # "self" (inter-trained then fine-tuned, or inter-trained only) or "vanilla" (fine-tuned only)
    inter: InterRun | None
    finetune: FineTuneRun | None  # None: an inter-trained encoder used as it is (label-free soups)


@dataclass(frozen=True)
class Plan:
    inters: list[InterRun]
    ingredients: list[Ingredient]
    finetunings_per_encoder: int  # N (0 without fine-tuning back)

    def ingredients_of(self, inter: InterRun) -> list[Ingredient]:
        return [ing for ing in self.ingredients if ing.inter == inter]

    def of_kind(self, *kinds: str) -> list[Ingredient]:
        return [ing for ing in self.ingredients if ing.kind in kinds]

    def summary(self, vanilla: int) -> str:
        n = self.finetunings_per_encoder or "no"
        return (f"plan: {len(self.inters)} inter-training run(s) x {n} fine-tuning(s)" + (f" + {vanilla} vanilla" if vanilla else "")
                + f" = {len(self.ingredients)} ingredients")


def plan_run(cfg: AdaptConfig, num_inter_images: int) -> Plan:
    """M inter-training runs x N fine-tunings back (M·N self ingredients) + the vanilla ones; without
    fine-tuning back, the M inter-trained encoders are the ingredients."""
    inters = inter_runs(cfg.inter, num_inter_images)
    if not cfg.finetune_back:
        return Plan(inters, [Ingredient(i.name, "self", i, None) for i in inters], 0)
    fts = finetune_runs(cfg.finetune)
    ingredients = [Ingredient(f"{i.name}-{f.name}", "self", i, f) for i in inters for f in fts]
    for v in range(cfg.vanilla):
        f = fts[v % len(fts)]
        f = dataclasses.replace(f, name=f"ft{v:02d}", seed=f.seed + v // len(fts))
        ingredients.append(Ingredient(f"vanilla-{f.name}", "vanilla", None, f))
    return Plan(inters, ingredients, len(fts))


def inter_runs(cfg: InterTrainConfig, num_images: int) -> list[InterRun]:
    """The grid of each self-supervised loss in ``cfg.ssl``, then crossed with partitions and noise levels."""
    runs: list[InterRun] = []
    for ssl in cfg.ssl:
        for i, params in enumerate(_grid(cfg, ssl)):
            batch = int(params.pop("batch_size", 0) or 0)
            steps = int(params.pop("steps")) or steps_for_epochs(cfg.epochs, num_images, batch or cfg.batch_size)
            runs.append(InterRun(
                name=f"{ssl}{i:02d}", lr=float(params.pop("lr")), mask_ratio=float(params.pop("mask_ratio", 0.0)),
                decoder_depth=int(params.pop("decoder_depth", 0)), steps=steps, seed=int(params.pop("seed")), ssl=ssl,
                temperature=params.get("temperature"), lam=params.get("lam"), batch_size=batch,
            ))
    if cfg.partitions:
        runs = [dataclasses.replace(r, name=f"{r.name}-p{p}", partition=p) for r in runs for p in range(cfg.partitions)]
    if cfg.noise_stage and len(cfg.noise_multipliers) > 1:
        runs = [dataclasses.replace(r, name=f"{r.name}-n{k}", noise=float(m)) for r in runs for k, m in enumerate(cfg.noise_multipliers)]
    elif cfg.noise_stage:
        runs = [dataclasses.replace(r, noise=float(cfg.noise_multipliers[0])) for r in runs]
    return runs


def _grid(cfg: InterTrainConfig, ssl: str) -> list[dict]:
    """The grid points of one self-supervised loss: the shared axes and its own."""
    if ssl == "mae":
        return [dict(lr=lr, mask_ratio=r, decoder_depth=d, steps=st, seed=se)
                for lr, r, d, st, se in itertools.product(cfg.lrs, cfg.mask_ratios, cfg.decoder_depths, cfg.steps, cfg.seeds)]
    if ssl == "mocov3":
        return [dict(lr=lr, temperature=t, batch_size=b, steps=st, seed=se)
                for lr, t, b, st, se in itertools.product(cfg.lrs, cfg.mocov3.temperatures, cfg.mocov3.batch_sizes, cfg.steps, cfg.seeds)]
    if ssl == "mmcr":
        return [dict(lr=lr, lam=lam, steps=st, seed=se) for lr, lam, st, se in itertools.product(cfg.lrs, cfg.mmcr.lambdas, cfg.steps, cfg.seeds)]
    from adaptsoup.ssl.registry import ssl_loss

    ssl_loss(ssl)  # the error that lists the known losses
    raise AdaptsoupError(f"no grid for self-supervised loss {ssl!r}")


def finetune_runs(cfg: FineTuneConfig) -> list[FineTuneRun]:
    """N = learning rates x seeds fine-tunings back per encoder."""
    return [FineTuneRun(f"ft{j:02d}", float(lr), int(seed)) for j, (lr, seed) in enumerate(itertools.product(cfg.lrs, cfg.seeds))]
