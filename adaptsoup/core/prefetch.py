"""Decoding ahead: batches of images decoded and normalised in background threads while the caller runs a
model on the batch before.

``DecodeAhead(paths, preprocess, batch_size)`` yields the files in order, ``batch_size`` at a time, as
normalised float32 arrays.  At most ``ahead`` batches are decoded (or being decoded) beyond the one the caller
holds, so memory depends on the batch size, not on the number of files.  Files that cannot be decoded are
reported with their batch, never fatal (:func:`adaptsoup.core.data.decode_image`).  Pillow and numpy release
the GIL while they decode, resize and convert, so the threads overlap with a model run in onnxruntime.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from adaptsoup.core.data import Preprocess, UnreadableImage, decode_image, shown_path


@dataclass
class DecodedBatch:
    inputs: np.ndarray  # normalised float32 [B, 3, H, W] of the files that decoded (B may be 0)
    paths: list[Path]  # those files, in order
    unreadable: list[tuple[str, str]]  # (shown path, reason) of the files of this batch that did not decode
    files: int  # files in the batch, decoded or not


class Interrupted(Exception):
    """A decode stopped because the reader went away (an error or Ctrl-C in the caller)."""


class DecodeAhead:
    """``with DecodeAhead(paths, pre, 64, workers=1) as batches: for batch in batches: ...``

    ``workers`` threads decode one batch each; ``ahead`` (default ``workers + 1``) bounds the batches decoded
    beyond the caller's.  ``most_ahead`` records the largest number of batches that were started and not yet
    handed to the caller, at any moment: the memory bound, measured.
    """

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess, batch_size: int, workers: int = 1,
                 ahead: int | None = None) -> None:
        if batch_size < 1 or workers < 1 or (ahead is not None and ahead < 1):
            raise ValueError("batch_size, workers and ahead must be at least 1")
        self.chunks = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
        self.preprocess = preprocess
        self.workers = workers
        self.ahead = ahead or workers + 1
        self.most_ahead = 0
        self._started = 0  # batches whose decode began
        self._handed = 0  # batches given to the caller
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()

    def __enter__(self) -> "DecodeAhead":
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="adaptsoup-decode")
        return self

    def __exit__(self, *exc) -> None:
        """Stop the decoding: running batches stop at their next file, queued ones never start."""
        self._stop.set()
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __iter__(self) -> Iterator[DecodedBatch]:
        if self._pool is None:
            raise RuntimeError("DecodeAhead is used as a context manager: with DecodeAhead(...) as batches")
        queued = iter(self.chunks)
        for chunk in queued:
            self._pending.append(self._pool.submit(self._decode, chunk))
            if len(self._pending) == self.ahead:
                break
        while self._pending:
            batch = self._pending.popleft().result()
            with self._lock:
                self._handed += 1
            chunk = next(queued, None)
            if chunk is not None:
                self._pending.append(self._pool.submit(self._decode, chunk))
            yield batch

    def _decode(self, chunk: list[Path]) -> DecodedBatch:
        with self._lock:
            self._started += 1
            self.most_ahead = max(self.most_ahead, self._started - self._handed)
        h, w = self.preprocess.size
        images = np.empty((len(chunk), h, w, 3), dtype=np.uint8)
        kept: list[Path] = []
        unreadable: list[tuple[str, str]] = []
        for path in chunk:
            if self._stop.is_set():
                raise Interrupted()
            try:
                images[len(kept)] = decode_image(path, self.preprocess)
                kept.append(path)
            except UnreadableImage as exc:
                unreadable.append((shown_path(path), str(exc)))
        return DecodedBatch(self.preprocess.normalize_array(images[: len(kept)]), kept, unreadable, len(chunk))
