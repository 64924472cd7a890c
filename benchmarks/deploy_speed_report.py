"""The Markdown report of :mod:`adaptsoup_bench.deploy_speed` (and the CPU's name it states)."""

from __future__ import annotations

from adaptsoup.core.manifest import environment
from adaptsoup_bench.deploy_speed_flops import FP32_VARIANTS


def cpu_name() -> str:
    """The CPU's model name (lscpu's 'Model name', or /proc/cpuinfo's)."""
    import subprocess

    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.strip().lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return str(environment().get("cpu", "unknown CPU"))


def eager_vs_onnx_markdown(section: dict) -> list[str]:
    lines = [f"### {section['model']} ({'x'.join(str(d) for d in section['input_size'])})", ""]
    lines += [f"- {note}" for note in section["notes"]]
    fused = section["files"]["ORT fp32 (optimised)"].get("fusions") or {}
    lines += [f"- optimised file: {', '.join(f'{n} {op}' for op, n in fused.items()) or 'no fusions'}",
              f"- static int8 calibration: {section['files']['ORT int8 static']['calibration']}", ""]
    names = list(section["rows"][0]["speeds"])
    lines += ["| batch | " + " | ".join(f"{n} (images/s)" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {row['batch']} | " + " | ".join(f"{row['speeds'][n]['images_per_s']:.1f}" for n in names) + " |" for row in section["rows"]]
    labels = list(section["rows"][0]["ratios"])
    lines += ["", "| batch | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines += [f"| {row['batch']} | " + " | ".join(f"{row['ratios'][k]:.2f}x" for k in labels) + " |" for row in section["rows"]]
    if all("fp32_efficiency" in row for row in section["rows"]):
        lines += ["", f"fp32 GFLOP/s ({section['gflop_per_image']} GFLOP per image) and fraction of the GEMM ceiling:", "",
                  "| batch | " + " | ".join(FP32_VARIANTS) + " |", "|---" * (len(FP32_VARIANTS) + 1) + "|"]
        lines += [f"| {row['batch']} | " + " | ".join(f"{row['fp32_efficiency'][n]['gflops']:.1f} ({row['fp32_efficiency'][n]['of_ceiling']:.0%})"
                                                       for n in FP32_VARIANTS) + " |" for row in section["rows"]]
    if "accuracy" in section:
        lines += ["", f"Top-1 accuracy on {section['accuracy_images']} images:", "",
                  "| " + " | ".join(section["accuracy"]) + " |", "|---" * len(section["accuracy"]) + "|",
                  "| " + " | ".join(f"{v:.2f}%" for v in section["accuracy"].values()) + " |"]
    return lines + [""]


def markdown(result: dict) -> str:
    lines = ["# Deployment speed", "", f"Command: `{result['command']}`", "",
             f"CPU: {result['machine']['cpu']} ({result['machine']['cpu_count']} logical cores); {result['threads']} thread(s) "
             f"for torch and onnxruntime; median of {result['rounds']} alternating rounds. torch {result['machine'].get('torch')}, "
             f"onnxruntime {result['machine'].get('onnxruntime')}.", ""]
    ceiling = result["sections"].get("fp32_ceiling")
    if ceiling:
        lines += [f"fp32 GEMM ceiling ({ceiling['size']}x{ceiling['size']}, {ceiling['threads']} thread(s)): "
                  + ", ".join(f"{name} {g:.1f} GFLOP/s" for name, g in ceiling["gflops"].items()) + ".", ""]
    for section in result["sections"].get("eager_vs_onnx", []):
        lines += eager_vs_onnx_markdown(section)
    return "\n".join(lines)
