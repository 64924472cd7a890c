"""The data-driven mixing methods, registered by name: self-season, season, greedy and best."""

from __future__ import annotations

import math

import torch

from adaptsoup.core.data import Preprocess
from adaptsoup.errors import AdaptsoupError
from adaptsoup.soup.mixing import MixContext, MixResult, register_mixer
from adaptsoup.core.models import class_names, load_model
from adaptsoup.core.progress import NullProgress
from adaptsoup.soup.seasoning import Scorer, SelfSeasonConfig, StackedIngredients, greedy, score_each, season, self_season


def _model_and_stack(ctx: MixContext):
    model = load_model(None, ctx.paths[0]).eval()
    return model, StackedIngredients(ctx.paths, device=ctx.options.device), Preprocess.for_model(model)


def _scorer(ctx: MixContext, model, pre, default: str = "auto") -> Scorer:
    if ctx.labeled is None:
        raise AdaptsoupError("this method needs a few labels: pass --labeled DIR (a class_name/<image> folder)")
    opts = ctx.options
    matches = list(ctx.labeled.class_names) == class_names(model)
    if opts.score == "classifier" and not matches:
        raise AdaptsoupError("--score classifier needs the labeled folder's classes to be the model's classes")
    score = default if opts.score == "auto" else opts.score
    use_classifier = matches if score == "auto" else score == "classifier"
    return Scorer(model, ctx.labeled, pre, use_classifier, k=opts.k, split=opts.split, seed=opts.seed)


@register_mixer("self-season", needs="target")
def mix_self_season(ctx: MixContext) -> MixResult:
    """Self-Seasoning: mixture coefficients learned without labels (kNN-entropy of target embeddings)."""
    if ctx.target is None:
        raise AdaptsoupError("self-season needs unlabeled target images (--target DIR)")
    model, stack, pre = _model_and_stack(ctx)
    o = ctx.options
    cfg = SelfSeasonConfig(epochs=o.epochs, subset=o.subset, batch_size=o.batch_size, lr=o.lr, min_lr=o.min_lr,
                           k=o.k, temperature=o.temperature, center=o.center, seed=o.seed, bf16=o.bf16)
    progress = ctx.progress or NullProgress()
    task = progress.add_task("self-season", total=None)

    def on_step(step: int, total: int, loss: float) -> None:
        progress.update(task, total=total, completed=step, info=f"loss {loss:.4f}")

    res = self_season(model, stack, ctx.target, pre, cfg, on_step=on_step)
    progress.remove_task(task)
    ctx.log(f"self-season: kNN entropy {res.initial_loss:.4f} -> {res.losses[-1]:.4f} over {res.steps} steps")
    ceiling = math.log(min(cfg.k, min(cfg.batch_size, cfg.subset or len(ctx.target), len(ctx.target)) - 1))
    flat = res.initial_loss > ceiling - 1e-3
    if flat:
        ctx.log(f"self-season: warning: the loss started within 1e-3 of its maximum ln k = {ceiling:.4f}: the embeddings' "
                "cosines are all alike, so it carries almost no signal" + ("" if cfg.center else "; try --center"))
    return MixResult(stack.state_dict(torch.tensor(res.coefficients)), res.coefficients, {
        "initial_loss": res.initial_loss, "loss_ceiling": ceiling, "flat_at_start": flat, "initial_geometry": res.geometry,
        "epoch_losses": res.losses, "mixture_logits": res.logits, "steps": res.steps,
        "stacked_bytes": stack.nbytes(), "config": cfg.__dict__,
    })


def self_season_summary(info: dict) -> dict:
    """What a report shows of a self-season run: start and end loss, the ceiling, flatness, the start's geometry."""
    return {"initial_loss": info["initial_loss"], "final_loss": info["epoch_losses"][-1], "loss_ceiling": info["loss_ceiling"],
            "flat_at_start": info["flat_at_start"], **info["initial_geometry"]}


@register_mixer("season", needs="labels")
def mix_season(ctx: MixContext) -> MixResult:
    """Seasoning: the best of Dirichlet(1) samples (+ uniform, one-hots) by held-out k-NN accuracy."""
    model, stack, pre = _model_and_stack(ctx)
    o = ctx.options
    scorer = _scorer(ctx, model, pre, default="knn")  # k-NN unless asked otherwise: works without a task classifier
    progress = ctx.progress or NullProgress()
    task = progress.add_task("season", total=o.samples + 1 + stack.count)
    coefficients, score, tried = season(stack, scorer, o.samples, o.seed, on_step=lambda i, n: progress.update(task, completed=i))
    progress.remove_task(task)
    ctx.log(f"season: best held-out {scorer.kind} accuracy {score:.2f}% among {tried} coefficient vectors")
    return MixResult(stack.state_dict(torch.tensor(coefficients)), coefficients, {"heldout_score": score, "scorer": scorer.kind, "candidates": tried})


@register_mixer("greedy", needs="labels")
def mix_greedy(ctx: MixContext) -> MixResult:
    """Greedy soup: add ingredients (best first) while held-out accuracy rises."""
    model, stack, pre = _model_and_stack(ctx)
    scorer = _scorer(ctx, model, pre)
    coefficients, chosen, individual, trail = greedy(stack, scorer, ctx.options.greedy_tie)
    ctx.log(f"greedy: kept {len(chosen)} of {stack.count} ingredients ({', '.join(ctx.names[i] for i in chosen)})")
    return MixResult(stack.state_dict(torch.tensor(coefficients)), coefficients, {
        "scorer": scorer.kind, "chosen": [ctx.names[i] for i in chosen], "individual_scores": individual,
        "trail": [{**t, "ingredient": ctx.names[t["ingredient"]]} for t in trail], "heldout_score": [t["score"] for t in trail if t["kept"]][-1],
    })


@register_mixer("best", needs="labels")
def mix_best(ctx: MixContext) -> MixResult:
    """The single best ingredient by held-out accuracy: the baseline every soup must beat."""
    model, stack, pre = _model_and_stack(ctx)
    scorer = _scorer(ctx, model, pre)
    scores = score_each(stack, scorer)
    best = max(range(stack.count), key=lambda i: scores[i])
    coefficients = [1.0 if i == best else 0.0 for i in range(stack.count)]
    ctx.log(f"best: {ctx.names[best]} ({scorer.kind} held-out accuracy {scores[best]:.2f}%)")
    return MixResult(stack.state_dict(torch.tensor(coefficients)), coefficients, {"scorer": scorer.kind, "chosen": ctx.names[best], "individual_scores": scores})
