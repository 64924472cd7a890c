"""--precision auto: the probe's choice, and a probe that leaves no trace on the run it times."""

from __future__ import annotations

import pytest
import torch

from adaptsoup.core.data import ImageSet, Preprocess
from adaptsoup.train.losses import classification_loss
from adaptsoup.train.loop import TrainConfig, train
from adaptsoup.train.precision import BF16, BF16_MATH, FP32, Precision, fastest, resolve_precision, time_candidates
from tests.helpers import tiny_model


@pytest.mark.parametrize("timings, want", [
    ({"fp32": 0.20, "bf16": 0.10, "bf16+math-attention": 0.15}, "bf16"),
    ({"fp32": 0.20, "bf16": 0.30, "bf16+math-attention": 0.15}, "bf16+math-attention"),  # bf16 wins only with MATH attention
    ({"fp32": 0.10, "bf16": 0.30, "bf16+math-attention": 0.15}, "fp32"),  # an Intel Xeon without AMX
])
def test_auto_picks_the_fastest_measured_precision(timings, want):
    choice = resolve_precision("auto", "cpu", step=lambda p: None, probe=lambda step: timings)
    assert choice.precision.label == want == fastest(timings)
    assert choice.seconds_per_step == timings and choice.record()["precision"] == want
    slower = [label for label, t in timings.items() if t > timings[want]]
    assert choice.precision.label not in slower


def test_asked_precisions_are_not_probed():
    def probe(step):
        raise AssertionError("probed")

    assert resolve_precision("fp32", "cpu", step=lambda p: None, probe=probe).precision == FP32
    assert resolve_precision("bf16", "cpu", step=lambda p: None, probe=probe).precision == BF16
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("fp16", "cpu", None)


def test_labels_round_trip_and_time_candidates_alternates():
    for p in (FP32, BF16, BF16_MATH):
        assert Precision.from_label(p.label) == p
    calls = []
    timings = time_candidates(lambda p: calls.append(p.label), rounds=2)
    assert set(timings) == {"fp32", "bf16", "bf16+math-attention"}
    assert calls == ["fp32", "bf16", "bf16+math-attention"] * 3  # a warm-up each, then alternating rounds


def _data(n=24):
    gen = torch.Generator().manual_seed(0)
    return ImageSet(images=torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen), paths=[str(i) for i in range(n)],
                    labels=torch.randint(0, 3, (n,), generator=gen))


def test_the_probe_leaves_the_run_as_it_found_it(tmp_path):
    """A run that probes ends bit-identical to one told the probe's answer: no step, no gradient, no RNG draw leaks."""
    cfg = TrainConfig(steps=3, lr=1e-3, batch_size=8, augment="3a", precision="auto", checkpoint_every_s=1e9)
    runs = []
    memo: dict[str, str] = {}
    for _ in range(2):  # the first probes and fills the memo; the second reads the memo and does not probe
        model = tiny_model()
        result = train(model, classification_loss(0.0), _data(), Preprocess.for_model(model), cfg, precision_memo=memo)
        runs.append((model.state_dict(), result))
    (first, r1), (second, r2) = runs
    assert len(memo) == 1 and r1.precision["probe_seconds_per_step"] and not r2.precision["probe_seconds_per_step"]
    assert r1.precision["precision"] == r2.precision["precision"] == next(iter(memo.values()))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert r1.losses == r2.losses


def test_a_resumed_run_keeps_the_precision_it_started_with(tmp_path):
    cfg = TrainConfig(steps=4, lr=1e-3, batch_size=8, augment="none", precision="bf16", checkpoint_every_s=0.0)
    model = tiny_model()
    state = tmp_path / "state.pt"

    def stop(step, loss):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, classification_loss(0.0), _data(), Preprocess.for_model(model), cfg, state_path=state, on_step=stop)
    assert torch.load(state, weights_only=True)["precision"] == "bf16"
    resumed = train(tiny_model(), classification_loss(0.0), _data(), Preprocess.for_model(model),
                    TrainConfig(**{**cfg.to_dict(), "precision": "auto"}), state_path=state)
    assert resumed.precision["precision"] == "bf16" and "resumed" in resumed.precision["reason"]


def test_the_precision_benchmark_reports_the_probe_beside_the_measured_speeds(tmp_path):
    import json

    from adaptsoup_bench.precision_speed import main

    main(["--configs", "pico32", "--rounds", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "precision_speed.json").read_text())
    assert [r["stage"] for r in result["rows"]] == ["MAE inter-training", "fine-tuning"]
    for row in result["rows"]:
        assert set(row["images_per_s"]) == {"fp32", "bf16", "bf16+math-attention"}
        assert row["auto_chose"] in row["images_per_s"] and 0 < row["auto_choice_speed_vs_fastest"] <= 1
    assert "auto chose" in (tmp_path / "precision_speed.md").read_text() and result["environment"]["cpu"]
