"""Measured memory of a stage: the process's peak resident set size while it runs.

``ru_maxrss`` only ever grows over the process's life, so it cannot tell one stage's peak from an earlier
one's.  :class:`PeakMemory` samples the current RSS (``/proc/self/statm`` on Linux) from a background thread
while a stage runs, and reports the peak and its rise over the RSS at the start of the stage.
"""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path

_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int | None:
    """The resident set size now, or None where ``/proc`` is not available."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """``with PeakMemory() as mem: ...`` then ``mem.peak_mb`` and ``mem.rise_mb`` (None where unmeasurable)."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.start: int | None = None
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = current_rss_bytes()
            if rss is not None and (self.peak is None or rss > self.peak):
                self.peak = rss

    def __enter__(self) -> "PeakMemory":
        self.start = self.peak = current_rss_bytes()
        if self.start is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        rss = current_rss_bytes()
        if rss is not None and self.peak is not None:
            self.peak = max(self.peak, rss)

    @property
    def peak_mb(self) -> float | None:
        return None if self.peak is None else round(self.peak / 2**20, 1)

    @property
    def rise_mb(self) -> float | None:
        return None if self.peak is None or self.start is None else round((self.peak - self.start) / 2**20, 1)

    def to_dict(self) -> dict:
        return {"rss_start_mb": None if self.start is None else round(self.start / 2**20, 1), "rss_peak_mb": self.peak_mb,
                "rss_rise_mb": self.rise_mb, "process_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
