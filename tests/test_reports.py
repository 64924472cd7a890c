"""The committed benchmark reports: each is its JSON rendered by today's renderer, and says how the checkout was."""

from __future__ import annotations

import json
from pathlib import Path

from adaptsoup_bench.render_reports import RESULTS, render_reports

DIRTY_NOTE = "(with uncommitted changes)"


def test_committed_reports_are_rendered_from_their_json():
    stale = render_reports(RESULTS, write=False)
    assert not stale, "re-render with `python -m adaptsoup_bench.render_reports`: " + ", ".join(p.name for p in stale)


def test_a_run_on_a_dirty_checkout_says_so_in_its_report():
    """c10c_quick_s5 ran with uncommitted changes; its report did not say it."""
    checked = 0
    for source in sorted(RESULTS.glob("*.json")):
        result = json.loads(source.read_text(encoding="utf-8"))
        report = source.with_suffix(".md")
        if isinstance(result, dict) and "source_dirty" in result and report.is_file():
            assert (DIRTY_NOTE in report.read_text(encoding="utf-8")) == result["source_dirty"], report.name
            checked += 1
    assert checked >= 2


def test_rendering_a_result_dir_rewrites_only_stale_reports(tmp_path):
    source = RESULTS / "c10c_quick_s5.json"
    (tmp_path / source.name).write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "c10c_quick_s5.md").write_text("stale\n", encoding="utf-8")
    (tmp_path / "other.json").write_text(json.dumps({"command": "not a benchmark result"}), encoding="utf-8")
    assert set(render_reports(tmp_path)) == {tmp_path / "c10c_quick_s5.md"}
    assert DIRTY_NOTE in (tmp_path / "c10c_quick_s5.md").read_text(encoding="utf-8")
    assert render_reports(tmp_path) == {}
    assert not Path(tmp_path / "other.md").exists()


def test_sar_rows_written_before_they_recorded_their_lr_show_the_configs():
    from adaptsoup_bench.shift import sar_base_lr

    config = {"sar_base_lr": 5e-5, "sar_reference_base_lr": None}
    assert sar_base_lr({"name": "soup+sar"}, config) == 5e-5  # older results: the row ran at the config's lr
    assert sar_base_lr({"name": "soup+sar_reference_lr", "base": "soup"}, config) is None
    assert sar_base_lr({"name": "soup+sar", "base": "soup", "sar_base_lr": 1e-4}, config) == 1e-4


# Every report is its JSON rendered, notes (the reading) included (issue #24)


def test_every_committed_report_is_rendered_from_its_json_or_kept_by_hand():
    from adaptsoup_bench.render_reports import HAND_KEPT, renderer

    for report in sorted(RESULTS.rglob("*.md")):
        source = report.with_suffix(".json")
        if not source.is_file():
            assert report.name in HAND_KEPT and report.parent == RESULTS, f"{report.name}: a report with no JSON to render it from"
            continue
        result = json.loads(source.read_text(encoding="utf-8"))
        assert renderer(result.get("benchmark", ""), source.stem) is not None, f"{source.name}: no renderer"
    for name in HAND_KEPT:
        assert (RESULTS / name).is_file() and not (RESULTS / name).with_suffix(".json").exists()


def test_a_results_notes_close_its_report(tmp_path):
    from adaptsoup_bench.render_reports import renderer

    source = json.loads((RESULTS / "throughput.json").read_text(encoding="utf-8"))
    bare = renderer("", "throughput")({**source, "notes": []})
    assert "## Notes" not in bare
    for notes in ("One reading.", ["One reading.", "| a | table |\n|---|---|\n| 1 | 2 |"]):
        (tmp_path / "throughput.json").write_text(json.dumps({**source, "notes": notes}), encoding="utf-8")
        text = render_reports(tmp_path)[tmp_path / "throughput.md"]
        assert text.startswith(bare.rstrip("\n")) and text.endswith("\n")
        assert text[len(bare.rstrip("\n")):] == "\n\n## Notes\n\n" + "\n\n".join([notes] if isinstance(notes, str) else notes) + "\n"


def test_a_shift_report_ends_with_its_notes_not_under_its_command():
    result = json.loads((RESULTS / "c10c_full_s5_report.json").read_text(encoding="utf-8"))
    head, _, notes = (RESULTS / "c10c_full_s5_report.md").read_text(encoding="utf-8").partition("\n## Notes\n")
    assert notes.strip().split("\n\n") == [note.strip() for note in result["notes"]]
    assert "Wall time per stage" in head and result["notes"][0] not in head


# The READMEs (issue #24): sizes, commands, links, and no project history


ROOT = RESULTS.parent.parent
README, BENCH_README = ROOT / "README.md", ROOT / "benchmarks" / "README.md"


def test_readmes_stay_short_and_keep_the_two_commands():
    assert len(README.read_bytes()) <= 15_000 and len(BENCH_README.read_bytes()) <= 12_000
    text = README.read_text(encoding="utf-8")
    first_block = text.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
    assert "### Should I deploy it? The recommendation" in text and "--preset task-vector" in text


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    import re

    found, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            n = 0
            while (slug if n == 0 else f"{slug}-{n}") in found:
                n += 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def test_links_between_the_docs_and_the_results_resolve():
    import re

    pages = [README, BENCH_README, ROOT / "docs" / "reference.md", *sorted(RESULTS.rglob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


# The project's working history in the docs (issue #24); spelt so that the pattern does not match itself
HISTORY = (r"\bsess(?:ion)s? +\d|\b(this|last|previous|next|earlier|later) sess(?:ion)\b"
           r"|\bsess(?:ion)s? (ended|ends|began|begins)\b|\b(over|across|in) (two|three|four|several|\d+) sess(?:ion)s\b")


def test_the_docs_and_results_speak_of_runs_not_of_the_projects_history():
    import re

    pages = [p for p in ROOT.rglob("*.md") if ".venv" not in p.parts and "node_modules" not in p.parts]
    pages += sorted(RESULTS.rglob("*.json"))
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in pages for m in re.finditer(HISTORY, p.read_text(encoding="utf-8"), re.I)]
    assert hits == []
