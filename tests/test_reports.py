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
