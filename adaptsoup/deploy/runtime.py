"""onnxruntime on the CPU: a quiet session, batched logits, and a context that silences exporter chatter."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

import numpy as np


def ort_session(path: str | os.PathLike):
    """A CPU onnxruntime session that logs only errors."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors (InvalidProtobuf, Fail, ...) share no base class
        from adaptsoup.errors import AdaptsoupError

        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise AdaptsoupError(f"cannot load ONNX model {path} (garbage, truncated or empty?): {reason}") from None


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
