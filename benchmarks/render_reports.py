"""Re-render the Markdown reports of ``benchmarks/results`` from their JSON, with the current renderers.

    python -m adaptsoup_bench.render_reports [--results DIR] [--check]

Each ``<name>.json`` a benchmark writes holds everything its report shows; this writes ``<name>.md`` again
from it (``--check``: only list the reports that would change), in ``DIR`` and its subfolders. A result's
``notes`` (a string or a list of strings: its reading, and what a reader must know that the run could not
record) close its report, so a figure and its explanation stay in step: edit the notes in the JSON, then
re-render. The plots are left alone, and so are the reports with no JSON beside them (``HAND_KEPT``: what a
command printed, kept by hand).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from adaptsoup.core.io import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"

# Reports of commands that write no result file (a demo's transcript, a timing table made by hand).
HAND_KEPT = ("demo.md", "scaling_out.md", "reference_stock.md")


def throughput_markdown(result: dict) -> str:
    """``throughput.md`` as ``benchmarks/throughput.py`` writes it."""
    machine = result["machine"]
    lines = [f"Command: `{result['command']}` on {machine['cpu']} ({machine['cpu_count']} cores, {machine['torch_threads']} torch threads)", "",
             "| stage | dtype | images/s | GFLOP/image (fwd+bwd) | achieved GFLOP/s | measured matmul GFLOP/s | MFU |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['dtype']} | {r['images_per_s']} | {r['gflop_per_image']} | {r['achieved_gflops']} | "
              f"{r['peak_matmul_gflops']} | {r['mfu']:.0%} |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


def static_calibration_markdown(result: dict) -> str:
    """``static_calibration.md`` as ``python -m adaptsoup_bench.static_calibration`` writes it."""
    lines = ["# Static int8 calibration, chosen on held-out training images", "", f"Command: `{result['command']}`  ",
             f"Commit {result['commit']}{' (with uncommitted changes)' if result['source_dirty'] else ''}, {result['cpu']}, "
             f"stock {result['stock']}: calibrated on {result['calibration_images']} seeded CIFAR-10 training images, compared with fp32 on "
             f"{result['check_images']} other training images (no labels, no test images).", "",
             "| calibration | top-1 agreement with fp32 (%) | mean abs logit diff | max abs logit diff |", "|---|---|---|---|"]
    lines += [f"| {m} | {r['top1_agreement']:.2f} | {r['mean_abs_diff']:.5f} | {r['max_abs_diff']:.4f} |" for m, r in result["rows"].items()]
    lines += ["", f"Closest to fp32: **{result['closest_to_fp32']}**."]
    return "\n".join(lines) + "\n"


def by_name(stem: str) -> Callable[[dict], str] | None:
    """The renderer of a result whose JSON names no ``benchmark``: the measurements of issue #16, by file name."""
    if stem == "deploy_speed":
        from adaptsoup_bench.deploy_speed_report import markdown

        return lambda result: markdown(result) + "\n"  # as deploy_speed.py writes it
    if stem in ("precision_speed", "predict_speed", "soup_memory"):
        import importlib

        return importlib.import_module(f"adaptsoup_bench.{stem}").markdown
    if stem == "tuning_protocol":
        from adaptsoup_bench.tune_protocol import markdown

        return markdown
    return {"throughput": throughput_markdown, "static_calibration": static_calibration_markdown}.get(stem)


def renderer(benchmark: str, stem: str = "") -> Callable[[dict], str] | None:
    """The function that renders a result of ``benchmark`` (its JSON's ``benchmark`` field; without one, the
    file's name ``stem`` decides), notes included, if there is one."""
    if benchmark in ("c10c", "imagenet-c", "laion-c"):
        from adaptsoup_bench.shift import markdown_table

        return markdown_table  # it closes the report with the notes itself (shift_report.notes_markdown)
    if benchmark == "ingredient-families":
        from adaptsoup_bench.families import markdown_table as render
    elif benchmark == "label-free":
        from adaptsoup_bench.label_free import markdown as render
    elif benchmark == "decision":
        from adaptsoup_bench.decision import markdown as render
    elif benchmark == "tta-stream":
        from adaptsoup_bench.tta_stream_report import markdown as render
    elif benchmark:
        return None
    else:
        render = by_name(stem)
        if render is None:
            return None
    return with_notes(render)


def with_notes(render: Callable[[dict], str]) -> Callable[[dict], str]:
    """``render`` with the result's notes at the end of the report, never where ``render`` itself puts them."""
    from adaptsoup_bench.shift_report import notes_markdown

    return lambda result: notes_markdown(render({**result, "notes": []}), result)


def render_reports(results: Path = RESULTS, write: bool = True) -> dict[Path, str]:
    """``{report path: new text}`` for every report whose text would change; written unless ``write`` is False."""
    changed = {}
    for source in sorted(results.rglob("*.json")):
        result = json.loads(source.read_text(encoding="utf-8"))
        render = renderer(result.get("benchmark", ""), source.stem) if isinstance(result, dict) else None
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
