"""The deploy-decision benchmark (benchmarks/decision.py) on a tiny ``bench c10c --protocol pretrained`` run."""

from __future__ import annotations

import json

import pytest

from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.core.models import model_meta
from adaptsoup.ssl.mae import MaskedAutoencoder
from adaptsoup_bench import decision
from adaptsoup_bench.shift import C10CConfig, run_c10c
from helpers import tiny_model
from test_bench import tiny_stock_and_cifar


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("decision")
    stock = tiny_stock_and_cifar(tmp_path)
    pre = tiny_model(seed=3)
    save_checkpoint(tmp_path / "stock_mae.safetensors", {**pre.state_dict(), **MaskedAutoencoder(pre).decoder_state_dict()}, model_meta(pre))
    cfg = C10CConfig.for_mode("quick", stock=str(stock), data=str(tmp_path / "cifar"), out=str(tmp_path / "results"),
                              work=str(tmp_path / "work"), corruptions=["gaussian_noise", "contrast"], per_corruption=4, clean_images=9,
                              source_images=12, inter_lrs=[1e-3], inter_steps=2, ft_lrs=[1e-3], ft_steps=2, vanilla=2, batch_size=6,
                              self_season_epochs=1, self_season_subset=0, bf16=False, protocol="pretrained", split="tuning",
                              sar=False, centered=False, joint=False, bootstrap_resamples=50)
    result = run_c10c(cfg, command="test", log=lambda m: None)
    return tmp_path, tmp_path / "results" / "c10c_quick_s3.json", result


def test_choosing_on_tuning_then_scoring_the_frozen_rule_alone(bench_result):
    tmp_path, path, result = bench_result
    rule_file = tmp_path / "rule.json"
    chosen = decision.main(["--result", str(path), "--choose", "--scales", "0.5,1", "--resamples", "20",
                            "--rule-out", str(rule_file), "--out", str(tmp_path / "tuning")])
    rows = {r["name"]: r for r in result["rows"]}
    # the deployed model and the scale-1 task-vector soup score on the evaluation images exactly as the bench did
    assert chosen["mean_accuracy_eval"]["deployed"] == pytest.approx(rows["deployed"]["disjoint"])
    assert chosen["mean_accuracy_eval"]["task_vector_soup_x1"] == pytest.approx(rows["self_task_vector_soup"]["disjoint"])
    assert chosen["images"] == {"validation": 5, "target_per_shift": 2, "eval_per_shift": 2}  # 9 clean - 4 corrupted originals
    assert set(chosen["estimators"]) == {"atc-ne", "atc-mc", "doc", "cot", "aline-s", "aline-d"}
    assert set(chosen["grid"]) == {"task_vector_soup_x0.5", "task_vector_soup_x1", "task_vector_soup_self_seasoned"}
    assert len(chosen["grid"]["task_vector_soup_x0.5"]) == len(decision.MARGINS) * len(decision.VOTER_SETS)
    rule = json.loads(rule_file.read_text())
    best = max(chosen["grid"], key=lambda c: chosen["mean_accuracy_eval"][c])  # the candidate is chosen by tuning accuracy
    assert rule["candidate"] == chosen["candidate"] == best and rule["chosen_on"] == str(path)
    gate = chosen["gate"]
    if gate is not None:
        assert set(gate) >= {"chosen", "deployed", "always_candidate", "oracle", "worst_regret_vs_deployed", "picked_right"}
        assert gate["worst_regret_vs_deployed"] <= decision.MAX_REGRET and gate["chosen"] >= gate["deployed"]
        assert gate["oracle"] >= max(gate["chosen"], gate["deployed"], gate["always_candidate"]) - 1e-9
    frozen = decision.main(["--result", str(path), "--rule", str(rule_file), "--resamples", "20", "--out", str(tmp_path / "report")])
    assert frozen["rule"]["margin"] == rule["margin"] and len(next(iter(frozen["grid"].values()))) == 1
    assert (tmp_path / "report" / "decision_c10c_quick_s3.md").read_text().startswith("# The deploy decision")
    again = decision.main(["--bench-config", str(tmp_path / "report" / "decision_c10c_quick_s3.json"), "--rule", str(rule_file),
                           "--resamples", "20", "--out", str(tmp_path / "again")])  # an earlier result names its settings
    assert again["gate"] == frozen["gate"] and again["bench_config"] == frozen["bench_config"]


def test_a_rule_that_never_switches_deploys_the_deployed_model_on_every_shift(bench_result):
    tmp_path, path, result = bench_result
    never = tmp_path / "never.json"
    never.write_text(json.dumps({"margin": 1000.0, "estimators": ["doc"], "candidate": "task_vector_soup_x1"}))
    settings = tmp_path / "settings.json"  # the configuration alone: its adapt runs are found in its work folder
    settings.write_text(json.dumps(result["config"]))
    out = decision.main(["--bench-config", str(settings), "--rule", str(never), "--resamples", "10", "--out", str(tmp_path / "never")])
    assert out["gate"]["chosen"] == pytest.approx(out["gate"]["deployed"]) and out["gate"]["switched"] == 0
    assert out["gate"]["worst_regret_vs_deployed"] == 0.0 and out["gate"]["pooled"]["chosen"] == "deployed"
    # the paired differences over the evaluation images are the table's differences of means
    assert out["paired"]["rule-deployed"]["mean"] == 0.0 and out["paired"]["rule-deployed"]["ci95"] == [0.0, 0.0]
    assert out["paired"]["task_vector_soup_x1-deployed"]["mean"] == pytest.approx(
        out["mean_accuracy_eval"]["task_vector_soup_x1"] - out["mean_accuracy_eval"]["deployed"])


def test_logits_only_makes_every_candidate_and_shows_no_accuracy(bench_result, capsys):
    tmp_path, path, _ = bench_result
    out = decision.main(["--result", str(path), "--logits-only", "--scales", "1,3"])
    assert {"task_vector_soup_x1", "task_vector_soup_x3", "task_vector_soup_self_seasoned", "deployed"} <= set(out["models"])
    assert all((tmp_path / "work").rglob(f"logits/{m.replace(':', '_')}.pt") for m in out["models"])
    assert "%" not in capsys.readouterr().out  # nothing about accuracy
