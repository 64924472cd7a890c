"""Prediction with an exported model: every image of a folder through onnxruntime, top-1 to a CSV.

The folder is streamed: its files are listed (the rules of :func:`adaptsoup.core.data.scan_folder`), then
decoded a batch at a time in a background thread while onnxruntime runs the batch before
(:class:`adaptsoup.core.prefetch.DecodeAhead`), and each batch's rows are written as it finishes.  Memory
depends on the batch size, not on the folder.  The rows go to a temporary file beside the CSV that is
renamed onto it at the end, so an error or Ctrl-C leaves nothing at the destination.
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from adaptsoup.core.data import Preprocess, all_skipped, check_folder, none_readable, relative_name, scan_folder
from adaptsoup.core.io import atomic_path
from adaptsoup.core.prefetch import DecodeAhead
from adaptsoup.core.progress import NullProgress
from adaptsoup.deploy.runtime import ort_session, read_onnx_metadata
from adaptsoup.errors import AdaptsoupError

DEFAULT_BATCH_SIZE = 16  # small batches keep the decode thread's work and onnxruntime's interleaved
CSV_HEADER = ["path", "class", "probability"]


@dataclass
class PredictReport:
    csv_path: str
    images: int
    skipped: list[tuple[str, str]]
    accuracy: float | None = None
    seconds: float = 0.0  # wall time of the whole call: metadata, listing, session, decoding, inference, CSV
    threads: int = 0  # onnxruntime intra-op threads used
    batch_size: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: ``taskset``, cgroups cpusets), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return max(1, os.cpu_count() or 1)


def decode_workers(threads: int) -> int:
    """Background decode threads beside ``threads`` onnxruntime threads: one, and a second from 8 threads on
    for large photos (a guess: no machine with more than 2 cores has measured it)."""
    return 1 if threads < 8 else 2


def predict_folder(onnx_path: str | os.PathLike, images_dir: str | os.PathLike, csv_path: str | os.PathLike,
                   batch_size: int = DEFAULT_BATCH_SIZE, threads: int | None = None,
                   progress: Any = None) -> PredictReport:
    """Run an exported model over every image under ``images_dir``; write a ``path,class,probability`` CSV.

    ``threads``: onnxruntime's intra-op threads (default :func:`usable_cores`); ``progress``: a display from
    :func:`adaptsoup.core.progress.progress_bars` (one bar, with images/s).  Rows follow the sorted paths;
    files that are not images or do not decode are skipped and listed in the report.
    """
    start = time.perf_counter()
    onnx_path = Path(onnx_path)
    if batch_size < 1 or (threads is not None and threads < 1):
        raise AdaptsoupError(f"batch size and threads must be at least 1 (got {batch_size} and {threads})")
    if not onnx_path.is_file():
        raise AdaptsoupError(f"ONNX model not found: {onnx_path}")
    meta = read_onnx_metadata(onnx_path)
    root = check_folder(images_dir, "image folder")
    paths, not_images = scan_folder(root)
    threads = threads or usable_cores()
    session = ort_session(onnx_path, threads, spin=False)
    with atomic_path(csv_path) as tmp:
        images, unreadable = _write_predictions(session, tmp, root, paths, Preprocess.from_meta(meta), meta["class_names"],
                                                batch_size, decode_workers(threads), progress or NullProgress())
        if images == 0:
            raise none_readable(root, len(paths))
    return PredictReport(csv_path=str(csv_path), images=images, skipped=all_skipped(not_images, unreadable),
                         seconds=time.perf_counter() - start, threads=threads, batch_size=batch_size)


def _write_predictions(session, tmp: Path, root: Path, paths: Sequence[Path], pre: Preprocess, class_names: list[str],
                       batch_size: int, workers: int, progress: Any) -> tuple[int, list[tuple[str, str]]]:
    """Stream ``paths`` through ``session`` into the CSV ``tmp``; returns (images predicted, unreadable files)."""
    input_name = session.get_inputs()[0].name
    images, files, unreadable = 0, 0, []  # images predicted, files read, (path, reason) of those that did not decode
    task = progress.add_task("predict", total=len(paths))
    started = time.perf_counter()
    with open(tmp, "w", newline="", encoding="utf-8") as handle, DecodeAhead(paths, pre, batch_size, workers) as batches:
        writer = csv.writer(handle)
        writer.writerow(CSV_HEADER)
        for batch in batches:
            if batch.paths:
                probs = softmax(session.run(None, {input_name: batch.inputs})[0])
                writer.writerows(_rows(batch.paths, root, probs, class_names))
            images, files = images + len(batch.paths), files + batch.files
            unreadable.extend(batch.unreadable)
            progress.advance(task, batch.files)
            progress.update(task, info=f"{files / max(time.perf_counter() - started, 1e-9):.1f} images/s")
    progress.remove_task(task)
    return images, unreadable


def _rows(paths: Sequence[Path], root: Path, probs: np.ndarray, class_names: list[str]) -> Iterator[list[str]]:
    """One ``path,class,probability`` row per image: the top-1 class (its name, or its index when the model
    has no class names) and its softmax probability."""
    top = probs.argmax(1)
    for path, k, p in zip(paths, top, probs[np.arange(len(top)), top]):
        yield [relative_name(path, root), class_names[int(k)] if class_names else str(int(k)), f"{float(p):.6f}"]
