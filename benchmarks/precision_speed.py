"""Train-step speed per precision on this CPU, and what ``--precision auto`` picks here.

    python -m adaptsoup_bench.precision_speed [--threads 1] [--rounds 5] [--configs tiny32,small224]

For each model and stage (MAE inter-training, supervised fine-tuning) it times whole training steps
(forward, backward, AdamW update; augmentation excluded) in fp32, bf16 autocast, and bf16 autocast with
the MATH attention kernel, alternating the three in every round (median of ``--rounds``), after one
untimed step each.  Then it runs the probe that ``adapt`` runs (:func:`adaptsoup.train.precision.resolve_precision`
on :func:`~adaptsoup.train.precision.train_step_probe`, a fresh module) and reports its choice beside the
measured speeds: ``auto`` must never pick a precision slower than another by more than the noise.

Models: ``tiny32`` is the reference stock's architecture (vit_tiny_patch4_32, 32 px, batch 128);
``small224`` is vit_small_patch16_224 at batch 32.  Random weights: speed does not depend on them.
Writes ``benchmarks/results/precision_speed.{json,md}`` (``--out``); the CPU is named in both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

CONFIGS = {"tiny32": ("vit_tiny_patch4_32", 32, 128), "small224": ("vit_small_patch16_224", 224, 32),
           "pico32": ("vit_pico_patch4_32", 32, 8)}  # pico32: the tests' smoke run
RESULTS = Path(__file__).resolve().parent / "results"


def stages(arch: str, size: int, batch: int):
    """(stage name, module, loss_fn, x, y) for MAE inter-training and fine-tuning of ``arch``."""
    from adaptsoup.core.models import create_model
    from adaptsoup.ssl.mae import MaskedAutoencoder
    from adaptsoup.train.losses import classification_loss, mae_loss

    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    mae = MaskedAutoencoder(create_model(arch, num_classes=10)).train()
    model = create_model(arch, num_classes=10).train()
    return [("MAE inter-training", mae, mae_loss, x, None), ("fine-tuning", model, classification_loss(0.1), x, y)]


def time_train_steps(module, loss_fn, x, y, rounds: int) -> dict[str, float]:
    """Median seconds per full train step (with AdamW) per precision, the precisions alternating in each round."""
    from adaptsoup.train.precision import CPU_CANDIDATES, time_candidates

    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)

    def step(precision) -> None:
        with precision.context("cpu"):
            loss = loss_fn(module, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return time_candidates(step, CPU_CANDIDATES, rounds)


def measure(config: str, rounds: int) -> list[dict]:
    from adaptsoup.train.precision import resolve_precision, train_step_probe

    arch, size, batch = CONFIGS[config]
    rows = []
    for stage, module, loss_fn, x, y in stages(arch, size, batch):
        seconds = time_train_steps(module, loss_fn, x, y, rounds)
        choice = resolve_precision("auto", "cpu", train_step_probe(module, loss_fn, x, y, "cpu"))
        best = min(seconds, key=seconds.get)
        rows.append({
            "config": config, "arch": arch, "image_size": size, "batch": batch, "stage": stage,
            "images_per_s": {k: round(batch / v, 1) for k, v in seconds.items()},
            "ratio_to_fp32": {k: round(seconds["fp32"] / v, 3) for k, v in seconds.items()},
            "fastest_measured": best, "auto_chose": choice.precision.label,
            "auto_choice_speed_vs_fastest": round(seconds[best] / seconds[choice.precision.label], 3),
            "probe_seconds_per_step": {k: round(v, 5) for k, v in choice.seconds_per_step.items()},
        })
        print(rows[-1], flush=True)
    return rows


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = ["# Training step speed per precision, and what `--precision auto` picks", "", f"Command: `{result['command']}`", "",
             f"CPU: {env.get('cpu')} ({env.get('cpu_count')} cores), {result['threads']} torch thread(s); torch {env.get('packages', {}).get('torch')}; "
             f"median of {result['rounds']} alternating rounds; every ratio from this one run.", "",
             "| model | stage | fp32 img/s | bf16 img/s (×fp32) | bf16 + MATH attention img/s (×fp32) | fastest | auto chose | its speed / fastest |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ips, ratio = r["images_per_s"], r["ratio_to_fp32"]
        lines.append(f"| {r['arch']} @{r['image_size']}, batch {r['batch']} | {r['stage']} | {ips['fp32']} | {ips['bf16']} ({ratio['bf16']}) | "
                     f"{ips['bf16+math-attention']} ({ratio['bf16+math-attention']}) | {r['fastest_measured']} | {r['auto_chose']} | "
                     f"{r['auto_choice_speed_vs_fastest']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m adaptsoup_bench.precision_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny32,small224")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from adaptsoup.core.io import write_json_atomic, write_text_atomic
    from adaptsoup.core.manifest import environment

    torch.set_num_threads(args.threads)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    result = {"command": "python -m adaptsoup_bench.precision_speed " + " ".join(argv if argv is not None else sys.argv[1:]),
              "environment": environment(), "threads": args.threads, "rounds": args.rounds,
              "rows": [row for config in configs for row in measure(config, args.rounds)]}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "precision_speed.json", result)
    write_text_atomic(args.out / "precision_speed.md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
