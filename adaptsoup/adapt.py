"""``adapt``: Self-Soupervision end to end (eq. 1 of the paper).

    soup = 1/(N·M) Σ_j Σ_i FineTune(InterTrain_MAE(stock, target_i), source_j, labels_j)

1. inter-train M copies of the stock with MAE on the unlabeled target images (a grid of learning rate,
   mask ratio, decoder depth, steps, seed); only the encoder is kept;
2. fine-tune each inter-trained encoder back on the labeled source N times with LP-FT;
3. average the M·N ingredients (streaming) into ``soup.safetensors``;
4. optionally add ``vanilla`` supervised ingredients (the stock fine-tuned without inter-training): their
   uniform average is the "supervised soup" baseline.

Two protocols: ``deployed`` (the default) inter-trains and fine-tunes the deployed, already fine-tuned model;
``pretrained`` (``AdaptConfig.pretrained``, the paper's) starts every inter-training and every vanilla
fine-tuning from a pre-trained MAE encoder instead (:func:`initial_model`).

Every artefact is written atomically into the run directory, and every training run checkpoints its state,
so ``resume`` skips what is finished and continues what was cut off.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .checkpoint import read_checkpoint, save_checkpoint
from .data import ImageSet, Preprocess, load_folder
from .errors import AdaptsoupError
from .evaluation import run_model, top1
from .mae import DecoderConfig, MaskedAutoencoder
from .noise import add_parameter_noise, class_partitions, indices_of_classes, name_seed, tensor_stds
from .ssl import MMCR, MoCoV3, multiview_loss
from .manifest import Manifest, environment
from .mixing import stream_weighted_average
from .models import class_names, encoder_state_dict, load_model, load_state_dict_strict, model_arch, model_meta, require_vit
from .progress import NullProgress
from .recipe import AdaptConfig, FineTuneRun, InterRun, finetune_runs, inter_runs, validate
from .training import LinearProbeConfig, TrainConfig, classification_loss, fit_linear_probe, mae_loss, steps_for_epochs, train

SOUP = "soup"
SUPERVISED_SOUP = "supervised_soup"
DEPLOYED = "deployed"


class RunLog:
    """Timestamped lines to ``adapt.log`` in the run directory and to the console."""

    def __init__(self, path: Path, echo: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.echo = echo

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        if self.echo is not None:
            self.echo(line)


@dataclass
class Ingredient:
    name: str
    kind: str  # "self" (inter-trained then fine-tuned, or inter-trained only) or "vanilla" (fine-tuned only)
    inter: InterRun | None
    finetune: FineTuneRun | None  # None: an inter-trained encoder used as it is (label-free soups)

    @property
    def path_name(self) -> str:
        return f"{self.name}.safetensors"


@dataclass
class AdaptResult:
    run_dir: Path
    soup_path: Path
    supervised_soup_path: Path | None
    ingredients: list[Path]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # eval folder -> model -> top-1
    manifest_path: Path | None = None


# --------------------------------------------------------------------------------------------------------------


def plan_ingredients(cfg: AdaptConfig, num_inter_images: int) -> tuple[list[InterRun], list[Ingredient]]:
    inters = inter_runs(cfg.inter, num_inter_images)
    if not cfg.finetune_back:
        return inters, [Ingredient(i.name, "self", i, None) for i in inters]
    fts = finetune_runs(cfg.finetune)
    ingredients = [Ingredient(f"{i.name}-{f.name}", "self", i, f) for i in inters for f in fts]
    for v in range(cfg.vanilla):
        f = fts[v % len(fts)]
        f = dataclasses.replace(f, name=f"ft{v:02d}", seed=f.seed + v // len(fts))
        ingredients.append(Ingredient(f"vanilla-{f.name}", "vanilla", None, f))
    return inters, ingredients


def run_adapt(cfg: AdaptConfig, *, progress=None, echo: Callable[[str], None] | None = print, command: str | None = None,
              on_step: Callable[[str, int], None] | None = None) -> AdaptResult:
    """Run (or resume) an adapt job as configured; returns where everything was written."""
    validate(cfg)
    progress = progress or NullProgress()
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("inter", "ingredients", "state", "soups"):
        (run_dir / sub).mkdir(exist_ok=True)
    log = RunLog(run_dir / "adapt.log", echo)
    manifest = Manifest.load_or_new(run_dir / "manifest.json", kind="adapt")
    manifest.data.update(command=command or " ".join(sys.argv), config=cfg.to_dict(), environment=environment())
    manifest.data.setdefault("timings_s", {})
    manifest.data.setdefault("ingredients", {})
    manifest.save()
    t_start = time.perf_counter()

    # -- the stock and the data ------------------------------------------------------------------------------
    stock = require_vit(load_model(cfg.arch, cfg.model), "adapt")
    pre = Preprocess.for_model(stock)
    names = class_names(stock)
    device = cfg.device
    t0 = time.perf_counter()
    target = load_folder(cfg.target, pre, progress=progress, description="decode target")
    source = None
    if cfg.source:
        source = load_folder(cfg.source, pre, labeled=True, class_names=names, progress=progress, description="decode source")
        source = _subset(source, cfg.max_source_images, cfg.seed)
    target = _subset(target, cfg.max_target_images, cfg.seed)
    _check_unique_eval_names(cfg.evals)
    evals = {Path(e).name or str(e): load_folder(e, pre, labeled=True, class_names=names, progress=progress, description=f"decode {Path(e).name}") for e in cfg.evals}
    manifest.data["data"] = {
        "target": _data_record(target), "source": _data_record(source) if source is not None else None,
        "evals": {k: _data_record(v) for k, v in evals.items()},
    }
    manifest.data["timings_s"]["load_data"] = time.perf_counter() - t0
    manifest.save()
    for label, images in (("target", target), ("source", source), *evals.items()):
        if images is None:
            continue
        if images.skipped:
            log(f"{label}: skipped {len(images.skipped)} unreadable file(s): " + ", ".join(f"{p} ({r})" for p, r in images.skipped[:5]) + (" ..." if len(images.skipped) > 5 else ""))
    manifest.data["protocol"] = protocol(cfg)
    manifest.save()
    log(f"protocol {protocol(cfg)}: inter-training and vanilla fine-tuning start from "
        + (f"the pre-trained encoder {cfg.pretrained}" if cfg.pretrained else f"the deployed model {cfg.model}"))
    log(f"stock {cfg.model}: {model_meta(stock).arch}, {stock.num_classes} classes; target {len(target)} images"
        + (f", source {len(source)} labeled" if source is not None else ", no source (label-free ingredients)"))

    inter_data = target if cfg.inter.data == "target" else _strip_labels(source)
    inters, ingredients = plan_ingredients(cfg, len(inter_data))
    log(f"plan: {len(inters)} inter-training run(s) x {len(finetune_runs(cfg.finetune)) if cfg.finetune_back else 'no'} fine-tuning(s)"
        + (f" + {cfg.vanilla} vanilla" if cfg.vanilla else "") + f" = {len(ingredients)} ingredients")
    overall = progress.add_task("ingredients", total=len(ingredients))
    stock_stds = tensor_stds(stock.state_dict())
    partitions = class_partitions(stock.num_classes, cfg.inter.partitions, cfg.inter.partition_mode, cfg.seed) if cfg.inter.partitions else []
    if partitions:
        manifest.data["partitions"] = {"mode": cfg.inter.partition_mode, "loss": cfg.inter.partition_loss, "classes": partitions}
        log(f"partitions: {len(partitions)} groups of source classes ({cfg.inter.partition_mode}), inter-training loss {cfg.inter.partition_loss}")
    noise_stage = cfg.inter.noise_stage

    def noisy(model: nn.Module, multiplier: float, name: str) -> None:
        if multiplier:
            model.load_state_dict(add_parameter_noise(model.state_dict(), multiplier, stock_stds, name_seed(name, cfg.seed)))

    # -- 1. inter-training ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    decoder_source = _decoder_state(cfg, log)
    for run in inters:
        out = run_dir / "inter" / f"{run.name}.safetensors"
        needed = any(ing.inter == run and not (run_dir / "ingredients" / ing.path_name).is_file() for ing in ingredients)
        if out.is_file() or not needed:
            continue
        encoder = initial_model(cfg)
        if noise_stage == "before_inter":
            noisy(encoder, run.noise, run.name)
        run_data = inter_data
        if run.partition is not None:
            subset = source.subset(indices_of_classes(source.labels, partitions[run.partition]))
            run_data = subset if cfg.inter.partition_loss == "supervised" else _strip_labels(subset)
        if run.partition is not None and cfg.inter.partition_loss == "supervised":
            mae = _SupervisedInter(encoder)
            loss_fn, views, augment, what = _supervised_inter_loss(cfg.finetune.label_smoothing), 1, cfg.finetune.augment, f"supervised on partition {run.partition}"
        elif run.ssl == "mae":
            with torch.random.fork_rng():  # a fresh decoder's initialisation depends on the seed alone
                torch.manual_seed(cfg.seed)
                mae = MaskedAutoencoder(encoder, _decoder_config(encoder, run.decoder_depth), mask_ratio=run.mask_ratio, norm_pix_loss=cfg.inter.norm_pix_loss)
            _prepare_decoder(mae, run, cfg, decoder_source, run_data, pre, run_dir, progress, log)
            loss_fn, views, augment, what = mae_loss, 1, cfg.inter.augment, f"MAE, mask {run.mask_ratio}"
        else:
            with torch.random.fork_rng():
                torch.manual_seed(run.seed)
                mae = MoCoV3(encoder, temperature=run.temperature) if run.ssl == "mocov3" else MMCR(encoder, lam=run.lam)
            views = 2 if run.ssl == "mocov3" else cfg.inter.mmcr.views
            loss_fn, augment = multiview_loss, cfg.inter.contrastive_augment
            what = f"MoCo v3, tau {run.temperature}" if run.ssl == "mocov3" else f"MMCR, lambda {run.lam}, {views} views"
            _warm_up_heads(mae, run, cfg, views, run_data, pre, run_dir, progress, log)
        tcfg = TrainConfig(
            steps=run.steps, lr=run.lr, batch_size=run.batch_size or cfg.inter.batch_size, weight_decay=cfg.inter.weight_decay,
            warmup_frac=cfg.inter.warmup_frac, augment=augment, seed=run.seed, bf16=cfg.bf16, device=device,
            checkpoint_every_s=cfg.checkpoint_every_s, views=views,
        )
        where = f"source partition {run.partition}" if run.partition is not None else cfg.inter.data
        log(f"inter-train {run.name}: {what} on {where} ({len(run_data)} images), lr {run.lr:g}, {run.steps} steps"
            + (f", noise x{run.noise:g} {noise_stage}" if run.noise else ""))
        res = train(mae, loss_fn, run_data, pre, tcfg, state_path=run_dir / "state" / f"{run.name}.pt", progress=progress,
                    description=f"inter-train {run.name}", on_step=_step_hook(on_step, run.name))
        encoder = mae.encoder.cpu()
        meta = model_meta(encoder, made_by="adaptsoup adapt", stage="inter-train", ssl=run.ssl, parents=[str(cfg.pretrained or cfg.model)],
                          run=dataclasses.asdict(run))
        save_checkpoint(out, encoder.state_dict(), meta)
        manifest.update("inter", run.name, {**dataclasses.asdict(run), "train": _train_record(res, tcfg), "path": str(out.relative_to(run_dir))})
        del mae, encoder
    manifest.data["timings_s"]["inter_train"] = manifest.data["timings_s"].get("inter_train", 0) + time.perf_counter() - t0

    # -- 2. fine-tune back (LP-FT) ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    done = 0
    for ing in ingredients:
        out = run_dir / "ingredients" / ing.path_name
        if out.is_file():
            done += 1
            progress.update(overall, completed=done)
            continue
        parent = run_dir / "inter" / f"{ing.inter.name}.safetensors" if ing.inter else Path(cfg.pretrained or cfg.model)
        model = load_model(None, parent) if ing.inter else initial_model(cfg)
        if ing.finetune is None:  # label-free: the inter-trained encoder is the ingredient
            if noise_stage in ("before_finetune", "before_mix"):
                noisy(model, ing.inter.noise, ing.name)
            save_checkpoint(out, model.state_dict(), model_meta(model, made_by="adaptsoup adapt", stage="inter-train only",
                                                                  kind="ssl-only", parents=[str(parent)], inter=dataclasses.asdict(ing.inter)))
            manifest.update("ingredients", ing.name, {"kind": "ssl-only", "inter": ing.inter.name, "finetune": None,
                                                      "path": str(out.relative_to(run_dir)), "status": "done"})
            done += 1
            progress.update(overall, completed=done)
            continue
        if noise_stage == "before_finetune" and ing.inter is not None:
            noisy(model, ing.inter.noise, ing.inter.name)  # one seed per parent: its N fine-tunings share the noisy encoder
        probe = _linear_probe(model, source, pre, cfg, run_dir, ing, log)
        ft = cfg.finetune
        steps = ft.steps or steps_for_epochs(ft.epochs, len(source), ft.batch_size)
        tcfg = TrainConfig(
            steps=steps, lr=ing.finetune.lr, batch_size=ft.batch_size, weight_decay=ft.weight_decay,
            warmup_frac=ft.warmup_frac, augment=ft.augment, seed=ing.finetune.seed + (1000 * (ing.inter.seed + 1) if ing.inter else 0),
            bf16=cfg.bf16, device=device, checkpoint_every_s=cfg.checkpoint_every_s,
        )
        log(f"fine-tune {ing.name}: LP-FT on source, lr {ing.finetune.lr:g}, {steps} steps")
        res = train(model, classification_loss(ft.label_smoothing), source, pre, tcfg, state_path=run_dir / "state" / f"{ing.name}.pt",
                    progress=progress, description=f"fine-tune {ing.name}", on_step=_step_hook(on_step, ing.name))
        model.cpu()
        if noise_stage == "before_mix" and ing.inter is not None:
            noisy(model, ing.inter.noise, ing.name)
        meta = model_meta(model, made_by="adaptsoup adapt", stage="fine-tune", kind=ing.kind, parents=[str(parent)],
                          finetune=dataclasses.asdict(ing.finetune), inter=dataclasses.asdict(ing.inter) if ing.inter else None)
        save_checkpoint(out, model.state_dict(), meta)
        manifest.update("ingredients", ing.name, {
            "kind": ing.kind, "inter": ing.inter.name if ing.inter else None, "finetune": dataclasses.asdict(ing.finetune),
            "linear_probe": probe, "train": _train_record(res, tcfg), "path": str(out.relative_to(run_dir)), "status": "done",
            "noise": {"stage": noise_stage, "multiplier": ing.inter.noise} if (noise_stage and ing.inter) else None,
        })
        done += 1
        progress.update(overall, completed=done)
        del model
    progress.remove_task(overall)
    manifest.data["timings_s"]["fine_tune"] = manifest.data["timings_s"].get("fine_tune", 0) + time.perf_counter() - t0

    # -- 3. soups ---------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    self_paths = [run_dir / "ingredients" / i.path_name for i in ingredients if i.kind == "self"]
    vanilla_paths = [run_dir / "ingredients" / i.path_name for i in ingredients if i.kind == "vanilla"]
    soup_path = write_soup(run_dir / "soup.safetensors", self_paths, stock, method="uniform")
    supervised_path = write_soup(run_dir / "soups" / f"{SUPERVISED_SOUP}.safetensors", vanilla_paths, stock, method="uniform") if vanilla_paths else None
    manifest.data["soups"] = {SOUP: {"path": "soup.safetensors", "method": "uniform", "ingredients": [p.stem for p in self_paths]}}
    if supervised_path:
        manifest.data["soups"][SUPERVISED_SOUP] = {"path": str(supervised_path.relative_to(run_dir)), "method": "uniform", "ingredients": [p.stem for p in vanilla_paths]}
    manifest.data["timings_s"]["soup"] = time.perf_counter() - t0
    log(f"soup of {len(self_paths)} ingredients -> {soup_path}")

    # -- 4. evaluation ----------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    metrics = manifest.data.get("metrics", {})
    if evals:
        candidates = {DEPLOYED: Path(cfg.model), **{p.stem: p for p in self_paths + vanilla_paths}, SOUP: soup_path}
        if supervised_path:
            candidates[SUPERVISED_SOUP] = supervised_path
        metrics = evaluate_checkpoints(candidates, evals, pre, arch=cfg.arch, device=device, bf16=cfg.bf16, progress=progress, known=metrics)
        manifest.data["metrics"] = metrics
    manifest.data["timings_s"]["evaluate"] = time.perf_counter() - t0
    manifest.data["timings_s"]["total_this_invocation"] = time.perf_counter() - t_start
    manifest.data["status"] = "complete"
    manifest.save()
    return AdaptResult(run_dir, soup_path, supervised_path, self_paths + vanilla_paths, metrics, manifest.path)


# --------------------------------------------------------------------------------------------------------------
# Pieces


def write_soup(out: Path, paths: list[Path], stock: nn.Module, method: str = "uniform", weights=None) -> Path:
    state, meta = stream_weighted_average(paths, weights)
    base = meta or model_meta(stock)
    meta = dataclasses.replace(base, provenance={"made_by": "adaptsoup", "stage": "soup", "method": method,
                                                 "parents": [p.name for p in paths], "weights": None if weights is None else [float(w) for w in weights]})
    return save_checkpoint(out, state, meta)


def evaluate_checkpoints(candidates: dict[str, Path], evals: dict[str, ImageSet], pre: Preprocess, *, arch: str | None = None,
                         device: str = "cpu", bf16: bool = False, progress=None, known: dict | None = None,
                         score=top1, predictions: dict | None = None) -> dict[str, dict[str, float]]:
    """Top-1 of each checkpoint on each labeled set: ``{eval_name: {model_name: accuracy}}``, one model in memory.

    ``score(logits, labels)`` turns logits into a percentage (default: top-1 over the model's classes).
    ``predictions``, if given, is filled with each evaluated model's per-image arg-max class:
    ``{eval_name: {model_name: int64 [N]}}`` (only for what is evaluated now, not what ``known`` held).
    """
    progress = progress or NullProgress()
    metrics: dict[str, dict[str, float]] = {k: dict(v) for k, v in (known or {}).items()}
    todo = {n: [e for e in evals if n not in metrics.get(e, {})] for n in candidates}  # only what is not known yet
    todo = {n: missing for n, missing in todo.items() if missing}
    task = progress.add_task("evaluate", total=sum(len(m) for m in todo.values()))
    for name, missing in todo.items():
        model = load_model(arch if name == DEPLOYED else None, candidates[name])
        for eval_name in missing:
            images = evals[eval_name]
            logits = run_model(model, images, pre, device=device, bf16=bf16).logits
            metrics.setdefault(eval_name, {})[name] = score(logits, images.labels)
            if predictions is not None:
                predictions.setdefault(eval_name, {})[name] = logits.argmax(dim=1)
            progress.advance(task)
        del model
    progress.remove_task(task)
    return metrics


def _decoder_config(encoder: nn.Module, depth: int) -> DecoderConfig:
    cfg = DecoderConfig.for_encoder(encoder.embed_dim)
    return dataclasses.replace(cfg, depth=depth) if depth else cfg


def protocol(cfg: AdaptConfig) -> str:
    """``"pretrained"`` (ingredients start from a pre-trained encoder, the paper's) or ``"deployed"``."""
    return "pretrained" if cfg.pretrained else "deployed"


def initial_model(cfg: AdaptConfig) -> nn.Module:
    """What every inter-training and every vanilla fine-tuning starts from.

    The deployed model (``cfg.model``) as it is; or, with ``cfg.pretrained``, the deployed model's
    architecture, classes and preprocessing carrying the pre-trained checkpoint's encoder weights, with a
    zeroed head (the pre-trained file's head, if any, is dropped: the linear probe of LP-FT sets it).
    """
    model = load_model(cfg.arch, cfg.model)
    if not cfg.pretrained:
        return model
    source = load_model(model_arch(model), cfg.pretrained, num_classes=model.num_classes, reset_head=True)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    state.update({k: torch.zeros_like(v) for k, v in model.state_dict().items() if k.startswith("head.")})
    load_state_dict_strict(model, state, source=f"--pretrained {cfg.pretrained}")
    return model


def _decoder_state(cfg: AdaptConfig, log: RunLog) -> dict[str, torch.Tensor] | None:
    """The MAE decoder's weights: the pre-trained checkpoint's if it holds decoder keys, else ``--stock``'s."""
    if cfg.pretrained:
        state, _ = read_checkpoint(cfg.pretrained)
        if len(encoder_state_dict(state)) < len(state):
            log(f"MAE decoder: loaded from the pre-trained checkpoint {cfg.pretrained}")
            return state
    if not cfg.stock:
        log("MAE decoder: none given (--stock); a fresh decoder is warmed up with the encoder frozen")
        return None
    state, _ = read_checkpoint(cfg.stock)
    log(f"MAE decoder: loaded from {cfg.stock}")
    return state


def _prepare_decoder(mae: MaskedAutoencoder, run: InterRun, cfg: AdaptConfig, decoder_state, data: ImageSet, pre: Preprocess,
                     run_dir: Path, progress, log: RunLog) -> None:
    """Load the stock's MAE decoder, or warm up a fresh one (encoder frozen), shared by runs of one decoder size.
    With ``decoder_warmup_loaded`` the stock's decoder is warmed up the same way, starting from its weights."""
    loaded = False
    if decoder_state is not None:
        try:
            mae.load_decoder_state_dict(decoder_state)
            loaded = True
        except AdaptsoupError as exc:
            if run.decoder_depth:
                log(f"MAE decoder from --stock does not fit decoder depth {run.decoder_depth} ({exc}); warming up a fresh one")
            else:
                raise
        if loaded and not cfg.inter.decoder_warmup_loaded:
            return
    origin = "stock" if loaded else "fresh"
    warm = run_dir / "inter" / f"decoder_warmup_{origin}_d{mae.decoder_config.depth}_m{int(run.mask_ratio * 100)}.safetensors"
    if warm.is_file():
        state, _ = read_checkpoint(warm)
        mae.load_decoder_state_dict(state)
        return
    steps = cfg.inter.decoder_warmup_steps
    if steps <= 0:
        log("decoder warm-up disabled (decoder_warmup_steps = 0): inter-training starts from "
            + ("the stock's decoder as it is" if loaded else "a random decoder"))
        return
    for p in mae.encoder.parameters():
        p.requires_grad_(False)
    tcfg = TrainConfig(steps=steps, lr=cfg.inter.decoder_warmup_lr, batch_size=cfg.inter.batch_size, weight_decay=cfg.inter.weight_decay,
                       warmup_frac=0.1, augment=cfg.inter.augment, seed=cfg.seed, bf16=cfg.bf16, device=cfg.device,
                       checkpoint_every_s=cfg.checkpoint_every_s)
    log(f"decoder warm-up ({'from the stock decoder' if loaded else 'fresh decoder'}): {steps} steps, lr {tcfg.lr:g}, encoder frozen")
    train(mae, mae_loss, data, pre, tcfg, state_path=run_dir / "state" / f"{warm.stem}.pt", progress=progress, description="decoder warm-up")
    for p in mae.encoder.parameters():
        p.requires_grad_(True)
    save_checkpoint(warm, mae.decoder_state_dict(), None)


class _SupervisedInter(nn.Module):
    """Inter-training with labels (partition soups): the classifier itself, under its own name ``encoder``."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def _supervised_inter_loss(label_smoothing: float):
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    return lambda module, x, y: criterion(module(x).float(), y)


def _warm_up_heads(module: nn.Module, run: InterRun, cfg: AdaptConfig, views: int, data: ImageSet, pre: Preprocess,
                   run_dir: Path, progress, log: RunLog) -> None:
    """MoCo v3 / MMCR: train the fresh projection heads alone (encoder frozen) for ``head_warmup_frac`` of the steps."""
    steps = int(round(cfg.inter.head_warmup_frac * run.steps))
    if steps <= 0:
        return
    warm = run_dir / "inter" / f"{run.name}.heads.safetensors"
    if warm.is_file():
        state, _ = read_checkpoint(warm)
        module.load_state_dict({**module.state_dict(), **state})
        return
    for p in module.encoder.parameters():
        p.requires_grad_(False)
    tcfg = TrainConfig(steps=steps, lr=run.lr, batch_size=run.batch_size or cfg.inter.batch_size, weight_decay=cfg.inter.weight_decay,
                       warmup_frac=0.0, augment=cfg.inter.contrastive_augment, seed=run.seed + 7, bf16=cfg.bf16, device=cfg.device,
                       checkpoint_every_s=cfg.checkpoint_every_s, views=views)
    log(f"{run.name}: head warm-up, {steps} steps with the encoder frozen")
    train(module, multiview_loss, data, pre, tcfg, state_path=run_dir / "state" / f"{warm.stem}.pt", progress=progress, description="head warm-up")
    for p in module.encoder.parameters():
        p.requires_grad_(True)
    save_checkpoint(warm, {k: v for k, v in module.state_dict().items() if not k.startswith("encoder.")}, None)


def _linear_probe(model: nn.Module, source: ImageSet, pre: Preprocess, cfg: AdaptConfig, run_dir: Path, ing: Ingredient, log: RunLog) -> dict:
    """LP of LP-FT: the head is set to the linear-probe solution (computed once per parent, then reused)."""
    parent = ing.inter.name if ing.inter else ("pretrained" if cfg.pretrained else "stock")
    cache = run_dir / "inter" / f"{parent}.probe.safetensors"
    if cache.is_file():
        state, meta = read_checkpoint(cache)
        model.get_classifier().load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()})
        return dict(meta.provenance.get("probe", {})) if meta else {}
    t0 = time.perf_counter()
    probe = fit_linear_probe(model, source, pre, LinearProbeConfig(weight_decay=cfg.finetune.probe_weight_decay, device=cfg.device, bf16=cfg.bf16))
    probe["wall_s"] = time.perf_counter() - t0
    log(f"linear probe on {parent}: train accuracy {probe['train_acc']:.1f}% ({probe['wall_s']:.0f}s)")
    head = {f"head.{k}": v for k, v in model.get_classifier().state_dict().items()}
    save_checkpoint(cache, head, dataclasses.replace(model_meta(model), provenance={"probe": probe}))
    return probe


def _subset(images: ImageSet, limit: int, seed: int) -> ImageSet:
    if not limit or limit >= len(images):
        return images
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images), generator=gen)[:limit].sort().values
    return images.subset(idx)


def _strip_labels(images: ImageSet) -> ImageSet:
    return dataclasses.replace(images, labels=None)


def _data_record(images: ImageSet) -> dict:
    return {"root": images.root, "images": len(images), "skipped": len(images.skipped),
            "skipped_files": [{"path": p, "reason": r} for p, r in images.skipped[:100]]}


def _train_record(res, tcfg: TrainConfig) -> dict:
    return {"config": tcfg.to_dict(), "wall_s": round(res.wall_s, 2), "images_per_s": round(res.images_per_s, 1),
            "final_loss": res.losses[-1] if res.losses else None, "losses": [round(x, 5) for x in res.losses], "resumed_from_step": res.resumed_from}


def _step_hook(on_step, name):
    if on_step is None:
        return None
    return lambda step, loss: on_step(name, step)


def _check_unique_eval_names(evals: list[str]) -> None:
    names = [Path(e).name for e in evals]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise AdaptsoupError(f"--eval folders must have distinct names; repeated: {', '.join(sorted(dupes))}")
