"""The report of the fair-stream TTA benchmark (:mod:`adaptsoup_bench.tta_stream`), rendered from its results JSON
(``python -m adaptsoup_bench.render_reports`` renders it again; the notes close it there)."""

from __future__ import annotations


def wall(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.1f} min"


def cell(row: dict | None) -> str:
    if row is None:
        return "—"
    g = row["gain"]
    return f"{row['accuracy']:.2f} ({g['mean']:+.2f} [{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}]) · {wall(row['wall_s'])}"


def labels(out: dict) -> list[str]:
    """The methods' row labels in the command's order, each followed by its guard variant if it ran, then the others
    (FOA's) in the order they ran."""
    ran = list(dict.fromkeys(r["label"] for r in out["rows"]))
    known = [label for m in out["methods"] for label in (m, f"{m}+guard") if label in ran]
    return known + [label for label in ran if label not in known]


def lr_of(out: dict, label: str) -> str:
    lr = next((r.get("base_lr") for r in out["rows"] if r["label"] == label), None)
    return "—" if lr is None else f"{lr:.2e}"


def lookup(out: dict) -> dict[tuple[str, str, str], dict]:
    return {(r["soup"], r["label"], r["setting"]): r for r in out["rows"]}


def main_table(out: dict) -> list[str]:
    rows, settings = lookup(out), out["settings"]
    lines = ["## Table 2: online accuracy (%), gain over the soup without TTA [95% CI], wall time", "",
             "| soup | method | lr | " + " | ".join(settings) + " |", "|---|---|---|" + "---|" * len(settings)]
    for soup in out["soups"]:
        base = out["baseline"][soup]["accuracy"]
        lines.append(f"| {soup} | none (the soup) | — | " + " | ".join(f"{base:.2f}" for _ in settings) + " |")
        for label in labels(out):
            lines.append(f"| {soup} | {label} | {lr_of(out, label)} | "
                         + " | ".join(cell(rows.get((soup, label, s))) for s in settings) + " |")
    return lines + [""]


def resets_table(out: dict) -> list[str]:
    rows, settings = lookup(out), out["settings"]
    lines = ["Resets (the method's own / the drift guard's) and images per second of each run:", "",
             "| soup | method | " + " | ".join(settings) + " |", "|---|---|" + "---|" * len(settings)]
    for soup in out["soups"]:
        for label in labels(out):
            cells = []
            for s in settings:
                r = rows.get((soup, label, s))
                cells.append("—" if r is None else f"{r['resets']['method']} / {r['resets']['guard']} · {r['images_per_s']:.0f}/s")
            lines.append(f"| {soup} | {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def per_corruption_table(out: dict, setting: str = "reset") -> list[str]:
    rows, corruptions = lookup(out), out["corruptions"]
    if not any(r["setting"] == setting for r in out["rows"]):
        return []
    lines = [f"Online accuracy (%) per corruption, {setting} setting:", "",
             "| soup | method | " + " | ".join(corruptions) + " |", "|---|---|" + "---|" * len(corruptions)]
    for soup in out["soups"]:
        lines.append(f"| {soup} | none (the soup) | " + " | ".join(f"{out['baseline'][soup]['per_corruption'][c]:.1f}" for c in corruptions) + " |")
        for label in labels(out):
            r = rows.get((soup, label, setting))
            if r is not None:
                lines.append(f"| {soup} | {label} | " + " | ".join(f"{r['per_corruption'][c]:.1f}" for c in corruptions) + " |")
    return lines + [""]


def tuning_table(out: dict) -> list[str]:
    t = out.get("tuning")
    if not t:
        return []
    factors = [f"{f:g}" for f in t["lr_factors"]]
    lines = [f"## The learning rates, chosen here: mean online accuracy (%) on {t['soup']}, {', '.join(t['settings'])} setting(s)", "",
             "| method | default base lr | " + " | ".join(f"× {f}" for f in factors) + " | chosen base lr |",
             "|---|---|" + "---|" * len(factors) + "---|"]
    for m, scores in t["scores"].items():
        chosen = f"{t['chosen_factor'][m]:g}"
        shown = [f"**{scores[f]:.2f}**" if f == chosen else f"{scores[f]:.2f}" for f in factors]
        lines.append(f"| {m} | {t['base_lr'][m] / t['chosen_factor'][m]:.2e} | " + " | ".join(shown) + f" | {t['base_lr'][m]:.2e} |")
    return lines + [""]


def markdown(out: dict) -> str:
    m = out["machine"]
    dirty = " (with uncommitted changes)" if out["source_dirty"] else ""
    older = sorted({r.get("commit") for r in out["rows"] if r.get("commit") and r.get("commit") != out["commit"]})
    lines = [f"# Fair-stream TTA on CIFAR-10-C: {out['split']} split, severity {out['severity']}, "
             f"{out['per_corruption']:,} images per corruption ({out['stream_size']})", "",
             f"Command: `{out['command']}`  ",
             f"Commit {out['commit'][:7]}{dirty}, {m.get('cpu', '?')}, {out['threads']} torch threads; "
             f"total {out['timings_s']['total'] / 60:.1f} min." + (f" Runs resumed from commit(s) {', '.join(c[:7] for c in older)}." if older else ""),
             "",
             f"Streams: {len(out['corruptions'])} corruptions × {out['per_corruption']:,} test images, batches of {out['batch_size']}, "
             "each predicted before its update; `reset` starts every corruption from the soup, `continual` shows the corruptions "
             "in their fixed order without a reset, `mixed` shuffles every (corruption, image) pair. Learning rates from "
             f"`{out['choice']}`.", ""]
    lines += main_table(out) + resets_table(out) + per_corruption_table(out) + tuning_table(out)
    return "\n".join(lines).rstrip("\n") + "\n"
