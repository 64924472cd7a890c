"""Rich progress bars with ETA (and a silent stand-in when progress is off)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, soft_wrap=True)


class NullProgress:
    """Same interface as ``rich.progress.Progress`` for the parts adaptsoup uses; does nothing."""

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        return 0

    def advance(self, task: int, advance: float = 1) -> None:
        pass

    def update(self, task: int, **kwargs) -> None:
        pass

    def remove_task(self, task: int) -> None:
        pass

    def log(self, *args, **kwargs) -> None:
        pass


@contextlib.contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Progress | NullProgress]:
    """A live progress display on stderr; plain-text logs keep working while it runs."""
    if not enabled:
        yield NullProgress()
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    with progress:
        yield _InfoProgress(progress)


class _InfoProgress:
    """Wraps rich Progress so every task has an ``info`` field (loss, throughput) shown next to the bar."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        fields.setdefault("info", "")
        return self._progress.add_task(description, total=total, **fields)

    def advance(self, task: int, advance: float = 1) -> None:
        self._progress.advance(task, advance)

    def update(self, task: int, **kwargs) -> None:
        self._progress.update(task, **kwargs)

    def remove_task(self, task: int) -> None:
        self._progress.remove_task(task)

    def log(self, *args, **kwargs) -> None:
        self._progress.console.log(*args, **kwargs)
