"""onnxruntime on the CPU: a quiet session, batched logits, and a context that silences exporter chatter."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from typing import Any

import numpy as np

from adaptsoup.deploy.onnx_props import read_metadata_props
from adaptsoup.errors import AdaptsoupError


def session_options(threads: int | None = None, optimized_model_path: str | os.PathLike | None = None, spin: bool | None = None):
    """The onnxruntime settings adaptsoup runs an exported model with (see :func:`ort_session`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads is not None:
        if threads < 1:
            raise AdaptsoupError(f"threads must be at least 1, got {threads}")
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    if spin is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return options


def ort_session(path: str | os.PathLike, threads: int | None = None, *, optimized_model_path: str | os.PathLike | None = None,
                spin: bool | None = None):
    """A CPU onnxruntime session that logs only errors, set up the way adaptsoup measures its models.

    * ``threads``: onnxruntime's intra-op thread count (the threads one operator, e.g. a MatMul, is split
      over).  ``None`` keeps onnxruntime's default, one per physical core; on a server that runs several
      sessions side by side, give each its share.  Inter-op parallelism is off (1 thread): a ViT is one chain
      of operators, nothing runs beside it.
    * Graph optimisation ``ORT_ENABLE_ALL`` (onnxruntime's default, spelled out): constant folding, its own
      fusions and the CPU-specific layout changes, applied when the session is created.  The transformer
      fusions (Attention, BiasGelu, LayerNormalization) are already in files exported with optimisation on,
      so any session that loads them runs them.
    * Execution mode ``ORT_SEQUENTIAL``: operators one after the other.
    * ``spin``: whether idle intra-op threads busy-wait for the next run (None: onnxruntime's default, on).
      ``predict`` turns it off, so that they leave the cores to the thread decoding the next batch.
    * ``optimized_model_path``: also save the graph as onnxruntime optimised it (for inspection; such a file
      is tied to this machine's CPU and onnxruntime version, so adaptsoup does not ship it).

    The same settings in a user's own server::

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 4
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = onnxruntime.InferenceSession("model.onnx", options, providers=["CPUExecutionProvider"])
    """
    import onnxruntime as ort

    options = session_options(threads, optimized_model_path, spin)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors (InvalidProtobuf, Fail, ...) share no base class
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise AdaptsoupError(f"cannot load ONNX model {path} (garbage, truncated or empty?): {reason}") from None


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, object]:
    """Class names and preprocessing stored by :func:`export_onnx`, read from the file's metadata properties
    alone: no onnxruntime session, no parsing of the weights (:mod:`adaptsoup.deploy.onnx_props`)."""
    props = read_metadata_props(path)
    if "adaptsoup.input_size" not in props:
        raise AdaptsoupError(f"{path} was not exported by adaptsoup (no preprocessing metadata)")

    def value(key: str, default: str | None = None, count: int | None = None) -> Any:
        try:
            got = json.loads(props[key] if default is None else props.get(key, default))
            if count is not None and not (isinstance(got, list) and len(got) == count and all(isinstance(v, (int, float)) for v in got)):
                raise ValueError(f"expected {count} numbers")
            return got
        except (KeyError, ValueError, TypeError) as exc:
            raise AdaptsoupError(f"{path}: bad adaptsoup metadata {key!r} ({str(exc).splitlines()[0][:100]})") from None

    names, crop = value("adaptsoup.class_names", "[]"), value("adaptsoup.crop_pct", "1.0")
    if not isinstance(names, list) or not isinstance(crop, (int, float)) or isinstance(crop, bool) or not 0 < crop <= 1:
        raise AdaptsoupError(f"{path}: bad adaptsoup metadata (class_names must be a list, crop_pct a number in (0, 1])")
    return {
        "arch": props.get("adaptsoup.arch", ""),
        "class_names": [str(n) for n in names],
        "input_size": tuple(value("adaptsoup.input_size", count=3)),
        "mean": tuple(value("adaptsoup.mean", count=3)),
        "std": tuple(value("adaptsoup.std", count=3)),
        "interpolation": props.get("adaptsoup.interpolation", "bicubic"),
        "crop_pct": float(crop),
    }


def onnx_logits(session, batch: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The session's first output over ``batch`` (float32), ``batch_size`` rows at a time."""
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: batch[i : i + batch_size].astype(np.float32)})[0] for i in range(0, len(batch), batch_size)]
    return np.concatenate(outs, axis=0)


@contextlib.contextmanager
def quiet():
    """Swallow the warnings, prints and torch log lines that the exporters and the quantizer emit."""
    torch_logger = logging.getLogger("torch")
    level = torch_logger.level
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch_logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            torch_logger.setLevel(level)
