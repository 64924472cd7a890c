"""FOA, forward-only test-time adaptation (Niu et al., ICML 2024, "Test-Time Model Adaptation with Only
Forward Passes"), of a prompt-capable ONNX export (:mod:`adaptsoup.deploy.prompted`) in onnxruntime: no
gradient, no change to the weights, so it runs on fp32 and int8 files alike.  As in its official code
(mr-eggplant/FOA ``tta_library/foa.py``, ``models/vpt.py``, ``tta_library/foa_shift.py``; defaults of ``main.py``):

* input level: P prompt tokens (``num_prompts``, 3) searched by CMA-ES (population 27, mean 0, σ 1,
  seed 2020).  Each batch evaluates the population's ``ask`` and the previous batch's best prompts (28 forward
  passes); the lowest fitness gives the batch's predictions and becomes the next best; the population's
  fitnesses are told to CMA-ES.  The first batch's "previous best" is VPT's uniform initialisation,
  U(±sqrt(6 / (3·patch area + D))).
* fitness = Σ_batch entropy(softmax(unshifted logits)) + λ·(‖σ − σ_s‖² + ‖μ − μ_s‖²)·B/64, with μ, σ the
  batch's per-dimension mean and (unbiased) std of the class token's features at every layer (``layer_features``
  of the graph: after block i by block i+1's ``norm1``, the last by the final norm), μ_s, σ_s the same over
  in-distribution (source) images, computed once without prompts; λ = ``fitness_lambda`` 0.4.
* output level, activation shifting: the batch's pre-head features are moved by γ·(μ_s,last − m) before the
  head (γ = ``shift_step``, 1 in the official code), m a moving average (0.9·m + 0.1·mean) of the batches'
  feature means, averaged over the candidates evaluated.  The shift is estimated from earlier batches only; the
  first batch has none.

Differences from the official code, by necessity or choice: the CMA-ES is the ``cmaes`` package (pycma's
``cma`` in the official code), which is told the population only (the official code also tells it the
re-evaluated previous best); without source images there is no discrepancy term and no shift (logged, and
``variant`` in the manifest); a batch of one image has no std, so only its mean enters the discrepancy;
``num_prompts`` 0 is the official ``foa_shift`` (activation shifting alone: one forward pass per batch).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from adaptsoup.core.data import Preprocess, load_folder
from adaptsoup.core.manifest import Manifest, environment
from adaptsoup.core.progress import NullProgress
from adaptsoup.deploy.prompted import PromptedSession, PromptedShape, freeze_prompts
from adaptsoup.errors import AdaptsoupError

Forward = Callable[[np.ndarray, "np.ndarray | None", "np.ndarray | None"], dict]  # (x, prompts, shift) -> outputs
REFERENCE_BATCH = 64  # the official discrepancy is scaled by B / 64


@dataclass
class FOAConfig:
    num_prompts: int = 3  # official main.py --num_prompts
    popsize: int = 27  # official foa.py (4 + 3 ln(3 x 768) for ViT-B)
    fitness_lambda: float = 0.4  # official main.py --fitness_lambda (0.2 for ImageNet-R)
    shift_step: float = 1.0  # gamma: official 1.0
    hist_momentum: float = 0.9  # the target feature mean's moving average
    sigma: float = 1.0  # CMA-ES initial step size (official)
    cma_seed: int = 2020  # CMA-ES and the initial prompts (official seed)
    stats: str = "all"  # "all": every layer's class-token statistics (official), "last": the pre-head features only
    batch_size: int = 64
    seed: int = 0  # order of the stream
    shuffle: bool = True
    source_size: int = 2000  # at most this many source images (a seeded subset) for the source statistics
    threads: int | None = None  # onnxruntime intra-op threads


@dataclass
class SourceStats:
    mean: np.ndarray  # [L, D]
    std: np.ndarray  # [L, D], unbiased
    images: int


@dataclass
class Fitness:
    value: float
    entropy: float  # summed over the batch
    discrepancy: float  # lambda-weighted, scaled by B / 64


@dataclass
class FOAStep:
    batch: int
    size: int
    best_fitness: float | None
    entropy: float | None
    discrepancy: float | None
    best_candidate: int | None  # index into the candidates (popsize: the previous best)
    shift_norm: float  # the norm of the shift applied to this batch (0: none)
    forward_passes: int
    seconds: float


def source_statistics(forward: Forward, batches: Iterable[np.ndarray]) -> SourceStats:
    """Per-layer mean and unbiased std of the class-token features over ``batches``, without prompts or shift."""
    feats = [np.asarray(forward(x, None, None)["layer_features"], np.float64) for x in batches]
    feats = np.concatenate(feats) if feats else np.zeros((0, 0, 0))
    if len(feats) < 2:
        raise AdaptsoupError("foa: the source statistics need at least 2 source images")
    return SourceStats(feats.mean(0), feats.std(0, ddof=1), len(feats))


def softmax_entropy(logits: np.ndarray) -> np.ndarray:
    """Per-row entropy of softmax(logits), computed stably in float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -(np.exp(log_p) * log_p).sum(axis=1)


def fitness(outputs: dict, source: SourceStats | None, lam: float, stats: str = "all") -> Fitness:
    """FOA's fitness of one candidate on one batch (see the module); ``source`` None: entropy alone."""
    entropy = float(softmax_entropy(outputs["logits_unshifted"]).sum())
    if source is None or lam == 0:
        return Fitness(entropy, entropy, 0.0)
    feats = np.asarray(outputs["layer_features"], np.float64)
    mean_s, std_s = source.mean, source.std
    if stats == "last":
        feats, mean_s, std_s = feats[:, -1:], mean_s[-1:], std_s[-1:]
    elif stats != "all":
        raise AdaptsoupError(f"foa: stats must be 'all' or 'last', got {stats!r}")
    gap = float(((feats.mean(0) - mean_s) ** 2).sum())
    if len(feats) > 1:
        gap += float(((feats.std(0, ddof=1) - std_s) ** 2).sum())
    discrepancy = lam * gap * len(feats) / REFERENCE_BATCH
    return Fitness(entropy + discrepancy, entropy, discrepancy)


def update_hist(hist: np.ndarray | None, batch_mean: np.ndarray, momentum: float = 0.9) -> np.ndarray:
    """The moving average of the target's feature mean (it starts at the first batch's)."""
    return batch_mean.copy() if hist is None else momentum * hist + (1 - momentum) * batch_mean


class FOA:
    """FOA's state over a stream: ``step(x)`` returns the batch's logits (the best candidate's, shifted), then
    updates CMA-ES and the moving average.  ``forward`` runs the prompt-capable graph (or any function with
    its inputs and outputs)."""

    def __init__(self, forward: Forward, shape: PromptedShape, source: SourceStats | None, cfg: FOAConfig) -> None:
        if cfg.num_prompts < 0 or cfg.popsize < 2:
            raise AdaptsoupError(f"foa: num_prompts must be >= 0 and popsize >= 2 (got {cfg.num_prompts}, {cfg.popsize})")
        self.forward, self.shape, self.source, self.cfg = forward, shape, source, cfg
        self.steps: list[FOAStep] = []
        self.reset()

    def reset(self) -> None:
        """Back to the start: a fresh CMA-ES, the initial prompts, no moving average."""
        from cmaes import CMA

        cfg, dim = self.cfg, self.cfg.num_prompts * self.shape.embed_dim
        self.es = CMA(mean=np.zeros(dim), sigma=cfg.sigma, seed=cfg.cma_seed, population_size=cfg.popsize) if dim else None
        bound = self.shape.prompt_init_bound()
        self.best_prompts = np.random.default_rng(cfg.cma_seed).uniform(-bound, bound, dim)
        self.hist: np.ndarray | None = None

    def shift_vector(self) -> np.ndarray | None:
        """γ·(source mean of the pre-head features − the moving average of the target's); None before any batch
        or without source statistics."""
        if self.hist is None or self.source is None or self.cfg.shift_step == 0:
            return None
        return self.cfg.shift_step * (self.source.mean[-1] - self.hist)

    def prompts(self) -> np.ndarray | None:
        """The current best prompts [P, D] (None when P = 0)."""
        return self.best_prompts.reshape(self.cfg.num_prompts, self.shape.embed_dim) if self.cfg.num_prompts else None

    def step(self, x: np.ndarray) -> np.ndarray:
        """One batch: evaluate the candidates, return the best one's (shifted) logits, then update."""
        t0 = time.perf_counter()
        shift = self.shift_vector()
        dim = self.shape.embed_dim
        candidates = [self.es.ask() for _ in range(self.cfg.popsize)] + [self.best_prompts] if self.es is not None else [None]
        results, means = [], []
        for cand in candidates:
            out = self.forward(x, None if cand is None else cand.reshape(-1, dim), shift)
            results.append((fitness(out, self.source, self.cfg.fitness_lambda, self.cfg.stats), out["logits"]))
            means.append(np.asarray(out["features"], np.float64).mean(0))
        values = [f.value for f, _ in results]
        best = int(np.argmin(values))  # the first of equals, as the official strict '<'
        if self.es is not None:
            self.es.tell(list(zip(candidates[: self.cfg.popsize], values[: self.cfg.popsize])))
            self.best_prompts = np.asarray(candidates[best], np.float64)
        self.hist = update_hist(self.hist, np.mean(means, axis=0), self.cfg.hist_momentum)
        fit = results[best][0]
        self.steps.append(FOAStep(len(self.steps), len(x), fit.value, fit.entropy, fit.discrepancy,
                                  best if self.es is not None else None, float(np.linalg.norm(shift)) if shift is not None else 0.0,
                                  len(candidates), time.perf_counter() - t0))
        return np.asarray(results[best][1], np.float32)


# ----------------------------------------------------------------------------------------------------------------
# A run over a folder: adaptsoup tta --onnx FILE --method foa


def prepare_onnx(onnx_path: str, model_path: str | None, arch: str | None, int8: bool,
                 log: Callable[[str], None]) -> tuple[Path, dict]:
    """The file to adapt: ``onnx_path``, or, with ``model_path``, the prompt-capable export written there first
    (and its dynamic int8 copy, then the one adapted, with ``int8``).  Returns it and what the export did."""
    if model_path is None:
        if int8:
            raise AdaptsoupError("--int8 quantizes the prompt-capable export that --model makes; to adapt an int8 file, pass it as --onnx")
        return Path(onnx_path), {}
    from adaptsoup.core.models import load_model
    from adaptsoup.deploy.prompted import export_prompted

    t0 = time.perf_counter()
    report = export_prompted(load_model(arch, model_path), onnx_path, int8=int8, log=log)
    info = {"from": str(model_path), "fp32": str(report.path), "int8": str(report.int8_path) if report.int8_path else None,
            "exporter": report.exporter, "opset": report.opset, "parity_max_abs_diff": report.max_abs_diff,
            "parity_no_prompts_max_abs_diff": report.max_abs_diff_no_prompts, "fused": report.fused,
            "seconds": round(time.perf_counter() - t0, 2)}
    log(f"foa: wrote the prompt-capable export {report.path}" + (f" and its int8 copy {report.int8_path}" if int8 else "")
        + f" (parity with PyTorch {max(report.max_abs_diff, report.max_abs_diff_no_prompts):.1e})")
    return (report.int8_path if int8 else report.path), info


def _batches(images, pre: Preprocess, order: torch.Tensor, size: int):
    for i in range(0, len(order), size):
        idx = order[i : i + size]
        yield idx, pre.normalize(images.images[idx]).numpy()


def foa_run_dir(onnx_path: str, out_dir: str, cfg: FOAConfig, *, target: str | None = None, eval_labels: str | None = None,
                source: str | None = None, model_path: str | None = None, arch: str | None = None, int8: bool = False,
                progress=None, log: Callable[[str], None] = print) -> dict:
    """Adapt the prompt-capable ONNX model online over a folder; write ``predictions.csv`` (as the other
    methods), ``adapted.onnx`` (:func:`freeze_prompts`: the final prompts and shift as constants) and
    ``manifest.json`` (settings, the prompts and shift learned, per-batch fitness, counts, timings)."""
    from adaptsoup.tta.stream import TTAResult, write_predictions_csv

    if (target is None) == (eval_labels is None):
        raise AdaptsoupError("give the stream as --target DIR (unlabeled) or --eval-labels DIR (labeled, to score), not both")
    t_start = time.perf_counter()
    progress = progress or NullProgress()
    path, export_info = prepare_onnx(onnx_path, model_path, arch, int8, log)
    session = PromptedSession(path, cfg.threads)
    pre, names = Preprocess.from_meta(session.meta), list(session.meta["class_names"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = load_folder(eval_labels or target, pre, labeled=eval_labels is not None, class_names=names if eval_labels else None,
                         progress=progress, description="decode stream")
    if len(images) == 0:
        raise AdaptsoupError(f"no readable images in {eval_labels or target}")
    if images.skipped:
        log(f"skipped {len(images.skipped)} file(s) (unreadable or not images)")
    t0 = time.perf_counter()
    stats, variant = None, "FOA" if cfg.num_prompts else "FOA activation shifting only (num_prompts 0)"
    if source:
        src = load_folder(source, pre, progress=progress, description="decode source")
        if len(src) > cfg.source_size:
            src = src.subset(torch.randperm(len(src), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.source_size])
        stats = source_statistics(session.run, (x for _, x in _batches(src, pre, torch.arange(len(src)), cfg.batch_size)))
        log(f"foa: source statistics from {stats.images} image(s) of {source}")
    else:
        variant += ", without source statistics: entropy-only fitness, no activation shifting"
        log("foa: no --source images: the fitness is the entropy alone and there is no activation shifting")
    source_s = time.perf_counter() - t0
    foa = FOA(session.run, session.shape, stats, cfg)
    n = len(images)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)) if cfg.shuffle else torch.arange(n)
    logits = None
    task = progress.add_task("foa online", total=(n + cfg.batch_size - 1) // cfg.batch_size)
    for idx, x in _batches(images, pre, order, cfg.batch_size):
        got = torch.from_numpy(foa.step(x))
        logits = torch.zeros(n, got.shape[1]) if logits is None else logits
        logits[idx] = got
        progress.advance(task)
    progress.remove_task(task)
    result = TTAResult(logits=logits, order=order)
    if images.labels is not None:
        result.accuracy = float((logits.argmax(1) == images.labels).float().mean() * 100)
    write_predictions_csv(out / "predictions.csv", images, result, names or [str(i) for i in range(logits.shape[1])])
    final_shift = foa.shift_vector()
    freeze_prompts(path, out / "adapted.onnx", foa.prompts(), final_shift)
    adapt_s = sum(s.seconds for s in foa.steps)
    summary = {
        "method": "foa", "variant": variant, "onnx": str(path), "batches": len(foa.steps), "images": n,
        "forward_passes_per_batch": (cfg.popsize + 1) if cfg.num_prompts else 1,
        "forward_passes": sum(s.forward_passes for s in foa.steps), "online_accuracy": result.accuracy,
        "source_images": stats.images if stats else 0, "prompts": None if foa.prompts() is None else foa.prompts().tolist(),
        "shift": None if final_shift is None else final_shift.tolist(),
        "timings_s": {"export": export_info.get("seconds", 0.0), "source_statistics": round(source_s, 2),
                      "adaptation": round(adapt_s, 2), "per_batch": round(adapt_s / max(len(foa.steps), 1), 4),
                      "total": round(time.perf_counter() - t_start, 2)},
        "per_batch": [dataclasses.asdict(s) for s in foa.steps],
    }
    manifest = Manifest.load_or_new(out / "manifest.json", kind="tta")
    manifest.data.update(config={"method": "foa", **dataclasses.asdict(cfg)}, model=str(model_path or path),
                         stream=str(eval_labels or target), source=source, export=export_info or None,
                         environment=environment(), data={"images": n, "skipped": len(images.skipped)}, result=summary)
    manifest.save()
    log(f"foa: {len(foa.steps)} batches, {summary['forward_passes']} forward passes, {adapt_s:.1f} s"
        + (f", online accuracy {result.accuracy:.2f}%" if result.accuracy is not None else ""))
    return summary
