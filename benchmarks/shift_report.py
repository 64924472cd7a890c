"""The reports of the shift benchmarks: the results' markdown tables (:func:`markdown_table`, also what
``render_reports`` re-renders), the plots, writing a finished result, and the paired comparisons of an older
result recomputed from its work folder (:func:`paired_from_work`)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from adaptsoup.core.io import atomic_path, write_json_atomic, write_text_atomic
from adaptsoup.core.manifest import provenance_lines
from adaptsoup_bench.shift_config import PAIRS, TITLES, sar_base, sar_base_lr
from adaptsoup_bench.shift_eval import load_correct
from adaptsoup_bench.shift_stats import paired_comparisons


def write_results(result: dict, out: Path, stem: str, log: Callable[[str], None] = print) -> None:
    """``out/<stem>.json``, its markdown table ``.md`` and the two plots."""
    write_json_atomic(out / f"{stem}.json", result)
    write_text_atomic(out / f"{stem}.md", markdown_table(result))
    plot_results(result, out / f"{stem}_per_corruption.png", out / f"{stem}_soups_vs_ingredients.png")
    log(f"wrote {out / stem}.json, .md and plots in {result['wall_time_s']:.0f}s")


def markdown_table(result: dict) -> str:
    def fmt(v):
        return "—" if v is None or (isinstance(v, float) and v != v) else f"{v:.2f}"

    lines = [
        f"# {TITLES.get(result['benchmark'], result['benchmark'])}, severity {result['severity']} ({result['mode']} mode)",
        "",
        *provenance_lines({**result, "notes": []}),  # the notes close the report (notes_markdown)
        "",
        *([f"Protocol **{result['protocol']}**"
           + (f" (every ingredient, supervised ones too, LP-FT from the pre-trained stock `{Path(result['pretrained']).name}`)"
              if result.get("pretrained") else " (ingredients made from the deployed model)")
           + (f"; split **{result['split']['used']}**: {result['split']['corrupted']}; {result['split']['clean']}."
              if result.get("split", {}).get("used", "all") != "all" else "."), ""] if "protocol" in result else []),
        "| row | clean | disjoint (odd images, mean over corruptions) | joint (even images) |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {fmt(r['clean'])} | {fmt(r['disjoint'])} | {fmt(r['joint'])} |")
    lines += ["", "Per corruption (disjoint, odd images):", "",
              "| row | " + " | ".join(result["rows"][0]["per_corruption"]) + " |",
              "|---|" + "---|" * len(result["rows"][0]["per_corruption"])]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | " + " | ".join(fmt(v) for v in r["per_corruption"].values()) + " |")
    by_name = {r["name"]: r for r in result["rows"]}
    sar_rows = [r for r in result["rows"] if sar_base(r) in by_name]
    if sar_rows:
        lines += ["", "Table 2 — test-time adaptation (SAR, online over each corruption's odd images, restarted from "
                      "the soup for every corruption):", "",
                  "| soup | SAR lr per 64 images | without SAR | with SAR | change | worst corruption change | corruptions below −1 point |",
                  "|---|---|---|---|---|---|---|"]
        for with_sar in sar_rows:
            n = sar_base(with_sar)
            r = by_name[n]
            change = result.get("checks", {}).get(f"{with_sar['name']}_change", {})
            worst = f"{change['worst']:+.2f} ({change['worst_corruption']})" if change else "—"
            below = (", ".join(change["below_tolerance"]) or "none") if change else "—"
            base_lr = sar_base_lr(with_sar, result["config"])
            lr = f"{base_lr:g}" if base_lr is not None else "reference"
            lines.append(f"| {n} | {lr} | {fmt(r['disjoint'])} | {fmt(with_sar['disjoint'])} | "
                         f"{with_sar['disjoint'] - r['disjoint']:+.2f} | {worst} | {below} |")
    if result.get("paired"):
        first = next(iter(next(iter(result["paired"].values())).values()))
        unit = (f"over the {first['clusters']:,} test images behind the {first['images']:,} evaluation images (each test image "
                "with all its corruptions)" if first.get("clusters", first["images"]) < first["images"] else "over evaluation images")
        lines += ["", f"Paired differences (row minus row, percentage points; 95% percentile bootstrap {unit}, "
                      f"{first['resamples']:,} resamples):", "",
                  "| comparison | disjoint (odd images, pooled) | 95% CI | clean | 95% CI |", "|---|---|---|---|---|"]
        for key, entry in result["paired"].items():
            cells = []
            for where in ("disjoint", "clean"):
                e = entry.get(where)
                cells += [f"{e['mean']:+.2f}", f"[{e['ci95'][0]:+.2f}, {e['ci95'][1]:+.2f}]"] if e else ["—", "—"]
            lines.append(f"| {key.replace('-', ' − ', 1)} | " + " | ".join(cells) + " |")
    checks = result.get("checks", {})
    if "deployed_near_chance" in checks:
        near = checks["deployed_near_chance"]
        lines += ["", f"Deployed model within {checks['chance_margin']:g} points of chance ({checks['chance']:g}%) on: "
                      f"{', '.join(near) if near else 'no corruption'}."]
    cost = result.get("self_season_cost")
    if cost:
        lines += ["", f"Self-Seasoning: {cost['ingredients']} ingredients stacked once ({cost['stacked_mb']} MB), "
                      f"{cost['epochs']} epochs over {cost['subset']} target images in {cost['wall_s']:.0f} s; "
                      f"process RSS peak {cost.get('rss_peak_mb')} MB (+{cost.get('rss_rise_mb')} MB during the stage)."]
    lines += estimates_lines(result.get("estimates"))
    lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in result["timings_s"].items()), ""]
    return notes_markdown("\n".join(lines), result)


def estimates_lines(estimates: dict | None) -> list[str]:
    """The label-free estimates and the deploy rule's outcome (the ``estimates`` entry), as Markdown lines."""
    if not estimates:
        return []
    if "skipped" in estimates:
        return ["", f"Label-free estimates: none ({estimates['skipped']})."]
    g, rule = estimates["gate"], estimates["rule"]
    lines = ["", f"Deploy decision without labels (rule: margin {rule['margin']:g} points, voters {', '.join(rule['estimators'])}; "
                 f"candidates {', '.join(estimates['candidates'])}; estimators fitted on {estimates['validation_images']:,} "
                 "labeled clean images none of the corrupted ones come from), scored on the odd images:", "",
             "| what is deployed | mean accuracy (%) |", "|---|---|",
             f"| the rule's choice per corruption | {g['chosen']:.2f} |", f"| always the deployed model | {g['deployed']:.2f} |",
             f"| always {estimates['primary']} | {g['always_candidate']:.2f} |", f"| oracle (best per corruption) | {g['oracle']:.2f} |",
             "", f"Worst regret against the deployed model {g['worst_regret_vs_deployed']:.2f} points; switched on {g['switched']} "
                 f"corruption(s); picked the oracle's model on {100 * g['picked_right']:.0f}%. One pooled decision: "
                 f"{g['pooled']['chosen']} ({g['pooled']['accuracy']:.2f}%).", "",
             "| estimator | mean absolute error on target accuracy (points) | 95% CI over corruptions | abstained |", "|---|---|---|---|"]
    for name, e in estimates["estimators"].items():
        lines.append(f"| {name} | {e['mae']:.2f} | [{e['ci95'][0]:.2f}, {e['ci95'][1]:.2f}] | {e['abstained']} |" if e["mae"] is not None
                     else f"| {name} | — | — | {e['abstained']} |")
    return lines


def result_notes(result: dict) -> list[str]:
    """A result's ``notes`` (a string or a list of strings) as a list."""
    notes = result.get("notes") or []
    return [notes] if isinstance(notes, str) else list(notes)


def notes_markdown(text: str, result: dict) -> str:
    """``text``, a report, closed by the result's notes: its reading (what the figures say) and what a reader must
    know that the run could not record (a rename, an earlier default, how the run was stopped and resumed).
    Each note is a Markdown paragraph (or block: a table, a list); a result without notes renders as ``text``."""
    notes = result_notes(result)
    if not notes:
        return text
    return text.rstrip("\n") + "\n\n## Notes\n\n" + "\n\n".join(note.strip("\n") for note in notes) + "\n"


def plot_results(result: dict, per_corruption_png: Path, soups_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    corruptions = list(rows[0]["per_corruption"])
    fig, ax = plt.subplots(figsize=(max(8, len(corruptions) * 0.9), 4))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar(np.arange(len(corruptions)) + i * width, [r["per_corruption"][c] for c in corruptions], width, label=r["name"])
    ax.set_xticks(np.arange(len(corruptions)) + 0.4 - width / 2, corruptions, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("top-1 (%) on odd images")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"{TITLES.get(result['benchmark'], result['benchmark'])}, severity {result['severity']} ({result['mode']})")
    fig.tight_layout()
    with atomic_path(per_corruption_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    ing = result["ingredients"]
    def x_of(v):  # without a clean set, soups and ingredients are drawn in one column
        return 0.0 if v is None else v

    ax.scatter([x_of(v["clean"]) for v in ing.values()], [v["disjoint"] for v in ing.values()], label="self-soup ingredients", color="gray")
    for r in rows:
        if not r["name"].endswith("best_ingredient") and "sar" not in r:  # SAR rows have no clean accuracy
            ax.scatter([x_of(r["clean"])], [r["disjoint"]], label=r["name"], marker="*", s=120)
    ax.set_xlabel("clean top-1 (%)" if result["stock"]["clean_acc"] is not None else "(no clean set)")
    ax.set_ylabel("shifted top-1 (%), disjoint (odd) images")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(soups_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def paired_from_work(result: dict) -> dict:
    """A finished c10c result's paired comparisons recomputed from its work folder (the per-image correctness
    and the generated images' names), bootstrapped over test images: for results written before the bootstrap
    resampled test images rather than evaluation images."""
    from adaptsoup.core.data import scan_labeled

    cfg = result["config"]
    work = Path(result["runs"]["self"]).parent.parent
    correct = load_correct(work / f"correct_{result['protocol']}.npz")
    corrupted = work / "data" / f"n{cfg['per_corruption']}-seed{cfg['seed']}" / "odd"
    stems = {"disjoint": [p.stem for c in result["data"]["corruptions"] for p in scan_labeled(corrupted / c)[0]]}
    clean = work / "data" / f"clean-n{cfg['clean_images']}-seed{cfg['seed']}"
    if clean.is_dir():
        stems["clean"] = [p.stem for p in scan_labeled(clean)[0]]
    clusters = {where: np.asarray(ids) for where, ids in stems.items()}
    return paired_comparisons(correct, PAIRS, resamples=cfg.get("bootstrap_resamples", 10000), seed=cfg["seed"], clusters=clusters)
