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


def ort_session(path: str | os.PathLike):
    """A CPU onnxruntime session that logs only errors."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
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


def threaded_session(path: str | os.PathLike, threads: int, spin: bool = False):
    """:func:`ort_session` with ``threads`` intra-op threads and one inter-op thread, for ``predict``.

    ``spin=False`` stops the idle intra-op threads from busy-waiting for the next run, which would take the
    cores from the threads that decode the next batch meanwhile.  (Fold into :func:`ort_session` once it takes
    a thread count.)
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - as in ort_session
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise AdaptsoupError(f"cannot load ONNX model {path} (garbage, truncated or empty?): {reason}") from None
