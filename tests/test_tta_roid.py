"""ROID: its loss, weights, prior correction and weight ensemble on constructed inputs; two adaptation steps
against a transcription of the official update; its augmentation; the run directory and the command line."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import adaptsoup  # noqa: F401
from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.core.data import Preprocess
from adaptsoup.core.models import model_meta
from adaptsoup.errors import AdaptsoupError
from adaptsoup.tta.adapter import TTA_METHODS, Adapter, TTAConfig
from adaptsoup.tta.roid import (augment, ensemble_with_source, prior_correction, sample_weights, soft_likelihood_ratio,
                                symmetric_cross_entropy)
from adaptsoup.tta.stream import tta_run_dir
from helpers import CLASS_NAMES, tiny_model, write_noise_images


def batch(seed: int, n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_roid_is_registered_with_its_official_optimizer():
    assert "roid" in TTA_METHODS
    cfg = TTAConfig(method="roid", batch_size=64)
    assert cfg.lr() == pytest.approx(2.5e-4) and (cfg.roid_alpha, cfg.roid_temperature) == (0.99, 1 / 3)
    adapter = Adapter(tiny_model(seed=0), cfg)
    group = adapter.optimizer.param_groups[0]
    assert isinstance(adapter.optimizer, torch.optim.SGD) and group["nesterov"] and group["momentum"] == 0.9
    assert TTAConfig(method="roid", optimizer="adam", batch_size=200).lr() == pytest.approx(1e-3)
    with pytest.raises(AdaptsoupError, match="roid_prior"):
        Adapter(tiny_model(seed=0), TTAConfig(method="roid", roid_prior="bayes"))


# ----------------------------------------------------------------------------------------------------------------
# The pieces, closed form


def test_prior_correction_by_hand():
    p = [[0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]]
    logits = torch.tensor(p).log()
    prior = [(a + b) / 2 for a, b in zip(*p)]  # [0.4, 0.15, 0.2, 0.25]
    s = max(1 / 2, 1 / 4) / max(prior)  # 1.25
    smoothed = [(q + s) / (1 + s * 4) for q in prior]
    assert smoothed == pytest.approx([1.65 / 6, 1.4 / 6, 1.45 / 6, 1.5 / 6])
    expected = [[a * w for a, w in zip(row, smoothed)] for row in p]
    expected = [[v / sum(row) for v in row] for row in expected]
    out = prior_correction(logits, "probabilities")
    assert out.softmax(dim=1).tolist() == [pytest.approx(row, abs=1e-6) for row in expected]
    assert out.exp().sum(dim=1).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)  # log-probabilities
    official = prior_correction(logits, "logits")  # roid.py: outputs *= smoothed_prior, on the logits
    assert official.tolist() == [pytest.approx([math.log(v) * w for v, w in zip(row, smoothed)], abs=1e-6) for row in p]
    assert torch.equal(prior_correction(logits, "none"), logits)


def test_the_official_logit_product_can_turn_a_prediction_against_the_prior():
    """Why the default corrects probabilities: with negative logits, z * prior lowers the favoured class."""
    logits = torch.tensor([[-1.0, -1.5], [5.0, 0.0], [5.0, 0.0], [5.0, 0.0]])  # the batch favours class 0
    assert prior_correction(logits, "probabilities").argmax(dim=1)[0] == 0
    assert prior_correction(logits, "logits").argmax(dim=1)[0] == 1


def test_soft_likelihood_ratio_and_symmetric_cross_entropy_by_hand():
    p = [0.5, 0.3, 0.2]
    expected = -sum(v * math.log(v / (1 - v) + 1e-5) for v in p)
    assert float(soft_likelihood_ratio(torch.tensor([p]).log())) == pytest.approx(expected, abs=1e-6)
    confident = torch.tensor([[20.0, 0.0, 0.0]])  # p0 ~ 1 is clipped at 0.99
    q = confident.softmax(dim=1)[0].tolist()
    clipped = -(0.99 * math.log(0.99 / 0.01 + 1e-5) + 2 * q[1] * math.log(q[1] / (1 - q[1]) + 1e-5))
    assert float(soft_likelihood_ratio(confident)) == pytest.approx(clipped, rel=1e-5)
    a, b = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    by_hand = 0.5 * (-(b.softmax(1) * a.log_softmax(1)).sum()) + 0.5 * (-(a.softmax(1) * b.log_softmax(1)).sum())
    assert float(symmetric_cross_entropy(a, b)) == pytest.approx(float(by_hand))


def test_certainty_and_diversity_weights_by_hand():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 1.0], [2.0, 2.0, 0.0]])
    m = torch.tensor([0.6, 0.3, 0.1])
    p = logits.softmax(dim=1)
    div = [1 - float(torch.dot(m, q) / (m.norm() * q.norm())) for q in p]
    cert = [float((q * q.log()).sum()) for q in p]  # minus the entropy
    norm = lambda v: [(x - min(v)) / (max(v) - min(v)) for x in v]  # noqa: E731
    div, cert = norm(div), norm(cert)
    keep = [d >= sum(div) / 4 for d in div]
    weights, kept = sample_weights(logits, m)
    assert kept.tolist() == keep and 0 < sum(keep) < 4
    assert weights.tolist() == pytest.approx([math.exp(d * c * 3) if k else 0.0 for d, c, k in zip(div, cert, keep)], abs=1e-5)
    one, kept_one = sample_weights(logits[:1], m)  # a batch of one: no spread to normalise, weight 1
    assert kept_one.tolist() == [True] and one.tolist() == [1.0]


def test_weight_ensemble_alpha_one_keeps_alpha_zero_resets():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))]
    source = [torch.randn(5), torch.randn(3)]
    adapted = [p.detach().clone() for p in params]
    ensemble_with_source(params, source, 1.0)
    assert all(torch.equal(p, a) for p, a in zip(params, adapted))
    ensemble_with_source(params, source, 0.25)
    assert all(torch.allclose(p, 0.25 * a + 0.75 * s) for p, a, s in zip(params, adapted, source))
    ensemble_with_source(params, source, 0.0)
    assert all(torch.equal(p, s) for p, s in zip(params, source))


def test_alpha_zero_keeps_the_soup_and_alpha_one_drifts():
    soup = tiny_model(seed=2)
    adapter = Adapter(copy.deepcopy(soup), TTAConfig(method="roid", roid_alpha=0.0, base_lr=5.0, roid_prior="none"))
    for seed in range(3):
        adapter.predict_and_adapt(batch(seed))
    assert all(torch.equal(v, soup.state_dict()[k]) for k, v in adapter.model.state_dict().items())
    assert torch.allclose(adapter.predict_and_adapt(batch(9)), soup(batch(9)), atol=1e-6)
    free = Adapter(copy.deepcopy(soup), TTAConfig(method="roid", roid_alpha=1.0, base_lr=5.0))
    free.predict_and_adapt(batch(0))
    changed = {k for k, v in free.model.state_dict().items() if not torch.equal(v, soup.state_dict()[k])}
    assert changed and changed <= {n for n, _ in free.named_params}  # only LayerNorm affine parameters move


# ----------------------------------------------------------------------------------------------------------------
# Two steps against the official update rule


def official_roid_step(model, src, names, params, x, class_probs, view, batch_size, lr, buf, alpha=0.99, T=1 / 3):
    """A transcription of mariodoebler/test-time-adaptation classification/methods/roid.py ``ROID.loss_calculation``
    and ``ROID.forward_and_adapt`` (losses from utils/losses.py, ``ema_update_model`` from utils/misc.py), with one
    step of SGD(momentum=0.9, nesterov=True) written out.  ``view`` stands in for its random ``tta_transform``."""
    outputs = model(x)
    with torch.no_grad():
        w_div = 1 - F.cosine_similarity(class_probs.unsqueeze(0), outputs.softmax(1), dim=1)
        w_div = (w_div - w_div.min()) / (w_div.max() - w_div.min())
        mask = w_div < w_div.mean()
        w_cert = (outputs.softmax(1) * outputs.log_softmax(1)).sum(1)
        w_cert = (w_cert - w_cert.min()) / (w_cert.max() - w_cert.min())
        weights = torch.exp(w_div * w_cert / T)
        weights[mask] = 0.0
        class_probs = 0.9 * class_probs + 0.1 * outputs.softmax(1).mean(0)
    probs = outputs.softmax(1).clamp(0.0, 0.99)
    loss = (-(probs * torch.log(probs / (1 - probs) + 1e-5)).sum(1) * weights)[~mask].sum() / batch_size
    aug = model(view(x[~mask]))
    ref = outputs[~mask]
    sce = -0.5 * (ref.softmax(1) * aug.log_softmax(1)).sum(1) - 0.5 * (aug.softmax(1) * ref.log_softmax(1)).sum(1)
    loss = loss + (sce * weights[~mask]).sum() / batch_size
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    with torch.no_grad():
        for n, g in zip(names, grads):
            buf[n] = g.clone() if n not in buf else 0.9 * buf[n] + g
            params[n].sub_(lr * (g + 0.9 * buf[n]))
            params[n].copy_(alpha * params[n] + (1 - alpha) * src[n])
        prior = outputs.softmax(1).mean(0)
        smooth = max(1 / outputs.shape[0], 1 / outputs.shape[1]) / torch.max(prior)
        outputs = outputs * ((prior + smooth) / (1 + smooth * outputs.shape[1]))
    return outputs, class_probs, int((~mask).sum())


def test_two_steps_match_the_official_update():
    model = tiny_model(seed=5)
    ref = copy.deepcopy(model).eval()
    x1, x2 = batch(31), batch(32)
    view = lambda v: 0.8 * v.flip(-1) + 0.1  # noqa: E731  a fixed augmentation on both sides
    lr, alpha = 0.5, 0.9
    cfg = TTAConfig(method="roid", batch_size=8, base_lr=lr / 8 * 64, roid_alpha=alpha, roid_prior="logits")
    adapter = Adapter(model, cfg)
    adapter.state.augment = view
    names = [n for n, _ in adapter.named_params]
    for p in ref.parameters():
        p.requires_grad_(False)
    params = dict(ref.named_parameters())
    src = {n: params[n].detach().clone() for n in names}
    for n in names:
        params[n].requires_grad_(True)
    class_probs, buf = torch.full((3,), 1 / 3), {}
    for x in (x1, x2):
        expected, class_probs, kept = official_roid_step(ref, src, names, params, x, class_probs, view, 8, lr, buf, alpha)
        assert torch.allclose(adapter.predict_and_adapt(x), expected, atol=1e-5)
        assert adapter.records[-1].passed_second == kept and 0 < kept < 8
        assert torch.allclose(adapter.state.probs_ema, class_probs, atol=1e-6)
        for n in names:  # tolerance: float32 reductions in a different order
            assert torch.allclose(dict(model.named_parameters())[n], params[n], atol=1e-6), n
    moved = max(float((params[n] - src[n]).abs().max()) for n in names)
    assert moved > 1e-4  # the steps did change the model


# ----------------------------------------------------------------------------------------------------------------
# Augmentation, run directory, command line


def test_augmentation_is_seeded_keeps_the_shape_and_the_pixel_range():
    pre = Preprocess.for_model(tiny_model(seed=0))
    x = pre.normalize(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    a = augment(x, pre.mean, pre.std, torch.Generator().manual_seed(1))
    b = augment(x, pre.mean, pre.std, torch.Generator().manual_seed(1))
    c = augment(x, pre.mean, pre.std, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c) and not torch.allclose(a, x)
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    pixels = a * std + mean
    assert float(pixels.min()) >= -1e-5 and float(pixels.max()) <= 1 + 1e-5


def test_run_directory_and_command_line(tmp_path, capsys):
    from adaptsoup_cli.main import main

    model = tiny_model(seed=0)
    path = save_checkpoint(tmp_path / "m.safetensors", model.state_dict(), model_meta(model))
    for i, name in enumerate(CLASS_NAMES):
        write_noise_images(tmp_path / "stream" / name, 4, seed=i)
    summary = tta_run_dir(str(path), str(tmp_path / "out"), TTAConfig(method="roid", batch_size=4),
                          eval_labels=str(tmp_path / "stream"), log=lambda m: None)
    assert summary["method"] == "roid" and summary["batches"] == 3 and summary["roid_consistency"]
    assert summary["roid_prior"] == "probabilities" and summary["roid_alpha"] == 0.99
    with pytest.raises(SystemExit) as info:
        main(["tta", "--model", str(path), "--target", str(tmp_path / "stream"), "--method", "roid", "--batch-size", "4",
              "--out", str(tmp_path / "cli"), "--no-progress"])
    assert info.value.code in (0, None), capsys.readouterr().err
    assert json.loads((tmp_path / "cli" / "manifest.json").read_text())["result"]["method"] == "roid"
