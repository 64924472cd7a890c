"""Self-Seasoning over task vectors: per-ingredient scales of the task vectors learned without labels
(the AdaMerging idea, Yang et al., ICLR 2024, with Self-Seasoning's loss instead of AdaMerging's entropy).

    θ(λ) = θ_deployed + Σ_i λ_i (θ_i − θ_deployed),    λ = 1/M + δ,  δ learned from 0

Unlike Self-Seasoning's convex weights (a softmax), the λ_i are free: they need not sum to one, so the mix
can move further along the task vectors than any ingredient, or back towards the deployed model.  At δ = 0
it is the uniform soup.  Under ``adapt --preset task-vector`` each ingredient is the deployed model plus one
inter-training's task vector, so this learns the scale of each.  The loss, the optimiser and the epoch kept
are Self-Seasoning's (:mod:`.self_season`): the kNN entropy (k = 16, T = 0.07) of the mixed model's
pre-logits embeddings of target images, AdamW with a cosine schedule, the epoch of lowest mean loss.

The stack holds the deployed model and the M ingredients; θ(λ) is the stack's linear mix with
coefficients (1 − Σλ, λ_1 … λ_M), accumulated in float64 when the soup is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptsoup.core.progress import NullProgress
from adaptsoup.errors import AdaptsoupError
from adaptsoup.soup.methods.self_season import SelfSeasonOptions, loss_ceiling, self_season
from adaptsoup.soup.registry import MixContext, MixResult, register
from adaptsoup.soup.stacked import open_stack


@dataclass
class TaskVectorSeasonOptions(SelfSeasonOptions):
    # The λ are task-vector scales, not logits: steps of 0.1 would move the model by a tenth of a whole task
    # vector at once; AdaMerging's own learning rate is 1e-3.
    lr: float = 0.01
    min_lr: float = 0.001


def task_vector_coefficients(delta: torch.Tensor) -> torch.Tensor:
    """The stack's coefficients (deployed first) for the offsets ``delta`` from the uniform soup: (1 − Σλ, λ), λ = 1/M + δ."""
    lam = delta + 1.0 / delta.numel()
    return torch.cat([(1.0 - lam.sum()).reshape(1), lam])


@register("self-season-tv", TaskVectorSeasonOptions, needs="target")
def mix_task_vector_season(ctx: MixContext, options: TaskVectorSeasonOptions) -> MixResult:
    """Self-Seasoning of task-vector scales: θ_deployed + Σ λ_i (θ_i − θ_deployed), λ learned by kNN entropy (no labels)."""
    if ctx.target is None:
        raise AdaptsoupError("self-season-tv needs unlabeled target images (--target DIR)")
    if ctx.stock_path is None:
        raise AdaptsoupError("self-season-tv needs the deployed model the task vectors start from")
    model, stack, pre = open_stack([ctx.stock_path, *ctx.paths], ctx.device)
    progress = ctx.progress or NullProgress()
    task = progress.add_task("self-season-tv", total=None)

    def on_step(step: int, total: int, loss: float) -> None:
        progress.update(task, total=total, completed=step, info=f"loss {loss:.4f}")

    res = self_season(model, stack, ctx.target, pre, options, on_step=on_step, coefficients_of=task_vector_coefficients,
                      parameters=len(ctx.paths))
    progress.remove_task(task)
    scales = res.coefficients[1:]
    ctx.log(f"self-season-tv: kNN entropy {res.initial_loss:.4f} -> {res.losses[-1]:.4f} over {res.steps} steps; task-vector scales "
            + ", ".join(f"{s:.3f}" for s in scales) + f" (sum {sum(scales):.3f}; uniform soup: {1 / len(scales):.3f} each)")
    ceiling = loss_ceiling(options, len(ctx.target))
    return MixResult(stack.state_dict(torch.tensor(res.coefficients, dtype=torch.float64)), scales, {
        "deployed_coefficient": res.coefficients[0], "initial_loss": res.initial_loss, "loss_ceiling": ceiling,
        "flat_at_start": res.initial_loss > ceiling - 1e-3, "initial_geometry": res.geometry, "epoch_losses": res.losses,
        "best_epoch": res.best_epoch, "best_epoch_loss": res.losses[res.best_epoch], "offsets": res.logits,
        "last_epoch_scales": res.last_coefficients[1:], "steps": res.steps, "stacked_bytes": stack.nbytes(),
    })
