"""Prediction with an exported model: every image of a folder through onnxruntime, top-1 to a CSV."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaptsoup.core.data import load_folder
from adaptsoup.core.io import write_atomic
from adaptsoup.deploy.onnx import preprocess_from_onnx, read_onnx_metadata
from adaptsoup.deploy.runtime import onnx_logits, ort_session
from adaptsoup.errors import AdaptsoupError


@dataclass
class PredictReport:
    csv_path: str
    images: int
    skipped: list[tuple[str, str]]
    accuracy: float | None = None


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def predict_folder(onnx_path: str | os.PathLike, images_dir: str | os.PathLike, csv_path: str | os.PathLike, batch_size: int = 256) -> PredictReport:
    """Run an exported model over every image under ``images_dir``; write ``path,class,probability`` CSV."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise AdaptsoupError(f"ONNX model not found: {onnx_path}")
    meta = read_onnx_metadata(onnx_path)
    pre = preprocess_from_onnx(onnx_path)
    images = load_folder(images_dir, pre, cache=False)
    probs = softmax(onnx_logits(ort_session(onnx_path), pre.normalize(images.images).numpy(), batch_size))
    names = meta["class_names"] or [str(i) for i in range(probs.shape[1])]
    top = probs.argmax(1)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "class", "probability"])
            for rel, k, p in zip(images.paths, top, probs[np.arange(len(top)), top]):
                writer.writerow([rel, names[int(k)], f"{float(p):.6f}"])

    write_atomic(csv_path, write)
    return PredictReport(csv_path=str(csv_path), images=len(images), skipped=images.skipped)
