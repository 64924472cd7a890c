"""The benchmark of the deploy decision (issue #21): label-free accuracy estimates against true accuracy,
shift by shift, and what the conservative rule would have deployed.

    python -m adaptsoup_bench.decision --result RESULT.json --choose          # tuning split: choose the rule
    python -m adaptsoup_bench.decision --result RESULT.json --rule RULE.json  # report split: the frozen rule, once

``RESULT.json`` is a finished ``bench c10c --protocol pretrained`` result (or ``--bench-config SETTINGS.json``,
the same settings as a JSON of ``BenchConfig`` fields, once its adapt runs are complete): its run
directories hold the models, its split names the images.  Per corruption (a "shift"), every model is run on

* the shift's even images: the unlabeled target the estimators see (and their true accuracy there, to
  score the estimators);
* the shift's odd images: the disjoint evaluation images the decision's outcome is scored on;
* the validation images: clean test images of the same split that are none of the corrupted images'
  originals (labeled, in-distribution, never trained on by any model).

Models: the deployed model; the candidates of ``adapt --preset task-vector`` (the task-vector soup at each
``--scales`` value, and its scales learned by ``mix --method self-season-tv``); the fine-tuned Self-Soup,
the supervised soup, their ingredients and the source-MAE control join agreement-on-the-line's pool but
are never deployed.  With ``--choose``, the candidate with the best mean accuracy on these (tuning)
evaluation images is the recipe's, and every rule of the grid (margin x voting estimators) is scored on
deploying it or keeping the deployed model; the rule that maximises the mean accuracy of what it deploys,
with a worst regret against the deployed model of at most ``MAX_REGRET`` points, is written with the
candidate to ``--rule-out``.  With ``--rule``, only that candidate and rule are scored.
The result's ``gate`` and ``estimators`` objects are issue #21's.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from adaptsoup.core.io import write_json_atomic, write_text_atomic
from adaptsoup.core.manifest import environment, source_state
from adaptsoup.estimate.config import ALL_ESTIMATORS, DecisionConfig

from adaptsoup_bench.decision_models import DEPLOYED, SELF_SEASONED, bench_models, cached_logits, open_bench_run, tv_name, validation_images
from adaptsoup_bench.decision_scoring import Shift, estimate_shift, estimator_errors, score_rule, shifts_from_logits

MAX_REGRET = 0.5  # points: the most the chosen rule may lose to the deployed model on any shift (issue #21)
MARGINS = (0.0, 0.5, 1.0, 2.0, 3.0)
VOTER_SETS = (("atc-ne",), ("doc",), ("cot",), ("aline-s",), ("atc-ne", "doc"), ("atc-ne", "doc", "cot"),
              ("atc-ne", "doc", "cot", "aline-s"), ALL_ESTIMATORS)


def shifts_of(logits: dict[str, dict[str, torch.Tensor]], data, corruptions: list[str]) -> list[Shift]:
    """Each corruption as a shift, and all of them pooled (one folder of mixed shifts, as a user would have)."""
    return shifts_from_logits(logits, {c: (data.evals[f"even/{c}"].labels, data.evals[f"odd/{c}"].labels) for c in corruptions})


def paired_differences(logits: dict, data, corruptions: list[str], primary: str, gate: dict | None) -> dict:
    """Paired 95% intervals over test images (each test image one cluster across the corruptions, as the c10c
    tables have them) on the evaluation images: the candidate and the rule's per-shift choices against the
    deployed model, and the rule against always deploying the candidate."""
    from adaptsoup_bench.shift_stats import image_ids, paired_bootstrap

    def correct(model_of) -> np.ndarray:
        return np.concatenate([(logits[model_of(c)][f"odd/{c}"].argmax(1) == data.evals[f"odd/{c}"].labels).numpy() for c in corruptions])

    clusters = image_ids(data.evals, corruptions)["disjoint"]
    deployed, candidate = correct(lambda c: DEPLOYED), correct(lambda c: primary)
    out = {f"{primary}-deployed": paired_bootstrap(candidate, deployed, clusters=clusters)}
    if gate is not None:
        rule = correct(lambda c: gate["per_shift"][c]["chosen"])
        out["rule-deployed"] = paired_bootstrap(rule, deployed, clusters=clusters)
        out[f"rule-{primary}"] = paired_bootstrap(rule, candidate, clusters=clusters)
    return out


def choose(scored: list[dict]) -> dict:
    """The rule deploying the best mean accuracy among those never losing more than MAX_REGRET to the deployed
    model on a shift and not below it on average; ties: the larger margin, then more voters."""
    safe = [r for r in scored if r["worst_regret_vs_deployed"] <= MAX_REGRET and r["chosen"] >= r["deployed"]]
    if not safe:
        return {"margin": float("inf"), "estimators": list(ALL_ESTIMATORS), "note": "no rule of the grid is safe: always keep the deployed model"}
    best = max(safe, key=lambda r: (round(r["chosen"], 6), r["rule"]["margin"], len(r["rule"]["estimators"])))
    return best["rule"]


# -- the command ---------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    bench = open_bench_run(args)
    data = bench.data
    work = bench.run.parent.parent / "decision"
    rule = json.loads(Path(args.rule).read_text()) if args.rule else None
    every = [tv_name(float(x)) for x in args.scales.split(",")] + [SELF_SEASONED]
    tv_candidates = every if args.logits_only else [rule["candidate"]] if rule else every
    models = bench_models(bench, tv_candidates, work)
    validation = validation_images(bench)
    sets = {"validation": validation, **{k: v for k, v in data.evals.items() if k != "clean"}}
    t0 = time.perf_counter()
    logits = {m: cached_logits(m, p, sets, data.preprocess, work / "logits", print) for m, p in models.items()}
    logits_s = time.perf_counter() - t0
    if args.logits_only:
        print(f"cached the logits of {len(models)} models in {work / 'logits'} ({logits_s:.0f}s); no accuracy computed")
        return {"logits": str(work / "logits"), "models": list(models)}
    shifts = shifts_of(logits, data, data.corruptions)
    val = {m: v["validation"] for m, v in logits.items()}
    t0 = time.perf_counter()
    estimated = {s.name: estimate_shift(s, val, validation.labels, args.resamples) for s in shifts}
    estimate_s = time.perf_counter() - t0
    errors = estimator_errors(shifts, {k: v[1] for k, v in estimated.items()}, [DEPLOYED, *tv_candidates, "self_soup_target", "supervised_soup"])
    mean_eval = {m: float(np.mean([s.accuracy_eval[m] for s in shifts if s.name != "pooled"])) for m in models}
    # the recipe's candidate: chosen on the tuning images by its true accuracy (labels are allowed there), or the frozen one
    primary = rule["candidate"] if rule else max(tv_candidates, key=lambda m: mean_eval[m])
    rules = ([DecisionConfig(margin=rule["margin"], estimators=tuple(rule["estimators"]))] if rule
             else [DecisionConfig(margin=m, estimators=v) for m, v in itertools.product(MARGINS, VOTER_SETS)])
    grid = {c: [score_rule(shifts, estimated, [c], r, c) for r in rules] for c in tv_candidates}
    chosen_rule = rule if rule else {**choose(grid[primary]), "candidate": primary}
    final = DecisionConfig(margin=chosen_rule["margin"], estimators=tuple(chosen_rule["estimators"]))
    gate = score_rule(shifts, estimated, [primary], final, primary) if final.margin != float("inf") else None
    paired = paired_differences(logits, data, data.corruptions, primary, gate)
    env = environment()
    out = {
        "benchmark": "decision", "command": " ".join(["python -m adaptsoup_bench.decision", *sys.argv[1:]]),
        "commit": source_state()["commit"], "source_dirty": source_state()["dirty"],
        "machine": {k: v for k, v in env.items() if k != "packages"}, "bench_result": str(args.result or args.bench_config),
        "bench_config": dataclasses.asdict(bench.cfg), "split": bench.split["used"], "severity": bench.cfg.severity,
        "images": {"validation": len(validation), "target_per_shift": len(data.evals[f"even/{data.corruptions[0]}"]),
                   "eval_per_shift": len(data.evals[f"odd/{data.corruptions[0]}"])},
        "models": {m: str(p) for m, p in models.items()}, "candidates": tv_candidates, "candidate": primary,
        "mean_accuracy_eval": mean_eval,
        "gate": {k: gate[k] for k in ("chosen", "deployed", "always_candidate", "oracle", "worst_regret_vs_deployed", "picked_right",
                                      "switched", "pooled", "per_shift")} if gate else None,
        "rule": chosen_rule, "paired": paired, "estimators": errors,
        "per_shift": {s.name: {"accuracy_target": s.accuracy_target, "accuracy_eval": s.accuracy_eval, "estimates": estimated[s.name][1]}
                      for s in shifts},
        "grid": grid,
        "timings_s": {"logits": round(logits_s, 1), "estimates": round(estimate_s, 1), "total": round(time.perf_counter() - t_start, 1)},
    }
    stem = Path(args.out) / f"decision_{Path(args.result or args.bench_config).stem}"
    write_json_atomic(stem.with_suffix(".json"), out)
    write_text_atomic(stem.with_suffix(".md"), markdown(out))
    if args.rule_out and not rule:
        write_json_atomic(Path(args.rule_out), {**chosen_rule, "chosen_on": out["bench_result"], "commit": out["commit"]})
    print(f"wrote {stem}.json and .md in {out['timings_s']['total']:.0f}s")
    return out


def markdown(out: dict) -> str:
    lines = [f"# The deploy decision on {out['bench_result']} (split {out['split']}, severity {out['severity']})", "",
             f"Command: `{out['command']}` (commit {out['commit'][:7]}{', dirty' if out['source_dirty'] else ''}; "
             f"{out['machine'].get('cpu', '?')}; total {out['timings_s']['total'] / 60:.1f} min).", "",
             f"Rule: {json.dumps(out['rule'])}", ""]
    if out["gate"]:
        g = out["gate"]
        lines += ["| mean accuracy on the evaluation images (%) | |", "|---|---|",
                  f"| what the rule deploys, per shift | {g['chosen']:.2f} |", f"| always the deployed model | {g['deployed']:.2f} |",
                  f"| always the candidate | {g['always_candidate']:.2f} |", f"| oracle (best per shift) | {g['oracle']:.2f} |",
                  f"| worst regret vs deployed (points) | {g['worst_regret_vs_deployed']:.2f} |",
                  f"| picked the oracle's model | {100 * g['picked_right']:.0f}% of shifts ({g['switched']} switches) |",
                  f"| one decision on the pooled target | {g['pooled']['chosen']} → {g['pooled']['accuracy']:.2f} |", ""]
    if out.get("paired"):
        lines += ["| paired difference on the evaluation images (points) | mean | 95% CI over test images |", "|---|---|---|"]
        lines += [f"| {name} | {p['mean']:+.2f} | [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}] |" for name, p in out["paired"].items()]
        lines.append("")
    lines += ["| estimator | MAE (points) | 95% CI over shifts | gain MAE | abstained |", "|---|---|---|---|---|"]
    for name, e in out["estimators"].items():
        if e["mae"] is None:
            lines.append(f"| {name} | — | — | — | {e['abstained']} |")
        else:
            lines.append(f"| {name} | {e['mae']:.2f} | [{e['ci95'][0]:.2f}, {e['ci95'][1]:.2f}] | "
                         f"{e['gain_mae']:.2f} | {e['abstained']} |" if e["gain_mae"] is not None else
                         f"| {name} | {e['mae']:.2f} | [{e['ci95'][0]:.2f}, {e['ci95'][1]:.2f}] | — | {e['abstained']} |")
    lines += ["", "| model | mean accuracy on the evaluation images (%) |", "|---|---|"]
    lines += [f"| {m} | {a:.2f} |" for m, a in out["mean_accuracy_eval"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--result", help="A finished bench c10c --protocol pretrained result JSON.")
    source.add_argument("--bench-config", help="A JSON of bench c10c settings (BenchConfig fields, or a decision result that "
                                               "recorded them as bench_config) whose adapt runs are complete.")
    parser.add_argument("--rule", help="The pre-registered rule (JSON written by --choose on the tuning split): score it alone.")
    parser.add_argument("--choose", action="store_true", help="Score the grid of rules and scales and choose one (tuning split only).")
    parser.add_argument("--rule-out", default="benchmarks/results/decision_rule.json", help="With --choose: where the chosen rule goes.")
    parser.add_argument("--scales", default="0.5,1,1.5,2", help="With --choose: task-vector scales to score.")
    parser.add_argument("--resamples", type=int, default=200, help="Bootstrap resamples of each estimated gain.")
    parser.add_argument("--out", default="benchmarks/results", help="Where the JSON and Markdown go.")
    parser.add_argument("--logits-only", action="store_true",
                        help="Only make every candidate and cache every model's logits (no accuracy is computed or shown): the report "
                             "split's slow part, run before its rule is frozen.")
    args = parser.parse_args(argv)
    if sum([bool(args.rule), args.choose, args.logits_only]) != 1:
        parser.error("give exactly one of --choose (tuning split), --rule RULE.json (report split) and --logits-only")
    return run(args)


if __name__ == "__main__":
    main()
