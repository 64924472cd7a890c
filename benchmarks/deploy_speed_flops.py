"""How close fp32 inference is to the machine, for :mod:`adaptsoup_bench.deploy_speed`: FLOPs per image
(``torch.utils.flop_counter``), the fp32 GEMM ceiling (``torch.mm`` and an onnxruntime ``MatMul`` at the same
threads) and each fp32 variant's GFLOP/s as a fraction of it."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from adaptsoup.deploy.runtime import ort_session

FP32_VARIANTS = ("eager fp32", "ORT fp32 (plain)", "ORT fp32 (optimised)")


def flops_per_image(model: torch.nn.Module, input_size: tuple[int, ...]) -> float:
    """Floating-point operations (a multiply-add counts 2) of one forward pass on one image, as
    ``torch.utils.flop_counter`` counts them (matrix products and attention; elementwise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, *input_size))
    return float(counter.get_total_flops())


def gemm_ceiling(threads: int, workdir: Path, size: int = 2048, rounds: int = 5) -> dict:
    """GFLOP/s of a large float32 matrix product at ``threads`` threads, in torch (``torch.mm``) and in
    onnxruntime (a one-node ``MatMul`` graph): what fp32 inference can reach on this machine at most."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])],
                              [numpy_helper.from_array(b, "b")])
    path = workdir / "gemm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    session = ort_session(path, threads=threads)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    runs = {"torch.mm": lambda: torch.mm(ta, tb), "onnxruntime MatMul": lambda: session.run(None, {"a": a})}
    flops = 2.0 * size**3
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            rates[name].append(flops / (time.perf_counter() - start) / 1e9)
    gflops = {name: round(statistics.median(r), 1) for name, r in rates.items()}
    return {"size": size, "threads": threads, "gflops": gflops, "ceiling_gflops": max(gflops.values())}


def fp32_efficiency(speeds: dict[str, dict], gflop_per_image: float, ceiling: float) -> dict[str, dict]:
    """GFLOP/s of each fp32 variant and its fraction of the GEMM ``ceiling``."""
    out = {}
    for name in FP32_VARIANTS:
        if name in speeds:
            rate = speeds[name]["images_per_s"] * gflop_per_image
            out[name] = {"gflops": round(rate, 1), "of_ceiling": round(rate / ceiling, 3)}
    return out
