"""Self-Seasoning (Self-Soupervision §3.3): mixture coefficients learned without labels.

Learn M mixture logits ℓ (from 0) so that the mixed model θ(softmax(ℓ))'s pre-logits embeddings of
target images have confident in-batch nearest neighbours: minimise the k-NN entropy (k = 16, T = 0.07)
by AdamW with a cosine learning rate.  As the authors' ``self_seasoning.py`` does, the coefficients kept
are those at the end of the epoch with the lowest mean loss; the last epoch's are recorded beside them.

Memory: the loss couples a batch only through its embeddings, so the gradient is computed by gradient
caching (:mod:`adaptsoup.soup.grad_cache`), ``chunk_size`` images at a time: the activation memory is one
chunk's whatever the batch (the paper's batch is 256), for one extra forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from adaptsoup.core.data import ImageSet, Preprocess
from adaptsoup.core.progress import NullProgress
from adaptsoup.errors import AdaptsoupError
from adaptsoup.soup.checks import SoupError
from adaptsoup.soup.grad_cache import ChunkedEmbedding, cached_embeddings
from adaptsoup.soup.knn import KNN_K, KNN_TEMPERATURE, embedding_geometry, knn_entropy
from adaptsoup.soup.registry import MixContext, MixResult, register
from adaptsoup.soup.stacked import PreLogits, StackedIngredients, open_stack

StepCallback = Callable[[int, int, float], None]  # (step, total steps, loss)


@dataclass
class SelfSeasonOptions:
    epochs: int = 100
    subset: int = 0  # 0: all target images; else a seeded random subset of this size
    batch_size: int = 256  # the in-batch neighbours
    lr: float = 0.1
    min_lr: float = 0.01
    weight_decay: float = 0.0
    k: int = KNN_K
    temperature: float = KNN_TEMPERATURE
    center: bool = False  # subtract the batch mean of the embeddings first (not in the paper; see knn_entropy)
    seed: int = 0
    bf16: bool = False  # run the mixed model under bf16 autocast
    chunk_size: int = 32  # images per forward pass with a graph (gradient caching); 0: the whole batch at once


@dataclass
class Descent:
    """The mixture logits' path: the best epoch's (lowest mean loss) and the last epoch's logits."""

    best_logits: torch.Tensor
    last_logits: torch.Tensor
    epoch_losses: list[float]
    best_epoch: int  # index into epoch_losses
    steps: int


def descend(count: int, n: int, options: SelfSeasonOptions, batch_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
            gen: torch.Generator, device: torch.device | str = "cpu", on_step: StepCallback | None = None) -> Descent:
    """Minimise ``batch_loss(logits, batch_indices)`` over ``count`` logits from 0, in epochs over ``n`` items.

    Each epoch visits ``n // batch`` seeded random batches; AdamW with a cosine schedule from ``lr`` to
    ``min_lr`` over all steps.  Keeps the logits at the end of the epoch with the lowest mean loss.
    """
    if options.epochs < 1:
        raise SoupError(f"self-season needs at least 1 epoch, got {options.epochs}")
    batch = min(options.batch_size, n)
    per_epoch = max(1, n // batch)
    total = options.epochs * per_epoch
    logits = torch.zeros(count, device=device, requires_grad=True)
    opt = torch.optim.AdamW([logits], lr=options.lr, weight_decay=options.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total), eta_min=options.min_lr)
    epoch_losses: list[float] = []
    best_epoch, best_logits, step = 0, logits.detach().clone(), 0
    for epoch in range(options.epochs):
        order = torch.randperm(n, generator=gen)
        batch_losses = []
        for b in range(per_epoch):
            loss = batch_loss(logits, order[b * batch : (b + 1) * batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            batch_losses.append(loss.detach().item())
            step += 1
            if on_step is not None:
                on_step(step, total, batch_losses[-1])
        epoch_losses.append(sum(batch_losses) / len(batch_losses))
        if epoch == 0 or epoch_losses[-1] < epoch_losses[best_epoch]:
            best_epoch, best_logits = epoch, logits.detach().clone()
    return Descent(best_logits.cpu(), logits.detach().cpu(), epoch_losses, best_epoch, step)


@dataclass
class SelfSeasonResult:
    coefficients: list[float]  # softmax of the best epoch's logits
    logits: list[float]
    losses: list[float]  # mean loss per epoch
    best_epoch: int  # index into losses
    last_coefficients: list[float]  # softmax of the last epoch's logits
    initial_loss: float
    steps: int
    geometry: dict[str, float] = field(default_factory=dict)  # of a probe batch's embeddings, before any step


def self_season(model: nn.Module, stack: StackedIngredients, target: ImageSet, pre: Preprocess, options: SelfSeasonOptions,
                on_step: StepCallback | None = None, coefficients_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
                parameters: int | None = None) -> SelfSeasonResult:
    """Learn mixture coefficients α = softmax(ℓ) minimising the kNN entropy of θ(α)'s embeddings of ``target``.

    ``coefficients_of`` maps the ``parameters`` learned (from 0) to the stack's coefficients instead of the
    softmax (the task-vector parametrisation of :mod:`.task_vector_season`)."""
    coefficients_of = coefficients_of or (lambda logits: torch.softmax(logits, dim=0))
    parameters = stack.count if parameters is None else parameters
    gen = torch.Generator().manual_seed(options.seed)
    if options.subset and options.subset < len(target):
        target = target.subset(torch.randperm(len(target), generator=gen)[: options.subset].sort().values)
    n = len(target)
    if n < 2:
        raise SoupError("self-seasoning needs at least 2 target images")
    module = PreLogits(model).eval().to(stack.device)
    for p in module.parameters():
        p.requires_grad_(False)

    def mix_params(logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ(softmax(ℓ)), keyed for ``module`` (differentiable in ℓ)."""
        return {"model." + k: v for k, v in stack.mix(coefficients_of(logits)).items()}

    def embed_chunk(params: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        """The pre-logits embeddings of the target images ``idx`` under ``params``."""
        x = pre.normalize(target.images[idx]).to(stack.device, non_blocking=True)
        with torch.autocast(stack.device.type, dtype=torch.bfloat16, enabled=options.bf16):
            return functional_call(module, params, (x,)).float()

    how = ChunkedEmbedding(mix_params, embed_chunk, chunk=options.chunk_size or n)

    def embed(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return cached_embeddings(logits, idx, how)

    def batch_loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return knn_entropy(embed(logits, idx), options.k, options.temperature, options.center)

    with torch.no_grad():  # the starting point, on a seeded random batch (the target is stored in folder order)
        probe = torch.randperm(n, generator=torch.Generator().manual_seed(options.seed + 1))[: min(options.batch_size, n)]
        z = embed(torch.zeros(parameters, device=stack.device), probe)
        initial = float(knn_entropy(z, options.k, options.temperature, options.center))
        geometry = embedding_geometry(z, options.k, options.temperature, options.center)
    path = descend(parameters, n, options, batch_loss, gen, stack.device, on_step)
    return SelfSeasonResult(
        coefficients=coefficients_of(path.best_logits).tolist(), logits=path.best_logits.tolist(), losses=path.epoch_losses,
        best_epoch=path.best_epoch, last_coefficients=coefficients_of(path.last_logits).tolist(),
        initial_loss=initial, steps=path.steps, geometry=geometry,
    )


def loss_ceiling(options: SelfSeasonOptions, target_images: int) -> float:
    """ln k' with k' the neighbours a batch really has: the kNN entropy's maximum (all neighbours alike)."""
    batch = min(options.batch_size, options.subset or target_images, target_images)
    return math.log(min(options.k, batch - 1))


@register("self-season", SelfSeasonOptions, needs="target")
def mix_self_season(ctx: MixContext, options: SelfSeasonOptions) -> MixResult:
    """Self-Seasoning: mixture coefficients learned without labels (kNN-entropy of target embeddings)."""
    if ctx.target is None:
        raise AdaptsoupError("self-season needs unlabeled target images (--target DIR)")
    model, stack, pre = open_stack(ctx.paths, ctx.device)
    progress = ctx.progress or NullProgress()
    task = progress.add_task("self-season", total=None)

    def on_step(step: int, total: int, loss: float) -> None:
        progress.update(task, total=total, completed=step, info=f"loss {loss:.4f}")

    res = self_season(model, stack, ctx.target, pre, options, on_step=on_step)
    progress.remove_task(task)
    best = res.losses[res.best_epoch]
    ctx.log(f"self-season: kNN entropy {res.initial_loss:.4f} -> {res.losses[-1]:.4f} over {res.steps} steps; "
            f"kept epoch {res.best_epoch + 1} of {len(res.losses)} (mean loss {best:.4f})")
    ceiling = loss_ceiling(options, len(ctx.target))
    flat = res.initial_loss > ceiling - 1e-3
    if flat:
        ctx.log(f"self-season: warning: the loss started within 1e-3 of its maximum ln k = {ceiling:.4f}: the embeddings' "
                "cosines are all alike, so it carries almost no signal" + ("" if options.center else "; try --center"))
    return MixResult(stack.state_dict(torch.tensor(res.coefficients)), res.coefficients, {
        "initial_loss": res.initial_loss, "loss_ceiling": ceiling, "flat_at_start": flat, "initial_geometry": res.geometry,
        "epoch_losses": res.losses, "best_epoch": res.best_epoch, "best_epoch_loss": best, "mixture_logits": res.logits,
        "last_epoch_coefficients": res.last_coefficients, "steps": res.steps, "stacked_bytes": stack.nbytes(),
    })


def self_season_summary(info: dict) -> dict:
    """What a report shows of a self-season run: start, last and kept losses, the ceiling, flatness, the start's geometry."""
    return {"initial_loss": info["initial_loss"], "final_loss": info["epoch_losses"][-1], "best_epoch": info.get("best_epoch"),
            "best_epoch_loss": info.get("best_epoch_loss"), "loss_ceiling": info["loss_ceiling"],
            "flat_at_start": info["flat_at_start"], **info["initial_geometry"]}
