"""Training throughput of MAE inter-training and fine-tuning, fp32 and bf16, as model FLOPs utilisation.

    python benchmarks/throughput.py [--arch vit_tiny_patch4_32] [--steps 6] [--device cpu]

Measures the machine's matmul rate (2048x2048, fp32 and bf16), then timed training steps (augmentation
excluded) of MAE (mask 0.75) and of supervised fine-tuning at batch 128.  FLOPs per step are counted by
torch.utils.flop_counter (forward + backward); MFU = achieved FLOP/s / measured matmul FLOP/s of the same
dtype.  Writes benchmarks/results/throughput.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adaptsoup.core.io import write_json_atomic, write_text_atomic  # noqa: E402
from adaptsoup.ssl.mae import MaskedAutoencoder  # noqa: E402
from adaptsoup.core.manifest import environment  # noqa: E402
from adaptsoup.core.models import count_parameters, create_model  # noqa: E402


def matmul_rate(dtype: torch.dtype, device: str, n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(module, loss_fn, batch: torch.Tensor, bf16: bool, steps: int, device: str) -> tuple[float, float]:
    """(seconds per step, FLOPs per step) of forward + backward + AdamW."""
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps, float(flops)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vit_tiny_patch4_32")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "throughput"))
    args = ap.parse_args()
    torch.manual_seed(0)
    peaks = {"fp32": matmul_rate(torch.float32, args.device), "bf16": matmul_rate(torch.bfloat16, args.device)}
    model = create_model(args.arch, num_classes=10).to(args.device)
    mae = MaskedAutoencoder(model).to(args.device)
    x = torch.randn(args.batch, 3, 32, 32, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    rows = []
    for name, module, loss_fn in (
        ("MAE inter-training", mae, lambda b: mae(b)[0]),
        ("fine-tuning", model, lambda b: torch.nn.functional.cross_entropy(model(b).float(), y)),
    ):
        for dtype in ("fp32", "bf16"):
            sec, flops = time_steps(module, loss_fn, x, dtype == "bf16", args.steps, args.device)
            achieved = flops / sec
            rows.append({"stage": name, "dtype": dtype, "images_per_s": round(args.batch / sec, 1), "gflop_per_image": round(flops / args.batch / 1e9, 3),
                         "achieved_gflops": round(achieved / 1e9, 1), "peak_matmul_gflops": round(peaks[dtype] / 1e9, 1),
                         "mfu": round(achieved / peaks[dtype], 3)})
            print(rows[-1], flush=True)
    result = {"command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]), "arch": args.arch, "parameters": count_parameters(model),
              "batch": args.batch, "machine": {k: v for k, v in environment().items() if k != "packages"}, "rows": rows}
    write_json_atomic(args.out + ".json", result)
    lines = [f"Command: `{result['command']}` on {result['machine']['cpu']} ({result['machine']['cpu_count']} cores, {result['machine']['torch_threads']} torch threads)", "",
             "| stage | dtype | images/s | GFLOP/image (fwd+bwd) | achieved GFLOP/s | measured matmul GFLOP/s | MFU |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['dtype']} | {r['images_per_s']} | {r['gflop_per_image']} | {r['achieved_gflops']} | {r['peak_matmul_gflops']} | {r['mfu']:.0%} |" for r in rows]
    write_text_atomic(args.out + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
