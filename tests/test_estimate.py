"""Label-free accuracy estimates and the deploy decision (adaptsoup.estimate): closed-form checks on
synthetic logits, so every number below can be worked out by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adaptsoup.errors import AdaptsoupError
from adaptsoup.estimate import (ALineConfig, DecisionConfig, EstimateConfig, aline, atc_estimate, cot_estimate, doc_estimate,
                                estimate_and_recommend, estimate_models, fit_temperature, recommend)
from adaptsoup.estimate.aline import fit_line
from adaptsoup.estimate.bootstrap import bootstrap_gain, percentile_interval, resample_weights, resampled_estimates
from adaptsoup.estimate.prepare import prepare
from adaptsoup.estimate.cot import class_counts, transport_costs
from adaptsoup.estimate.registry import names
from adaptsoup.estimate.temperature import T_MIN, temperature_nll


def two_class_logits(confidences) -> torch.Tensor:
    """Logits whose softmax is (c, 1 - c): class 0 predicted with confidence c (c > 0.5)."""
    c = torch.as_tensor(confidences, dtype=torch.float64)
    return torch.stack([c.log(), (1 - c).log()], dim=1)


def random_model(seed: int, labels: torch.Tensor, skill: float, classes: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(labels), classes, generator=gen, dtype=torch.float64)
    logits[torch.arange(len(labels)), labels] += skill
    return logits


LABELS = torch.arange(400) % 4


def test_every_estimator_is_registered():
    assert names() == ["atc-mc", "atc-ne", "cot", "doc"]


# ----------------------------------------------------------------------------------------------------------------
# Temperature scaling


def test_temperature_closed_form():
    """Logits (1, 0) with labels 0, 0, 0, 1: the NLL is minimal where softmax(1/T, 0) = (3/4, 1/4), T = 1/ln 3."""
    logits = torch.tensor([[1.0, 0.0]] * 4)
    assert fit_temperature(logits, torch.tensor([0, 0, 0, 1])) == pytest.approx(1 / math.log(3), abs=1e-12)


def test_temperature_recovers_a_known_temperature_and_minimises_the_nll():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, 5, generator=gen, dtype=torch.float64) * 3
    labels = torch.multinomial(torch.softmax(logits / 2.0, dim=1), 1, generator=gen).squeeze(1)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(2.0, rel=0.05)
    assert temperature_nll(logits, labels, t) < min(temperature_nll(logits, labels, t * 0.99), temperature_nll(logits, labels, t * 1.01))


def test_temperature_of_a_model_right_everywhere_is_clamped():
    assert fit_temperature(two_class_logits([0.9, 0.8, 0.7]), torch.tensor([0, 0, 0])) == T_MIN


# ----------------------------------------------------------------------------------------------------------------
# ATC and DoC


@pytest.mark.parametrize("estimator", [lambda t, v, y: atc_estimate(t, v, y, score="ne"), lambda t, v, y: atc_estimate(t, v, y, score="mc"),
                                       doc_estimate], ids=["atc-ne", "atc-mc", "doc"])
def test_on_the_validation_images_the_estimate_is_the_validation_accuracy(estimator):
    validation = random_model(1, LABELS, skill=1.5)
    accuracy = float((validation.argmax(1) == LABELS).double().mean() * 100)
    assert 40 < accuracy < 95
    assert estimator(validation, validation, LABELS) == pytest.approx(accuracy, abs=1e-9)


@pytest.mark.parametrize("score", ["mc", "ne"])
def test_atc_on_a_constructed_score_distribution(score):
    """3 of 10 validation images wrong: the threshold is the 4th smallest confidence, 0.70; 4 of the 8 target
    confidences reach it.  For two classes negative entropy orders images as confidence does: same answer."""
    confidences = [0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99]
    labels = torch.tensor([0, 1, 0, 0, 1, 0, 0, 1, 0, 0])  # class 0 is always predicted: 3 errors
    target = two_class_logits([0.52, 0.66, 0.69, 0.71, 0.8, 0.97, 0.99, 0.6])
    assert atc_estimate(target, two_class_logits(confidences), labels, score=score, temperature=1.0) == pytest.approx(50.0)


def test_doc_drops_by_the_drop_in_confidence():
    """Every target confidence d = 5 points below its validation twin (after the validation temperature): DoC is
    the validation accuracy minus 5 points."""
    gen = torch.Generator().manual_seed(3)
    margin = (torch.rand(300, generator=gen, dtype=torch.float64) * 4 + 1.5) * torch.where(torch.rand(300, generator=gen) < 0.8, 1.0, -1.0)
    validation = torch.stack([margin, torch.zeros_like(margin)], dim=1)
    labels = torch.zeros(300, dtype=torch.long)
    t = fit_temperature(validation, labels)
    confidence = torch.softmax(validation / t, dim=1).max(dim=1).values
    assert confidence.min() > 0.56
    target = t * two_class_logits(confidence - 0.05)
    accuracy = float((validation.argmax(1) == labels).double().mean() * 100)
    assert doc_estimate(validation, validation, labels) == pytest.approx(accuracy, abs=1e-9)
    assert doc_estimate(target, validation, labels) == pytest.approx(accuracy - 5.0, abs=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# COT


def test_cot_is_exact_when_confident_predictions_come_in_source_proportions():
    validation_labels = torch.tensor([0, 0, 1, 2])  # proportions 1/2, 1/4, 1/4
    validation = random_model(0, validation_labels, skill=1.0, classes=3)
    target = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 2, 0, 0, 2, 1]), 3).double() * 60
    assert cot_estimate(target, validation, validation_labels, temperature=1.0) == pytest.approx(100.0, abs=1e-12)
    all_zero = torch.nn.functional.one_hot(torch.zeros(8, dtype=torch.long), 3).double() * 60
    assert cot_estimate(all_zero, validation, validation_labels, temperature=1.0) == pytest.approx(50.0, abs=1e-12)


def test_cot_on_two_images():
    """Source 1/2, 1/2; softmax (0.8, 0.2) and (0.6, 0.4).  Assigning the first to class 0 costs 0.2 + 0.6,
    the other way 0.8 + 0.4: error 0.8 / 2 = 0.4, accuracy 60% (mean confidence would say 70%)."""
    target = torch.tensor([[0.8, 0.2], [0.6, 0.4]], dtype=torch.float64).log()
    validation = two_class_logits([0.9, 0.9])
    assert cot_estimate(target, validation, torch.tensor([0, 1]), temperature=1.0) == pytest.approx(60.0, abs=1e-12)


def test_cot_class_counts_and_batches():
    assert class_counts(torch.tensor([0.5, 0.3, 0.2]), 7).tolist() == [4, 2, 1]
    probs = torch.softmax(random_model(5, LABELS[:50], skill=1.0), dim=1)
    marginal = torch.full((4,), 0.25, dtype=torch.float64)
    exact = transport_costs(probs, marginal).mean()
    batched = transport_costs(probs, marginal, exact_max=16, seed=0).mean()
    assert batched >= exact - 1e-12  # batches are one feasible plan among many: never cheaper
    assert torch.equal(transport_costs(probs, marginal, exact_max=16, seed=0), transport_costs(probs, marginal, exact_max=16, seed=0))


# ----------------------------------------------------------------------------------------------------------------
# Agreement-on-the-line


def probit(x):
    return torch.special.ndtri(torch.as_tensor(x, dtype=torch.float64))


def test_aline_recovers_ood_accuracy_on_an_exact_probit_line():
    a, b = 1.3, -0.4
    accuracy_id = torch.tensor([0.7, 0.75, 0.8, 0.9], dtype=torch.float64)
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    agreement_id = torch.tensor([0.62, 0.7, 0.66, 0.81, 0.77, 0.9], dtype=torch.float64)
    agreement_ood = torch.special.ndtr(a * probit(agreement_id) + b)
    truth = (torch.special.ndtr(a * probit(accuracy_id) + b) * 100).tolist()
    result = fit_line(accuracy_id, agreement_id, agreement_ood, pairs)
    assert result.r2 == pytest.approx(1.0, abs=1e-12) and not result.abstain and result.reason is None
    assert (result.slope, result.intercept) == (pytest.approx(a), pytest.approx(b))
    assert result.aline_s == pytest.approx(truth, abs=1e-9)
    assert result.aline_d == pytest.approx(truth, abs=1e-9)


def test_aline_abstains_on_scattered_points():
    accuracy_id = torch.tensor([0.7, 0.75, 0.8, 0.9], dtype=torch.float64)
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    agreement_id = torch.tensor([0.62, 0.7, 0.66, 0.81, 0.77, 0.9], dtype=torch.float64)
    agreement_ood = torch.tensor([0.5, 0.2, 0.7, 0.3, 0.6, 0.4], dtype=torch.float64)
    result = fit_line(accuracy_id, agreement_id, agreement_ood, pairs)
    assert result.abstain and result.r2 < 0.9 and "R^2" in result.reason
    assert len(result.aline_s) == 4  # the numbers are kept for the record; the decision ignores them


def test_aline_on_logits_when_target_is_validation():
    """The same images twice: OOD agreement equals ID agreement, the line is y = x, and both ALine
    estimates give back each model's validation accuracy."""
    models = [random_model(seed, LABELS, skill) for seed, skill in ((0, 0.8), (1, 1.4), (2, 2.0), (3, 2.6))]
    result = aline(models, models, LABELS)
    accuracies = [float((m.argmax(1) == LABELS).double().mean() * 100) for m in models]
    assert result.r2 == pytest.approx(1.0) and (result.slope, result.intercept) == (pytest.approx(1.0), pytest.approx(0.0, abs=1e-12))
    assert result.aline_s == pytest.approx(accuracies) and result.aline_d == pytest.approx(accuracies)


def test_aline_needs_models():
    models = [random_model(seed, LABELS, 1.0) for seed in range(2)]
    two = aline(models, models, LABELS)
    assert two.abstain and "at least 3 models" in two.reason and two.aline_s is None
    with pytest.raises(AdaptsoupError, match="at least 2 models"):
        aline(models[:1], models[:1], LABELS)
    strict = aline(models + [random_model(9, LABELS, 1.0)], models + [random_model(9, LABELS, 1.0)], LABELS, ALineConfig(min_models=4))
    assert strict.abstain and "at least 4 models" in strict.reason


# ----------------------------------------------------------------------------------------------------------------
# Bootstrap and the decision


def test_bootstrap_weights_are_seeded_draws():
    first = torch.cat(list(resample_weights(7, 250, seed=3)))
    assert first.shape == (250, 7) and torch.equal(first, torch.cat(list(resample_weights(7, 250, seed=3))))
    assert torch.allclose(first.sum(dim=1), torch.ones(250, dtype=torch.float64))
    assert torch.allclose(first * 7, (first * 7).round())  # counts over n
    interval = percentile_interval(torch.arange(101, dtype=torch.float64), 50.0, 0.9)
    assert (interval.low, interval.high) == (pytest.approx(5.0), pytest.approx(95.0))


def test_bootstrap_gain_is_paired():
    """The same draw goes to both models: a candidate whose per-image DoC score is the deployed one's plus 2
    gains exactly 2 points in every resample; an unrelated one gets an interval around its point gain."""
    validation = random_model(1, LABELS, skill=1.5)
    target = random_model(2, LABELS, skill=1.0)
    prepared = prepare({"deployed": target, "copy": target.clone(), "other": random_model(3, LABELS, 1.5)},
                       {"deployed": validation, "copy": validation, "other": validation}, LABELS,
                       EstimateConfig(estimators=("doc", "atc-ne"), bootstrap_resamples=300))
    prepared.image_scores["copy"]["doc"] = prepared.image_scores["deployed"]["doc"] + 2.0
    resampled = resampled_estimates(prepared)
    copy = bootstrap_gain(prepared, resampled, "copy", "deployed", ["doc"], 2.0)
    assert (copy.low, copy.high) == (pytest.approx(2.0), pytest.approx(2.0))
    point = float(prepared.image_scores["other"]["atc-ne"].mean() - prepared.image_scores["deployed"]["atc-ne"].mean())
    other = bootstrap_gain(prepared, resampled, "other", "deployed", ["atc-ne"], point)
    assert other.low < point < other.high and other.resamples == 300


DEPLOYED = {"atc-ne": 70.0, "doc": 71.0, "aline-s": 69.0}
RULE = DecisionConfig(margin=0.5, estimators=("atc-ne", "doc", "aline-s"))


def test_decision_keeps_the_deployed_model_when_estimators_disagree_or_the_gain_is_small():
    disagree = {"deployed": DEPLOYED, "soup": {"atc-ne": 73.0, "doc": 74.0, "aline-s": 68.0}}
    rec = recommend(disagree, "deployed", {"soup": (1.0, 3.0)}, RULE)
    assert (rec.model, rec.switch, rec.gain, rec.ci95) == ("deployed", False, 0.0, (0.0, 0.0))
    assert "aline-s estimates -1.00 points" in rec.reason
    small = {"deployed": DEPLOYED, "soup": {"atc-ne": 70.4, "doc": 71.6, "aline-s": 69.9}}
    assert recommend(small, "deployed", {"soup": (0.1, 0.9)}, RULE).model == "deployed"
    unsure = {"deployed": DEPLOYED, "soup": {"atc-ne": 72.0, "doc": 73.0, "aline-s": 71.0}}
    rec = recommend(unsure, "deployed", {"soup": (-0.2, 4.0)}, RULE)
    assert rec.model == "deployed" and "lower bound -0.20" in rec.reason


def test_decision_switches_when_all_agree_and_picks_the_largest_smallest_gain():
    estimates = {"deployed": DEPLOYED,
                 "soup": {"atc-ne": 72.0, "doc": 73.0, "aline-s": None},  # ALine abstains: it does not vote
                 "task-vector": {"atc-ne": 75.0, "doc": 71.8, "aline-s": None},
                 "worse": {"atc-ne": 60.0, "doc": 61.0, "aline-s": None}}
    rec = recommend(estimates, "deployed", {"soup": (0.5, 3.5), "task-vector": (1.0, 6.0), "worse": (-12.0, -8.0)}, RULE)
    assert (rec.model, rec.switch, rec.gain, rec.ci95) == ("soup", True, 2.0, (0.5, 3.5))  # min gains: soup 2.0, task-vector 0.8
    verdicts = {c.name: c.qualifies for c in rec.candidates}
    assert verdicts == {"soup": True, "task-vector": True, "worse": False}
    assert "every non-abstaining estimator" in rec.rule and "0.5 points" in rec.rule
    json.dumps(rec.to_dict())


def test_decision_keeps_the_deployed_model_when_every_estimator_abstains():
    estimates = {"deployed": {"aline-s": None}, "soup": {"aline-s": None}}
    rec = recommend(estimates, "deployed", {}, DecisionConfig(estimators=("aline-s",)))
    assert rec.model == "deployed" and "all abstain" in rec.reason


def test_estimate_and_recommend_from_logits():
    """Same validation logits, so the same temperature and thresholds; on the target the candidate is as
    accurate-looking as on validation, the deployed model is much less confident: every estimator says gain."""
    validation = random_model(1, LABELS, skill=2.0)
    target_labels = torch.arange(200) % 4
    sharp = random_model(2, target_labels, skill=2.0)
    target = {"deployed": sharp / 4, "candidate": sharp}
    result = estimate_and_recommend(target, {"deployed": validation, "candidate": validation}, LABELS, "deployed")
    rec = result["recommendation"]
    assert rec["model"] == "candidate" and rec["switch"] and rec["ci95"][0] > 0
    assert result["aline"]["abstain"] and "at least 3 models" in result["aline"]["reason"]
    assert result["estimates"]["candidate"]["aline-s"] is None
    assert json.loads(json.dumps(result)) == result
    same = estimate_and_recommend({"deployed": sharp, "copy": sharp.clone()}, {"deployed": validation, "copy": validation}, LABELS, "deployed")
    copy = same["recommendation"]["candidates"][0]
    assert same["recommendation"]["model"] == "deployed" and copy["ci95"] == [0.0, 0.0] and copy["min_gain"] == 0.0


def test_estimate_models_reports_every_estimator_as_plain_data():
    models = {f"m{i}": random_model(i, LABELS, 1.0 + i / 2) for i in range(3)}
    result = estimate_models(models, models, LABELS, EstimateConfig())
    assert set(result["estimates"]["m0"]) == {"atc-ne", "atc-mc", "doc", "cot", "aline-s", "aline-d"}
    assert result["aline"]["r2"] == pytest.approx(1.0) and not result["aline"]["abstain"]
    for name, model in models.items():
        accuracy = float((model.argmax(1) == LABELS).double().mean() * 100)
        assert result["validation_accuracy"][name] == pytest.approx(accuracy)
        for estimator in ("atc-ne", "atc-mc", "doc", "aline-s", "aline-d"):
            assert result["estimates"][name][estimator] == pytest.approx(accuracy)
    assert json.loads(json.dumps(result)) == result
    only = estimate_models(models, models, LABELS, EstimateConfig(estimators=("doc",)))
    assert only["aline"] is None and set(only["estimates"]["m1"]) == {"doc"}


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one-line errors


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_inputs_are_one_line_errors():
    validation = random_model(1, LABELS, 1.0)
    with pytest.raises(AdaptsoupError) as info:
        estimate_models({"a": torch.zeros(0, 4)}, {"a": validation}, LABELS)
    assert "no images" in one_line(info)
    with pytest.raises(AdaptsoupError) as info:
        atc_estimate(torch.zeros(0, 4), validation, LABELS)
    assert "no images" in one_line(info)
    with pytest.raises(AdaptsoupError) as info:
        estimate_models({"a": validation, "b": validation[:, :3]}, {"a": validation, "b": validation[:, :3]}, LABELS)
    assert "3 classes, but 4 expected" in one_line(info)
    with pytest.raises(AdaptsoupError) as info:
        doc_estimate(validation[:, :3], validation, LABELS)
    assert "classes" in one_line(info)
    with pytest.raises(AdaptsoupError) as info:
        estimate_models({"a": validation}, {"a": validation}, LABELS[:10])
    assert "one per validation image" in one_line(info)
    with pytest.raises(AdaptsoupError) as info:
        estimate_models({"a": validation}, {"a": validation}, LABELS + 4)
    assert "[0, 4)" in one_line(info)
    with pytest.raises(AdaptsoupError) as info:
        estimate_models({"a": validation}, {"a": validation}, LABELS, EstimateConfig(estimators=("atc", "doc")))
    assert "unknown estimator" in one_line(info)
    with pytest.raises(AdaptsoupError) as info:
        estimate_and_recommend({"a": validation}, {"a": validation}, LABELS, "b")
    assert "not among the models" in one_line(info)
    with pytest.raises(AdaptsoupError) as info:
        estimate_and_recommend({"a": validation, "b": validation}, {"a": validation, "b": validation}, LABELS, "a",
                               EstimateConfig(estimators=("doc",)), DecisionConfig(estimators=("doc", "cot")))
    assert "not among the computed" in one_line(info)
