"""Which precision a training run uses: fp32, bf16 autocast, or bf16 with PyTorch's MATH attention kernel.

Whether bf16 pays depends on the machine, not on the model: on an AMD EPYC bf16 autocast with the MATH
attention kernel trained 1.6x faster than fp32 (``python -m adaptsoup_bench.precision_speed``, figures in
benchmarks/README.md), while issue #16 measured 0.49x on an Intel Xeon without AMX, partly because
PyTorch's CPU flash-attention backward is slow in bf16.  So ``precision="auto"`` (the default of ``adapt``) does not guess: it times the run's own
training step (forward and backward on its first batch; no optimizer step, the RNG states restored, the
gradients cleared) in each candidate and keeps the fastest.  On CUDA it takes bf16 where the device
supports it.  ``fp32`` and ``bf16`` are taken as asked (bf16 with PyTorch's default attention kernel).

The choice and the probe's timings go into the run's manifest, and a resumed run keeps the precision it
started with, so that a resume stays bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Precision:
    """A numeric regime: ``dtype`` fp32 or bf16 (autocast), ``attention`` the SDPA kernel (default or math)."""

    dtype: str = "fp32"
    attention: str = "default"

    @property
    def label(self) -> str:
        return self.dtype if self.attention == "default" else f"{self.dtype}+{self.attention}-attention"

    @classmethod
    def from_label(cls, label: str) -> "Precision":
        dtype, _, rest = label.partition("+")
        return cls(dtype, rest.removesuffix("-attention") or "default")

    @contextlib.contextmanager
    def context(self, device_type: str) -> Iterator[None]:
        """Autocast to bf16 (when asked) and the SDPA kernel restriction (when asked) around a step."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.dtype == "bf16"))
            if self.attention == "math":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            yield


FP32, BF16, BF16_MATH = Precision("fp32"), Precision("bf16"), Precision("bf16", "math")
CPU_CANDIDATES = (FP32, BF16, BF16_MATH)


@dataclass
class PrecisionChoice:
    """The precision a run uses, what was asked, why, and the probe's seconds per step (when it probed)."""

    precision: Precision
    requested: str
    reason: str
    seconds_per_step: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict:
        return {"precision": self.precision.label, "requested": self.requested, "reason": self.reason,
                "probe_seconds_per_step": {k: round(v, 5) for k, v in self.seconds_per_step.items()}}


def fastest(seconds_per_step: dict[str, float]) -> str:
    """The label with the fewest seconds per step (the first listed wins a tie)."""
    return min(seconds_per_step, key=lambda label: seconds_per_step[label])


def train_step_probe(module: torch.nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor | None,
                     device_type: str) -> Callable[[Precision], None]:
    """``step(precision)``: forward and backward of ``loss_fn(module, x, y)`` in that precision, gradients
    then cleared (no optimizer step: the module is left as it was; the optimizer's update costs the same
    in every precision)."""

    def step(precision: Precision) -> None:
        with precision.context(device_type):
            loss = loss_fn(module, x, y)
        loss.backward()
        module.zero_grad(set_to_none=True)

    return step


def time_candidates(step: Callable[[Precision], None], candidates=CPU_CANDIDATES, rounds: int = 3) -> dict[str, float]:
    """Median seconds of ``step(precision)`` per candidate: one untimed warm-up each, then ``rounds`` rounds
    that alternate the candidates, so that a machine's drift touches them all alike."""
    for precision in candidates:
        step(precision)
    times: dict[str, list[float]] = {p.label: [] for p in candidates}
    for _ in range(rounds):
        for precision in candidates:
            t0 = time.perf_counter()
            step(precision)
            times[precision.label].append(time.perf_counter() - t0)
    return {label: statistics.median(values) for label, values in times.items()}


def resolve_precision(requested: str, device_type: str, step: Callable[[Precision], None] | None,
                      probe: Callable[..., dict[str, float]] = time_candidates) -> PrecisionChoice:
    """The precision for ``requested`` (auto, fp32 or bf16) on ``device_type``; ``step`` runs one probe step."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; use one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return PrecisionChoice(Precision(requested), requested, "as asked")
    if device_type == "cuda":
        supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return PrecisionChoice(BF16 if supported else FP32, requested, f"CUDA device {'supports' if supported else 'lacks'} bf16")
    if step is None:
        return PrecisionChoice(FP32, requested, "no probe possible here")
    timings = probe(step)
    chosen = Precision.from_label(fastest(timings))
    shown = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in timings.items())
    return PrecisionChoice(chosen, requested, f"fastest measured train step ({shown})", timings)
