"""Re-render the Markdown reports of ``benchmarks/results`` from their JSON, with the current renderers.

    python -m adaptsoup_bench.render_reports [--results DIR] [--check]

Each ``<name>.json`` written by ``adaptsoup bench c10c | families | label-free`` holds everything its report
shows; this writes ``<name>.md`` again from it (``--check``: only list the reports that would change).
The plots and ``throughput.md`` are left alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from adaptsoup.core.io import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def renderer(benchmark: str) -> Callable[[dict], str] | None:
    """The function that renders a result of ``benchmark`` (its JSON's ``benchmark`` field), if there is one."""
    if benchmark == "ingredient-families":
        from adaptsoup_bench.families import markdown_table

        return markdown_table
    if benchmark == "label-free":
        from adaptsoup_bench.label_free import markdown

        return markdown
    if benchmark in ("c10c", "imagenet-c", "laion-c"):
        from adaptsoup_bench.shift import markdown_table

        return markdown_table
    return None


def render_reports(results: Path = RESULTS, write: bool = True) -> dict[Path, str]:
    """``{report path: new text}`` for every report whose text would change; written unless ``write`` is False."""
    changed = {}
    for source in sorted(results.glob("*.json")):
        result = json.loads(source.read_text(encoding="utf-8"))
        render = renderer(result.get("benchmark", "")) if isinstance(result, dict) else None
        if render is None:
            continue
        report, text = source.with_suffix(".md"), render(result)
        if not report.is_file() or report.read_text(encoding="utf-8") != text:
            changed[report] = text
            if write:
                write_text_atomic(report, text)
    return changed


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m adaptsoup_bench.render_reports", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of <name>.json results (default: benchmarks/results)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a report is out of date")
    args = ap.parse_args(argv)
    changed = render_reports(args.results, write=not args.check)
    for report in changed:
        print(("out of date: " if args.check else "rewrote ") + str(report))
    if args.check and changed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
