"""LP-FT's linear probe: solved to convergence, so that its fit does not depend on the thread count.

A fixed budget of 200 L-BFGS steps stopped short of the minimiser on nearly separable features (a small
source set, weight decay 1e-4), and where it stopped depended on float rounding: on the demo's source
features, 1 and 2 threads gave probes 0.014 apart, and under torchrun (rank 0 on one thread, other
features by 2e-7) the probes were 0.04-0.08 from one process's.
"""

from __future__ import annotations

import copy

import pytest
import torch

from adaptsoup.core.data import ImageSet, Preprocess
from adaptsoup.core.evaluation import run_model
from adaptsoup.core.models import load_model
from adaptsoup.errors import AdaptsoupError
from adaptsoup.train.lpft import LinearProbeConfig, cached_linear_probe, fit_linear_probe, fit_logistic_regression, probe_objective
from tests.helpers import tiny_model

WEIGHT_DECAY = 1e-4  # the recipe's default (finetune.probe_weight_decay)


@pytest.fixture(scope="module")
def demo_source() -> tuple[torch.nn.Module, ImageSet]:
    """The demo's case: the shipped digits ViT and the demo's labeled source set (1,078 digits, 10 classes; its
    96 features are nearly separable, so that a probe with weight decay 1e-4 is badly conditioned)."""
    from adaptsoup_bench.demo import DEMO_MODEL
    from adaptsoup_bench.digits import digits_arrays, split_indices

    images, labels = digits_arrays()
    source = split_indices(len(labels))[0]
    data = ImageSet(images=torch.from_numpy(images[source]).permute(0, 3, 1, 2).contiguous(), paths=[str(i) for i in source],
                    labels=torch.from_numpy(labels[source]))
    return load_model(None, DEMO_MODEL), data


@pytest.fixture(scope="module")
def demo_features(demo_source) -> tuple[torch.Tensor, torch.Tensor]:
    model, data = demo_source
    return run_model(model, data, Preprocess.for_model(model), want_logits=False, want_features=True).features, data.labels


def _separable(n: int = 1200, dim: int = 96, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Small synthetic features: class means apart, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    means = torch.randn(classes, dim, generator=gen)
    return (means[labels] + 0.8 * torch.randn(n, dim, generator=gen)).float(), labels


def _gradient_by_autograd(feats, labels, weight, bias, weight_decay) -> float:
    """The largest entry of the gradient of the regularised objective, written plainly and differentiated by autograd."""
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    loss = torch.nn.functional.cross_entropy(feats.double() @ w.T + b, labels) + 0.5 * weight_decay * ((w * w).sum() + (b * b).sum())
    loss.backward()
    return float(torch.cat([w.grad.flatten(), b.grad]).abs().max())


def _at_threads(threads: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def test_the_fit_is_the_regularised_objectives_minimiser(demo_features):
    feats, labels = demo_features
    fit = fit_logistic_regression(feats, labels, 10, WEIGHT_DECAY)
    assert fit.converged and fit.iterations < 100 and fit.gradient_max <= 1e-10
    assert _gradient_by_autograd(feats, labels, fit.weight, fit.bias, WEIGHT_DECAY) < 1e-9  # the optimality condition
    # and it is a minimum: a small step any way raises the objective
    gen = torch.Generator().manual_seed(1)
    value = float(probe_objective(feats.double(), labels, fit.weight, fit.bias, WEIGHT_DECAY)[0])
    for _ in range(3):
        dw, db = 1e-3 * torch.randn(fit.weight.shape, generator=gen, dtype=torch.float64), 1e-3 * torch.randn(10, generator=gen, dtype=torch.float64)
        assert float(probe_objective(feats.double(), labels, fit.weight + dw, fit.bias + db, WEIGHT_DECAY)[0]) > value
    assert fit.objective == pytest.approx(value, abs=1e-15)


def test_the_closed_form_gradient_is_autograds():
    feats, labels = _separable(n=50, dim=8, classes=4)
    gen = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(4, 8, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    _, gw, gb, _ = probe_objective(feats.double(), labels, weight, bias, 0.3)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    (torch.nn.functional.cross_entropy(feats.double() @ w.T + b, labels) + 0.15 * ((w * w).sum() + (b * b).sum())).backward()
    assert torch.allclose(gw, w.grad, atol=1e-14) and torch.allclose(gb, b.grad, atol=1e-14)


def test_the_demos_probe_is_the_same_at_one_and_two_threads(demo_source):
    model, data = demo_source
    heads = []
    for threads in (1, 2):
        probed = copy.deepcopy(model)
        _at_threads(threads, lambda: fit_linear_probe(probed, data, Preprocess.for_model(probed), LinearProbeConfig()))
        heads.append(probed.get_classifier().state_dict())
    # the 200-step L-BFGS probe: 0.014 apart
    assert all(float((heads[0][k] - heads[1][k]).abs().max()) <= 1e-6 for k in heads[0])


def _labeled(n: int = 30) -> ImageSet:
    gen = torch.Generator().manual_seed(0)
    return ImageSet(images=torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen), paths=[str(i) for i in range(n)],
                    labels=torch.arange(n) % 3)


def test_the_probe_sets_the_head_and_records_how_it_converged(tmp_path):
    heads, records = [], []
    for threads in (1, 2):
        model = tiny_model()
        records.append(_at_threads(threads, lambda: fit_linear_probe(model, _labeled(), Preprocess.for_model(model), LinearProbeConfig())))
        heads.append(model.get_classifier().state_dict())
    record = records[0]
    assert record["converged"] and record["iterations"] >= 1 and record["gradient_max"] <= 1e-10 and record["cg_steps"] >= record["iterations"]
    assert record["train_acc"] == 100.0  # 30 images, 192 features: separable
    assert all(float((heads[0][k] - heads[1][k]).abs().max()) <= 1e-6 for k in heads[0])
    # the head is the fit: refitting the model's own features gives it back
    model = tiny_model()
    cache = tmp_path / "probe.safetensors"
    fitted, now = cached_linear_probe(model, _labeled(), Preprocess.for_model(model), LinearProbeConfig(), cache)
    again, later = cached_linear_probe(tiny_model(), _labeled(), Preprocess.for_model(model), LinearProbeConfig(), cache)
    assert now and not later and again["converged"] and again["iterations"] == fitted["iterations"]


def test_a_probe_out_of_iterations_says_it_did_not_converge():
    feats, labels = _separable()
    fit = fit_logistic_regression(feats, labels, 10, WEIGHT_DECAY, max_iter=2)
    assert fit.iterations == 2 and not fit.converged and fit.gradient_max > 1e-10


@pytest.mark.parametrize("kwargs, match", [
    ({"weight_decay": -1.0}, "weight decay must be >= 0"),
    ({"max_iter": 0}, "max_iter"),
    ({"tolerance_grad": 0.0}, "tolerance_grad > 0"),
    ({"labels": torch.tensor([0, 1, 3])}, r"labels must lie in \[0, 3\), got 0..3"),
    ({"labels": torch.tensor([0, 1])}, "3 feature rows for 2 labels"),
    ({"feats": torch.tensor([[0.0, float("nan")]] * 3)}, "NaN or inf"),
])
def test_bad_probe_settings_are_one_line_errors(kwargs, match):
    args = {"feats": torch.zeros(3, 4), "labels": torch.tensor([0, 1, 2]), "num_classes": 3, "weight_decay": 1e-4, **kwargs}
    with pytest.raises(AdaptsoupError, match=match) as info:
        fit_logistic_regression(**args)
    assert "\n" not in str(info.value)
