"""Issue #13: does the Self-Soup beat the supervised soup when both are made the paper's way (from the pre-trained
stock)?  Named variants of ``bench c10c`` on the *tuning* split only (never the report split).

    python benchmarks/tune_protocol.py [VARIANT ...]      # run these (default: all), in order, then render
    python benchmarks/tune_protocol.py --render           # only re-render the summary from finished variants
    python benchmarks/tune_protocol.py --list

Each variant is a set of :class:`adaptsoup_bench.shift.BenchConfig` overrides on top of :data:`BASE`, run with its own
``--label``; bench work folders are digests of the settings, so a rerun resumes, and inter-trained encoders and
vanilla ingredients are shared between variants that agree on the settings that shape them.  Per variant the
bench writes ``benchmarks/results/tuning_protocol/c10c_quick_s3_<label>.{json,md}`` (+ plots); the summary
(``benchmarks/results/tuning_protocol.{json,md}`` and ``tuning_protocol_*.png``) is rendered from those JSONs,
whose per-image correctness (``per_image_correct``, an ``.npz`` in the work folder) holds the paired intervals.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adaptsoup_bench.shift import BenchConfig, markdown_table, paired_from_work, results_stem, run_c10c  # noqa: E402
from adaptsoup.core.io import atomic_path, write_json_atomic, write_text_atomic  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
VARIANT_OUT = OUT / "tuning_protocol"

# Shared by every variant: the tuning split at its default severity (3), 400 test images per corruption (200
# odd = 3,000 evaluation images pooled over the 15 corruptions; 200 even per corruption = 3,000 target images),
# 1,000 clean images, 5,000 source images, two inter-training learning rates (the paper's grid's ends) x one
# fine-tuning learning rate, two vanilla ingredients; no SAR and no centred Self-Seasoning (not the question).
# No joint (even-image) evaluation and no continued-SSL soup but in the variants that say so: the CPU is shared
# with other work during this study, so every variant is sized to the minimum that answers its question.
BASE = dict(split="tuning", per_corruption=400, clean_images=1000, source_images=5000, inter_lrs=[1e-5, 3e-5], vanilla=2,
            sar=False, centered=False, joint=False, cont_ssl=False, self_season_epochs=1)
FT_LR = 5e-4  # chosen on the tuning split from b-ft1e-4 vs b-ft5e-4 (the supervised soup's accuracy), see the summary
STEPS = 150  # the 1:1 point: inter-training steps = fine-tuning steps (batch 64)

VARIANTS: dict[str, dict] = {
    # (b) from the pre-trained stock at 1:1 inter-training / fine-tuning steps, at two fine-tuning lrs (1e-4, the
    # bench's; 5e-4, the stock's own fine-tune): the supervised soup's accuracy picks FT_LR for everything after
    # (run first, with 3 Self-Seasoning epochs; 125 s of the CPU for a loss that stayed flat, so 1 after them)
    "b-ft1e-4": dict(protocol="pretrained", inter_steps=STEPS, ft_steps=STEPS, ft_lrs=[1e-4], self_season_epochs=3),
    "b-ft5e-4": dict(protocol="pretrained", inter_steps=STEPS, ft_steps=STEPS, ft_lrs=[5e-4], self_season_epochs=3),
    # (a) today's from-deployed quick recipe (two fine-tuning lrs, 200 + 60 steps) on the tuning split
    "a-deployed": dict(protocol="deployed", inter_steps=200, ft_steps=60, ft_lrs=[1e-4, 2e-4]),
    # (c) + (d) in one curve: inter-training steps 150 / 300 / 600 at a fixed fine-tuning budget of 150 steps, i.e. a
    # fine-tuning budget of 1x / 0.5x / 0.25x the inter-training (150 is b-ft<FT_LR>); does the gain grow with steps?
    "d-inter300": dict(protocol="pretrained", inter_steps=2 * STEPS, ft_steps=STEPS, ft_lrs=[FT_LR]),
    "d-inter600": dict(protocol="pretrained", inter_steps=4 * STEPS, ft_steps=STEPS, ft_lrs=[FT_LR]),
    # (c) literally: half the fine-tuning budget at 150 inter-training steps
    "c-ft0.5x": dict(protocol="pretrained", inter_steps=STEPS, ft_steps=STEPS // 2, ft_lrs=[FT_LR]),
    # (e) ideas: a higher fine-tuning lr for from-pretrained (b-ft5e-4: the stock's own fine-tuning lr), and the deployed
    # model as one more ingredient (the row self_plus_deployed_soup of every variant)
    # (e) task arithmetic instead of fine-tuning back: the row self_task_vector_soup = deployed + mean(inter-trained) −
    # pretrained, and its control cont_ssl_task_vector_soup (MAE on the source images). The same trained files as
    # b-ft5e-4 / d-inter600, evaluated again by the code that has these rows (adaptsoup bench c10c ... --label NAME)
    "b-ft5e-4_task-vector": dict(protocol="pretrained", inter_steps=STEPS, ft_steps=STEPS, ft_lrs=[5e-4], self_season_epochs=3),
    "d-inter600_task-vector": dict(protocol="pretrained", inter_steps=4 * STEPS, ft_steps=STEPS, ft_lrs=[FT_LR]),
    "e-task-vector-control-inter600": dict(protocol="pretrained", inter_steps=4 * STEPS, ft_steps=STEPS, ft_lrs=[FT_LR], cont_ssl=True),
}
# what a reader of the summary must know about a variant's run
NOTES = {
    "b-ft1e-4": "its wall time is the invocation that wrote the results: the first invocation trained every ingredient "
                "(about 25 min) and then stopped at an output bug (fixed in 93680d5); the rerun reused the trained files",
    "b-ft5e-4": "trained its inter-trained encoders again (same settings as b-ft1e-4's: the sharing of inter-trained "
                "encoders keyed them by the target's path inside each work folder until a later commit)",
    "d-inter600": "reused b-ft5e-4's vanilla ingredients (same fine-tuning settings)",
    "d-inter300": "reused b-ft5e-4's vanilla ingredients (same fine-tuning settings)",
}
ORDER = ["b-ft1e-4", "b-ft5e-4", "a-deployed", "d-inter600", "d-inter300", "c-ft0.5x", "b-ft5e-4_task-vector", "d-inter600_task-vector",
         "e-task-vector-control-inter600"]  # the order they were run in
ROWS = ("deployed", "supervised_soup", "cont_ssl_soup", "self_soup_target", "self_plus_supervised_soup", "self_soup_target_self_seasoned",
        "self_plus_deployed_soup", "self_soup_target_best_ingredient", "self_task_vector_soup", "cont_ssl_task_vector_soup")
KEY_PAIRS = ("self_soup_target-supervised_soup", "self_soup_target-deployed", "self_plus_supervised_soup-supervised_soup",
             "self_soup_target_self_seasoned-supervised_soup", "self_plus_deployed_soup-deployed", "self_task_vector_soup-deployed",
             "self_task_vector_soup-cont_ssl_task_vector_soup")


def config(name: str) -> BenchConfig:
    """The benchmark configuration of variant ``name``."""
    return BenchConfig.for_mode("quick", **{**BASE, **VARIANTS[name]}, out=str(VARIANT_OUT), label=name)


def result_path(name: str) -> Path:
    return VARIANT_OUT / f"{results_stem('c10c', config(name))}.json"


def run_variant(name: str) -> None:
    t0 = time.perf_counter()
    print(f"=== variant {name}: {VARIANTS[name]}", flush=True)
    run_c10c(config(name), command=f"python benchmarks/tune_protocol.py {name}",
             log=lambda line: print(line, flush=True))
    print(f"=== variant {name} done in {time.perf_counter() - t0:.0f}s", flush=True)


def summarise(name: str, result: dict) -> dict:
    """One variant's line of the summary: rows, key paired intervals, budget, wall time."""
    rows = {r["name"]: {"clean": r["clean"], "disjoint": r["disjoint"], "joint": r["joint"]} for r in result["rows"] if r["name"] in ROWS}
    return {
        "variant": name, "overrides": VARIANTS[name], "protocol": result["protocol"], "severity": result["severity"],
        "split": result["split"]["used"], "inter_steps": result["config"]["inter_steps"], "ft_steps": result["config"]["ft_steps"],
        "inter_lrs": result["config"]["inter_lrs"], "ft_lrs": result["config"]["ft_lrs"], "vanilla": result["config"]["vanilla"],
        "eval_images": {"disjoint": sum(v for k, v in result["data"]["eval_images"].items() if k.startswith("odd/")),
                        "clean": result["data"]["eval_images"].get("clean")},
        "rows": rows, "paired": {k: v for k, v in result.get("paired", {}).items() if k in KEY_PAIRS},
        "wall_time_s": result["wall_time_s"], "timings_s": result["timings_s"], "commit": result["commit"],
        "results": str(Path(result_path(name)).relative_to(ROOT)), "note": NOTES.get(name),
    }


def with_test_image_intervals(path: Path) -> dict:
    """The variant's result, its paired intervals bootstrapped over test images (each with its 15 corrupted copies).

    Results written before the bench resampled test images carry intervals over the 3,000 evaluation images,
    which treat the 15 corruptions of one test image as independent draws and come out too narrow; they are
    recomputed once from the work folder (:func:`paired_from_work`), written back with a note, and re-rendered.
    """
    result = json.loads(path.read_text())
    first = next(iter(next(iter(result.get("paired", {}).values()), {}).values()), {})
    work = Path(result["runs"]["self"]).parent.parent
    if not first or "clusters" in first or not (work / f"correct_{result['protocol']}.npz").is_file():
        return result
    recomputed = paired_from_work(result)
    result["paired"] = {k: recomputed[k] for k in result["paired"] if k in recomputed}  # the pairs this result had
    result.setdefault("notes", []).append("paired intervals recomputed over test images (each with its corrupted copies) by "
                                          "benchmarks/tune_protocol.py --render, from the run's per-image correctness")
    write_json_atomic(path, result)
    write_text_atomic(path.with_suffix(".md"), markdown_table(result))
    return result


def render() -> dict:
    done = {n: with_test_image_intervals(result_path(n)) for n in ORDER if result_path(n).is_file()}
    summary = {"question": "issue #13: Self-Soup vs supervised soup made the paper's way (from the pre-trained stock), tuning split only",
               "base": BASE, "ft_lr": FT_LR, "variants": [summarise(n, r) for n, r in done.items()]}
    write_json_atomic(OUT / "tuning_protocol.json", summary)
    write_text_atomic(OUT / "tuning_protocol.md", markdown(summary))
    plot(summary, OUT / "tuning_protocol_gain.png")
    return summary


def _f(v) -> str:
    return "—" if v is None or v != v else f"{v:.2f}"


def _ci(entry: dict | None, where: str = "disjoint") -> str:
    e = (entry or {}).get(where)
    return "—" if not e else f"{e['mean']:+.2f} [{e['ci95'][0]:+.2f}, {e['ci95'][1]:+.2f}]"


def markdown(summary: dict) -> str:
    lines = ["# Issue #13: the paper's protocol (from the pre-trained stock) on the tuning split", "",
             "CIFAR-10 → CIFAR-10-C, tuning split (first half of each class of the test set), severity 3. Every number below was "
             "measured by `python benchmarks/tune_protocol.py` (per-variant results in `benchmarks/results/tuning_protocol/`). "
             "Accuracies in %; differences in percentage points with 95% paired bootstrap intervals "
             "(10,000 resamples) over the 200 test images behind the 3,000 evaluation images (each test image with its 15 corrupted copies).", "",
             f"Shared settings: `{json.dumps(summary['base'])}`.", "",
             "| variant | protocol | inter steps | ft steps | ft lr | deployed | supervised soup | cont-SSL soup | Self-Soup | self+supervised | "
             "Self-Seasoned | self+deployed | Self-Soup − supervised (disjoint) | Self-Soup − deployed (disjoint) | wall (min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in summary["variants"]:
        r = v["rows"]
        cell = lambda n: _f(r.get(n, {}).get("disjoint"))  # noqa: E731
        lines.append(f"| {v['variant']} | {v['protocol']} | {v['inter_steps']} | {v['ft_steps']} | {', '.join(f'{x:g}' for x in v['ft_lrs'])} | "
                     + " | ".join(cell(n) for n in ROWS[:7])
                     + f" | {_ci(v['paired'].get('self_soup_target-supervised_soup'))} | {_ci(v['paired'].get('self_soup_target-deployed'))}"
                     + f" | {v['wall_time_s'] / 60:.1f} |")
    lines += [""] + [f"- {v['variant']}: {v['note']}." for v in summary["variants"] if v.get("note")]
    lines += ["", "Disjoint accuracy (odd images, mean over the 15 corruptions) above; clean accuracy (1,000 clean tuning images) below.", "",
              "| variant | " + " | ".join(ROWS[:7]) + " | Self-Soup − supervised (clean) |", "|---|" + "---|" * 8]
    for v in summary["variants"]:
        lines.append(f"| {v['variant']} | " + " | ".join(_f(v["rows"].get(n, {}).get("clean")) for n in ROWS[:7])
                     + f" | {_ci(v['paired'].get('self_soup_target-supervised_soup'), 'clean')} |")
    lines += ["", "Paired differences on the disjoint images:", "", "| variant | " + " | ".join(KEY_PAIRS) + " |", "|---|" + "---|" * len(KEY_PAIRS)]
    for v in summary["variants"]:
        lines.append(f"| {v['variant']} | " + " | ".join(_ci(v["paired"].get(k)) for k in KEY_PAIRS) + " |")
    tv = [v for v in summary["variants"] if "self_task_vector_soup" in v["rows"]]
    if tv:
        lines += ["", "Task arithmetic instead of fine-tuning back (idea e): `self_task_vector_soup` = deployed + mean(inter-trained "
                      "on the target) − pretrained; `cont_ssl_task_vector_soup`, its control, inter-trains on the source images. "
                      "No fine-tuning, no labels.", "",
                  "| variant | inter steps | deployed | self_task_vector_soup | cont_ssl_task_vector_soup | − deployed (disjoint) | "
                  "− deployed (clean) | − control (disjoint) |", "|---|---|---|---|---|---|---|---|"]
        for v in tv:
            r, pr = v["rows"], v["paired"]
            lines.append(f"| {v['variant']} | {v['inter_steps']} | {_f(r['deployed']['disjoint'])} ({_f(r['deployed']['clean'])}) | "
                         f"{_f(r['self_task_vector_soup']['disjoint'])} ({_f(r['self_task_vector_soup']['clean'])}) | "
                         + (f"{_f(r['cont_ssl_task_vector_soup']['disjoint'])} ({_f(r['cont_ssl_task_vector_soup']['clean'])})"
                            if "cont_ssl_task_vector_soup" in r else "—")
                         + f" | {_ci(pr.get('self_task_vector_soup-deployed'))} | {_ci(pr.get('self_task_vector_soup-deployed'), 'clean')} | "
                         f"{_ci(pr.get('self_task_vector_soup-cont_ssl_task_vector_soup'))} |")
    lines.append("")
    return "\n".join(lines)


def plot(summary: dict, png: Path) -> None:
    """Self-Soup (and self+supervised soup) − supervised soup, disjoint, with 95% intervals, from the pre-trained
    stock at FT_LR: against inter-training steps at STEPS fine-tuning steps, and against the ratio of fine-tuning
    to inter-training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre = [v for v in summary["variants"] if v["protocol"] == "pretrained" and v["ft_lrs"] == [summary["ft_lr"]]
           and "self_soup_target-supervised_soup" in v["paired"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = ((lambda v: v["inter_steps"], lambda v: v["ft_steps"] == STEPS, f"inter-training steps ({STEPS} fine-tuning steps)"),
              (lambda v: v["ft_steps"] / v["inter_steps"], lambda v: True, "fine-tuning budget / inter-training steps"))
    for ax, (x_of, keep, label) in zip(axes, panels):
        pts = sorted(((x_of(v), v) for v in pre if keep(v)), key=lambda p: p[0])
        for pair, colour in (("self_soup_target-supervised_soup", "C0"), ("self_plus_supervised_soup-supervised_soup", "C1")):
            xs = [x for x, v in pts if pair in v["paired"]]
            es = [v["paired"][pair]["disjoint"] for x, v in pts if pair in v["paired"]]
            if not xs:
                continue
            ax.errorbar(xs, [e["mean"] for e in es], yerr=[[e["mean"] - e["ci95"][0] for e in es], [e["ci95"][1] - e["mean"] for e in es]],
                        marker="o", capsize=3, color=colour, label=pair.replace("-", " − "))
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("difference, disjoint (points)")
        ax.legend(fontsize=7)
    fig.suptitle(f"From the pre-trained stock, ft lr {summary['ft_lr']:g}, tuning split (severity 3)")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", help=f"variants to run, in order (default: all): {', '.join(ORDER)}")
    ap.add_argument("--render", action="store_true", help="only re-render the summary from the finished variants")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        for n in ORDER:
            print(n, VARIANTS[n], "(done)" if result_path(n).is_file() else "")
        return
    unknown = [n for n in args.variants if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(ORDER)}")
    if not args.render:
        for name in args.variants or ORDER:
            run_variant(name)
            render()
    summary = render()
    print(markdown(summary))


if __name__ == "__main__":
    main()
