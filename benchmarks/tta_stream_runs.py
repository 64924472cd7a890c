"""The runs of the fair-stream TTA benchmark (:mod:`adaptsoup_bench.tta_stream`): the stream, the soups and their
logits without TTA, each method's online pass (kept on disk, so that a rerun resumes), and FOA's forward-only rows
(the soup's prompt-capable ONNX export, fp32 and int8, reset setting only)."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from adaptsoup.core.io import write_json_atomic
from adaptsoup.core.manifest import config_tag, file_digest
from adaptsoup.tta.adapter import Adapter, TTAConfig

from adaptsoup_bench.tta_stream_data import BATCH, correct_of, load_npy, plain_logits, run_stream, save_npy, score, stream_segments

FOA_PER_CORRUPTION = 200  # FOA's smaller stream: each batch costs popsize + 1 (28) forward passes


@dataclass
class Stream:
    images: torch.Tensor  # uint8 [K, N, 3, H, W]
    labels: torch.Tensor  # [N]
    ids: np.ndarray  # [N]: the test indices (the bootstrap's clusters)
    corruptions: list[str]
    pre: object
    seed: int
    cache: Path  # the corrupted arrays, the soups' logits and every finished run
    source: list | None  # in-distribution batches, normalised: EATA's Fisher term, FOA's source statistics
    resamples: int = 10000

    def first(self, n: int) -> "Stream":
        """The same stream on its first ``n`` test images (FOA's smaller stream)."""
        return dataclasses.replace(self, images=self.images[:, :n], labels=self.labels[:n], ids=self.ids[:n])


def row_line(row: dict) -> str:
    g, lr = row["gain"], row.get("lr")
    return (f"{row['soup']} {row['setting']} {row['label']}" + (f" lr {lr:.2e}" if lr is not None else "")
            + f": online {row['accuracy']:.2f}% vs soup {row['soup_accuracy']:.2f}% ({g['mean']:+.2f} [{g['ci95'][0]:+.2f}, "
            f"{g['ci95'][1]:+.2f}]), resets {row['resets']['method']} method / {row['resets']['guard']} guard, "
            f"{row['wall_s']:.0f}s ({row['images_per_s']:.0f} images/s)")


class Runner:
    """The soups (loaded once), their logits without TTA, and each run (kept on disk: a rerun resumes)."""

    def __init__(self, stream: Stream, soups: dict[str, Path], progress, commit: str | None = None, log=print) -> None:
        self.stream, self.paths, self.progress, self.commit, self.log = stream, soups, progress, commit, log
        self.models: dict[str, torch.nn.Module] = {}
        self.base: dict[str, np.ndarray] = {}
        self.total = 0
        self.task = progress.add_task("tta streams", total=0)

    def model(self, soup: str) -> torch.nn.Module:
        from adaptsoup.core.models import load_model

        if soup not in self.models:
            self.models[soup] = load_model(None, self.paths[soup]).eval()
            self.base[soup] = self.baseline(soup)
        return self.models[soup]

    def baseline(self, soup: str) -> np.ndarray:
        """Correctness of the soup without TTA on every (corruption, image): one forward pass, cached."""
        file = self.stream.cache / f"plain-{soup}-{file_digest(self.paths[soup])}.npy"
        logits = load_npy(file)
        if logits is None or logits.shape[:2] != tuple(self.stream.images.shape[:2]):
            logits = plain_logits(self.models[soup], self.stream.images, self.stream.pre).numpy()
            save_npy(file, logits)
        return correct_of(torch.from_numpy(logits), self.stream.labels)

    def plan(self, batches: int) -> None:
        """Add ``batches`` to the progress bar's total."""
        self.total += batches
        self.progress.update(self.task, total=self.total)

    def execute(self, soup: str, setting: str, label: str, key: str, make_adapter: Callable[[], object], info: dict,
                stream: Stream | None = None, base: np.ndarray | None = None) -> dict:
        """One online pass of ``make_adapter()``'s adapter, scored against ``base`` (default: the soup without TTA), or
        the row a run with the same ``key`` left on disk."""
        s, base = stream or self.stream, self.base[soup] if base is None else base
        file = self.stream.cache / "runs" / f"{soup}-{setting}-{label}-{key}.json"
        if file.is_file():
            row = json.loads(file.read_text(encoding="utf-8"))
            self.progress.advance(self.task, row["batches"])
        else:
            self.progress.update(self.task, info=f"{soup} {setting} {label}")
            done = run_stream(make_adapter, s.images, stream_segments(setting, len(s.corruptions), len(s.ids), s.seed), s.pre,
                              self.models[soup].num_classes, BATCH, on_batch=lambda: self.progress.advance(self.task))
            row = {"soup": soup, "setting": setting, "label": label, **info,
                   **score(correct_of(done.logits, s.labels), base, s.ids, s.corruptions, s.resamples),
                   "soup_accuracy": float(base.mean() * 100), "images": int(s.images.shape[0] * s.images.shape[1]),
                   "wall_s": round(done.wall_s, 1), "images_per_s": round(s.images.shape[0] * s.images.shape[1] / done.wall_s, 1),
                   "batches": done.batches, "resets": {"method": done.method_resets, "guard": done.guard_resets,
                                                       "stream": done.stream_resets}, "commit": self.commit}
            write_json_atomic(file, row)
        self.log(row_line(row))
        return row

    def run(self, soup: str, setting: str, cfg: TTAConfig) -> dict:
        """``cfg``'s method adapting ``soup`` over the setting's stream."""
        s, model = self.stream, self.model(soup)
        key = config_tag(file_digest(self.paths[soup]), setting, cfg, s.cache.name, s.resamples)
        source = s.source if cfg.method == "eata" else None
        info = {"method": cfg.method, "base_lr": cfg.base_lr, "lr": cfg.lr(), "guard": cfg.guard}
        return self.execute(soup, setting, cfg.method + ("+guard" if cfg.guard else ""), key,
                            lambda: Adapter(copy.deepcopy(model), cfg, fisher_batches=source), info)


# -- FOA: forward-only, on the soup's prompt-capable ONNX export ---------------------------------------------------------


class FOAAdapter:
    """:class:`adaptsoup.tta.foa.FOA` behind the adapter interface the streams use."""

    def __init__(self, foa) -> None:
        self.foa, self.records = foa, []

    def reset(self) -> None:
        self.foa.reset()

    def predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.foa.step(x.numpy()))


def prompted_exports(model: torch.nn.Module, folder: Path, int8: bool, log) -> dict[str, Path]:
    """The prompt-capable export of ``model`` (and its dynamic int8 copy), made once in ``folder``."""
    from adaptsoup.deploy.prompted import export_prompted
    from adaptsoup.deploy.quantize import quantized_path

    fp32 = folder / "soup.prompted.onnx"
    q = quantized_path(fp32, "dynamic")
    if not fp32.is_file() or (int8 and not q.is_file()):
        export_prompted(copy.deepcopy(model), fp32, int8=int8, log=log)
    return {"foa": fp32, **({"foa-int8": q} if int8 else {})}


def foa_rows(runner: Runner, soups: list[str], per_corruption: int, int8: bool, threads: int | None) -> list[dict]:
    """FOA (official settings) on each soup's export, reset setting, on the stream's first ``per_corruption`` images;
    each row is paired with the same ONNX file without prompts or shift on those images."""
    from adaptsoup.deploy.prompted import PromptedSession
    from adaptsoup.tta.foa import FOA, FOAConfig, source_statistics

    stream = runner.stream.first(per_corruption)
    k, n = len(stream.corruptions), len(stream.ids)
    runner.plan(len(soups) * (2 if int8 else 1) * k * -(-n // BATCH))
    cfg = FOAConfig(batch_size=BATCH, seed=stream.seed, threads=threads)
    rows = []
    for soup in soups:
        model = runner.model(soup)
        folder = stream.cache / "onnx" / f"{soup}-{file_digest(runner.paths[soup])}"
        for label, path in prompted_exports(model, folder, int8, runner.log).items():
            session = PromptedSession(path, threads)
            flat = stream.images.reshape(-1, *stream.images.shape[2:])
            plain = np.concatenate([session.run(stream.pre.normalize(flat[i : i + 500]).numpy(), None, None)["logits"]
                                    for i in range(0, len(flat), 500)]).reshape(k, n, -1)
            base = correct_of(torch.from_numpy(plain), stream.labels)

            def make(session=session) -> FOAAdapter:
                source = source_statistics(session.run, (b.numpy() for b in stream.source)) if stream.source else None
                return FOAAdapter(FOA(session.run, session.shape, source, cfg))

            key = config_tag(file_digest(path), "reset", dataclasses.replace(cfg, threads=None), n, stream.cache.name, stream.resamples)
            info = {"method": "foa", "base_lr": None, "lr": None, "guard": False, "onnx": str(path),
                    "source_images": sum(len(b) for b in stream.source) if stream.source else 0,
                    "forward_passes_per_batch": cfg.popsize + 1}
            rows.append(runner.execute(soup, "reset", label, key, make, info, stream=stream, base=base))
    return rows
