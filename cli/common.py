"""What every command module shares: the output consoles, one-line errors, flag parsers and row printers."""

from __future__ import annotations

import sys
from typing import List, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from adaptsoup.core.progress import console as progress_console

out = Console(soft_wrap=True, markup=False, highlight=False)
err = progress_console  # the progress bars draw on this console too, so log lines and bars do not collide


def log_line(line: str) -> None:
    """A library log line on stderr, as it is (no rich markup), above any progress bars."""
    err.print(line, markup=False, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``adaptsoup: error: MESSAGE`` on one line and exit (2: the user can fix it)."""
    err.print(f"adaptsoup: error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def command_line() -> str:
    """The command as the user typed it, for manifests and reports."""
    return "adaptsoup " + " ".join(sys.argv[1:])


def parse_floats(text: Optional[str], option: str) -> Optional[List[float]]:
    """A comma-separated list of numbers, or None when the flag was not given."""
    if text is None:
        return None
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        fail(f"{option} takes comma-separated numbers, got {text!r}")
    if not values:
        fail(f"{option} is empty")
    return values


def parse_ints(text: Optional[str], option: str, minimum: Optional[int] = None) -> Optional[List[int]]:
    """A comma-separated list of integers (each >= ``minimum``, if given), or None when the flag was not given."""
    values = parse_floats(text, option)
    if values is None:
        return None
    if any(v != int(v) for v in values):
        fail(f"{option} takes comma-separated integers, got {text!r}")
    if minimum is not None and any(v < minimum for v in values):
        fail(f"{option} takes integers >= {minimum}, got {text!r}")
    return [int(v) for v in values]


def parse_names(text: Optional[str]) -> Optional[List[str]]:
    """A comma-separated list of names (blanks dropped), or None when the flag was not given."""
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


def print_metrics(metrics: dict) -> None:
    """One table per eval folder: top-1 of the deployed model, each soup and each ingredient."""
    for eval_name, scores in metrics.items():
        table = Table(title=f"top-1 on {eval_name}")
        table.add_column("model")
        table.add_column("top-1 %", justify="right")
        for name, acc in sorted(scores.items(), key=lambda kv: (kv[0] not in ("deployed", "soup", "supervised_soup"), kv[0])):
            table.add_row(name, f"{acc:.2f}")
        out.print(table)


def print_rows(title: str, rows: list[dict], columns: tuple[str, ...]) -> None:
    """A benchmark's rows as a table: the row name, then each column's accuracy ('-' where it has none)."""
    table = Table(title=title)
    table.add_column("row")
    for col in columns:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["name"], *("-" if r.get(k) is None else f"{r[k]:.2f}" for k in columns))
    out.print(table)
