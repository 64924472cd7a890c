"""The deployment-speed benchmark's smoke path (``--quick``) on a tiny stock: every variant timed, ratios from the
run's own numbers, accuracy from a CIFAR-10-shaped folder, JSON and Markdown written."""

from __future__ import annotations

import json

import torch

from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.core.data import Preprocess, load_folder
from adaptsoup.core.models import model_meta
from adaptsoup_bench import deploy_speed

from helpers import CLASS_NAMES, tiny_model, write_noise_images


def test_quick_run_writes_every_variant_and_consistent_ratios(tmp_path):
    model = tiny_model(seed=8)
    stock = save_checkpoint(tmp_path / "pico.safetensors", model.state_dict(), model_meta(model))
    for split, count in (("train", 1), ("test", 6)):
        for i, name in enumerate(CLASS_NAMES):
            write_noise_images(tmp_path / "cifar" / split / name, count, seed=40 + i)
    out = tmp_path / "results" / "ds"

    result = deploy_speed.main(["--quick", "--models", "reference", "--stock", str(stock), "--data", str(tmp_path / "cifar"),
                                "--out", str(out)])

    (section,) = result["sections"]["eager_vs_onnx"]
    assert [row["batch"] for row in section["rows"]] == [1, 4]
    for row in section["rows"]:
        speeds = row["speeds"]
        assert list(speeds) == list(deploy_speed.VARIANTS)
        assert all(s["images_per_s"] > 0 for s in speeds.values())
        expected = speeds["ORT fp32 (optimised)"]["images_per_s"] / speeds["eager fp32"]["images_per_s"]
        assert abs(row["ratios"]["ORT fp32 (optimised) / eager fp32"] - expected) < 1e-3 * max(1.0, expected)
    assert section["files"]["ORT fp32 (optimised)"]["fusions"]["Attention"] == 2
    assert section["accuracy_images"] == 18 and set(section["accuracy"]) == set(deploy_speed.VARIANTS)
    # fp32, eager or ONNX, is the model's own top-1 on the 18 images, computed here; every variant's is a count of 18
    test = load_folder(tmp_path / "cifar" / "test", Preprocess.for_model(model), labeled=True, class_names=CLASS_NAMES)
    with torch.no_grad():
        right = int((model(Preprocess.for_model(model).normalize(test.images)).argmax(1) == test.labels).sum())
    assert all(section["accuracy"][name] == round(100 * right / 18, 2) for name in deploy_speed.FP32_VARIANTS), section["accuracy"]
    assert all(min(abs(a - 100 * k / 18) for k in range(19)) < 0.006 for a in section["accuracy"].values()), section["accuracy"]
    assert result["machine"]["cpu"]
    ceiling = result["sections"]["fp32_ceiling"]
    assert ceiling["ceiling_gflops"] == max(ceiling["gflops"].values()) > 0
    assert section["gflop_per_image"] > 0
    for row in section["rows"]:
        for name, eff in row["fp32_efficiency"].items():
            gflops = row["speeds"][name]["images_per_s"] * section["gflop_per_image"]
            assert abs(eff["gflops"] - gflops) <= 0.05 + 1e-3 * gflops
            assert abs(eff["of_ceiling"] - gflops / ceiling["ceiling_gflops"]) < 2e-3 + 1e-3 * eff["of_ceiling"]

    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["sections"]["eager_vs_onnx"][0]["rows"] == section["rows"]
    md = out.with_suffix(".md").read_text()
    assert md.splitlines()[2].startswith("Command: `python benchmarks/deploy_speed.py --quick")
    assert "ORT int8 static" in md and "Top-1 accuracy on 18 images" in md and "fp32 GEMM ceiling" in md
    assert sorted(p.name for p in out.parent.iterdir()) == ["ds.json", "ds.md"]


def test_flops_per_image_counts_a_multiply_add_as_two():
    import torch

    assert deploy_speed.flops_per_image(torch.nn.Linear(8, 4, bias=False), (8,)) == 2 * 8 * 4
    assert deploy_speed.flops_per_image(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 3)), (8,)) == 2 * (8 * 4 + 4 * 3)
