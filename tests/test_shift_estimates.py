"""The label-free estimates inside the shift benchmarks' results (benchmarks/shift_estimates.py)."""

from __future__ import annotations

import pytest
import torch

from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.core.data import ImageSet, Preprocess
from adaptsoup.core.models import model_meta
from adaptsoup_bench.shift_estimates import shift_estimates, superclass_logits, validation_set
from adaptsoup_bench.shift_report import estimates_lines
from adaptsoup_bench.shiftsets import superclass_scorer
from helpers import tiny_model


def image_set(n: int, seed: int, names: list[str]) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(images=torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), paths=[f"c/{s}.png" for s in names],
                    labels=torch.randint(0, 3, (n,), generator=g), class_names=["a", "b", "c"])


def evals_of(corruptions=("fog", "snow"), per=8, clean=30) -> dict[str, ImageSet]:
    out = {"clean": image_set(clean, 0, [f"{i:05d}" for i in range(clean)])}
    for k, c in enumerate(corruptions):
        out[f"even/{c}"] = image_set(per, 10 + k, [f"{i:05d}" for i in range(0, 2 * per, 2)])
        out[f"odd/{c}"] = image_set(per, 20 + k, [f"{i:05d}" for i in range(1, 2 * per, 2)])
    return out


def test_validation_is_the_clean_images_no_corrupted_image_comes_from():
    evals = evals_of(per=8, clean=30)
    kept = validation_set(evals, minimum=1)
    assert [p for p in kept.paths] == [f"c/{i:05d}.png" for i in range(16, 30)]  # 0-15 are corrupted originals
    assert validation_set(evals, minimum=15) is None and validation_set({"odd/fog": evals["odd/fog"]}, minimum=1) is None


def test_a_soup_equal_to_the_deployed_model_is_never_deployed(tmp_path):
    model = tiny_model(seed=1)
    deployed = save_checkpoint(tmp_path / "deployed.safetensors", model.state_dict(), model_meta(model))
    same = save_checkpoint(tmp_path / "same.safetensors", model.state_dict(), model_meta(model))
    other = tiny_model(seed=2)
    ingredient = save_checkpoint(tmp_path / "other.safetensors", other.state_dict(), model_meta(other))
    soups = {"deployed": deployed, "self_task_vector_soup": same, "self_plus_deployed_soup": ingredient}
    evals = evals_of()
    out = shift_estimates(soups, evals, ["fog", "snow"], Preprocess.for_model(model), resamples=20, min_validation=1, log=lambda m: None)
    assert out["candidates"] == ["self_task_vector_soup"] and out["validation_images"] == 14
    gate = out["gate"]
    # identical logits: every estimator's gain is exactly 0 < margin, so the rule keeps the deployed model everywhere
    assert gate["switched"] == 0 and gate["chosen"] == gate["deployed"] == gate["always_candidate"]
    assert gate["worst_regret_vs_deployed"] == 0.0 and set(gate["per_shift"]) == {"fog", "snow"}
    for shift in ("fog", "snow"):
        est = out["per_shift"][shift]["estimates"]
        assert est["deployed"]["cot"] == pytest.approx(est["self_task_vector_soup"]["cot"])
    assert set(out["estimators"]) >= {"atc-ne", "doc", "cot"} and out["rule"] == {"margin": 0.5, "estimators": ["cot"]}
    text = "\n".join(estimates_lines(out))
    assert "Deploy decision without labels" in text and "| cot |" in text


def test_without_validation_or_candidates_the_entry_says_why(tmp_path):
    evals = evals_of()
    del evals["clean"]
    model = tiny_model()
    out = shift_estimates({"deployed": tmp_path / "x"}, evals, ["fog"], Preprocess.for_model(model), log=lambda m: None)
    assert "--clean" in out["skipped"] and "none" in estimates_lines(out)[1]
    out = shift_estimates({"deployed": tmp_path / "x"}, evals_of(), ["fog"], Preprocess.for_model(model), min_validation=1, log=lambda m: None)
    assert "deployable" in out["skipped"]


def test_superclass_logits_predict_what_laion_c_scores():
    torch.manual_seed(0)
    member = torch.zeros(10, 3)
    member[[0, 1, 2], 0] = 1
    member[[3, 4], 1] = 1
    member[[7, 8, 9], 2] = 1  # classes 5 and 6 are in no superclass
    logits = torch.randn(200, 10) * 3
    labels = torch.randint(0, 3, (200,))
    converted = superclass_logits(member)(logits)
    assert converted.shape == (200, 3)
    assert float((converted.argmax(1) == labels).float().mean() * 100) == pytest.approx(superclass_scorer(member)(logits, labels))
    # closed form: the log of the mean member probability
    probs = logits.softmax(1)
    assert torch.allclose(converted[:, 1], torch.log((probs[:, 3] + probs[:, 4]) / 2), atol=1e-6)


def test_logits_the_evaluation_already_made_are_reused_not_recomputed(tmp_path):
    from adaptsoup.core.evaluation import run_model

    models = {"deployed": tiny_model(seed=1), "self_task_vector_soup": tiny_model(seed=2)}
    paths = {n: save_checkpoint(tmp_path / f"{n}.safetensors", m.state_dict(), model_meta(m)) for n, m in models.items()}
    evals, pre = evals_of(), Preprocess.for_model(models["deployed"])
    fresh = shift_estimates(paths, evals, ["fog", "snow"], pre, resamples=20, min_validation=1, log=lambda m: None)
    known = {key: {n: run_model(m, images, pre).logits.float() for n, m in models.items()} for key, images in evals.items()}
    missing = {n: tmp_path / "absent" / f"{n}.safetensors" for n in models}  # loading any of these would fail
    reused = shift_estimates(missing, evals, ["fog", "snow"], pre, resamples=20, min_validation=1, known=known, log=lambda m: None)
    assert reused["gate"] == fresh["gate"] and reused["per_shift"] == fresh["per_shift"]
