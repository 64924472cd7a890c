"""EATA: its two filters, its weights, its moving average and its Fisher term on constructed inputs; two
adaptation steps against a transcription of the official update; ETA when no Fisher images are given."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import adaptsoup  # noqa: F401
from adaptsoup.tta.adapter import TTA_METHODS, Adapter, TTAConfig, norm_parameters
from adaptsoup.tta.eata import fisher_information, sample_weights, select, update_probs
from adaptsoup.tta.entropy import softmax_entropy
from adaptsoup.tta.stream import tta_run_dir
from helpers import saved_model_and_labeled_stream, tiny_model, write_noise_images


def batch(seed: int, n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_eata_is_registered_and_adapts_every_layernorm():
    assert "eata" in TTA_METHODS
    model = tiny_model(seed=0)
    assert [n for n, _ in norm_parameters(model, "eata")] == [n for n, _ in norm_parameters(model, "tent")]
    cfg = TTAConfig(method="eata", batch_size=32)
    assert cfg.lr() == pytest.approx(1e-3 / 64 * 32)  # mr-eggplant/SAR main.py: vitbase_timm lr = 0.001 / 64 * bs
    assert TTAConfig(method="eata", optimizer="adam", batch_size=200).lr() == pytest.approx(1e-3)


# ----------------------------------------------------------------------------------------------------------------
# The pieces, closed form


def test_reliable_filter_masks_exactly_the_samples_at_or_above_e0():
    logits = torch.tensor([[10.0, 0.0, 0.0], [4.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [3.0, 2.9, 0.0]])
    # entropies by hand: -sum p ln p with p = softmax(row)
    def entropy(row):
        z = [math.exp(v) for v in row]
        return -sum(v / sum(z) * math.log(v / sum(z)) for v in z)
    ent = [entropy(row) for row in logits.tolist()]
    assert softmax_entropy(logits).tolist() == pytest.approx(ent, abs=1e-6)
    e0 = 0.4 * math.log(3)
    assert select(logits, e0, None, 0.05)[0].tolist() == [True, True, False, False, False]
    at = float(softmax_entropy(logits)[2])  # E0 exactly at a sample's entropy: that sample is masked (>= E0)
    assert select(logits, at, None, 0.05)[0].tolist() == [True, True, False, False, False]
    above = float(torch.nextafter(softmax_entropy(logits)[2], torch.tensor(math.inf)))  # the next float32 up
    assert select(logits, above, None, 0.05)[0].tolist() == [True, True, True, False, False]


def test_redundancy_filter_keeps_reliable_samples_unlike_the_moving_average():
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0], [0.0, 0.0, 0.0]])
    m = torch.tensor([0.8, 0.15, 0.05])
    p = logits.softmax(dim=1)
    cos = [float(torch.dot(m, q) / (m.norm() * q.norm())) for q in p]  # by hand
    assert cos[0] > 0.9 and 0.15 < cos[1] < 0.2 and 0.05 < cos[2] < 0.1
    reliable, selected = select(logits, 0.4 * math.log(3), m, d_margin=0.17)
    assert reliable.tolist() == [True, True, True, False]
    assert selected.tolist() == [c < 0.17 for c in cos[:3]] + [False] == [False, False, True, False]
    _, selected = select(logits, 0.4 * math.log(3), m, d_margin=0.5)
    assert selected.tolist() == [False, True, True, False]  # the uncertain sample never passes, however different
    _, first_batch = select(logits, 0.4 * math.log(3), None, d_margin=0.0)
    assert first_batch.tolist() == reliable.tolist()  # no average yet: every reliable sample is used


def test_weights_and_moving_average_by_hand():
    ent = torch.tensor([0.0, 0.2, 0.4])
    assert sample_weights(ent, 0.4).tolist() == pytest.approx([math.exp(0.4), math.exp(0.2), 1.0])
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    assert update_probs(None, probs).tolist() == pytest.approx([0.4, 0.25, 0.35])
    m = torch.tensor([1.0, 0.0, 0.0])
    assert update_probs(m, probs).tolist() == pytest.approx([0.9 + 0.04, 0.025, 0.035])
    assert update_probs(m, probs[:0]) is m and update_probs(None, probs[:0]) is None


def test_fisher_is_the_mean_over_batches_of_squared_pseudo_label_gradients():
    """Transcribes the Fisher loop of mr-eggplant/EATA main.py (algorithm 'eata'): per batch, CE of the outputs
    against their own argmax (the labels are overwritten), backward, accumulate grad**2, divide by the count."""
    model = tiny_model(seed=1)
    ref = copy.deepcopy(model)
    adapter = Adapter(model, TTAConfig(method="eata"), fisher_batches=[batch(1, 4), batch(2, 4)])
    fisher = adapter.state.fisher
    names = [n for n, _ in adapter.named_params]
    params = dict(ref.named_parameters())
    expected = {n: torch.zeros_like(params[n]) for n in names}
    for x in (batch(1, 4), batch(2, 4)):
        out = ref.eval()(x)
        grads = torch.autograd.grad(F.cross_entropy(out, out.argmax(1)), [params[n] for n in names])
        for n, g in zip(names, grads):
            expected[n] += g ** 2
    for n in names:
        assert torch.allclose(fisher[n][0], expected[n] / 2, rtol=1e-5, atol=1e-12), n
        assert torch.equal(fisher[n][1], params[n])  # anchored at the weights before adaptation
    assert adapter.state.fisher_images == 8 and all(p.grad is None for p in adapter.params)
    assert fisher_information(model, adapter.named_params, []) == (None, 0)


# ----------------------------------------------------------------------------------------------------------------
# Two steps against the official update rule


def official_eata_step(model, params, names, x, e0, d_margin, probs, fishers, alpha, lr, buf):
    """A transcription of mr-eggplant/EATA eata.py ``forward_and_adapt_eata`` (with ``update_model_probs``) and one
    step of torch SGD(momentum=0.9) written out: filter by entropy, then by |cosine| to the moving average,
    weight by 1/exp(ent - E0), mean, + alpha * sum F (p - p0)^2, step only if some sample is left."""
    outputs = model(x)
    ent = -(outputs.softmax(1) * outputs.log_softmax(1)).sum(1)
    ids1 = torch.where(ent < e0)
    ent = ent[ids1]
    if probs is not None:
        cos = F.cosine_similarity(probs.unsqueeze(0), outputs[ids1].softmax(1), dim=1)
        ids2 = torch.where(torch.abs(cos) < d_margin)
        ent = ent[ids2]
        new = outputs[ids1][ids2].softmax(1).detach()
        probs = probs if len(new) == 0 else 0.9 * probs + 0.1 * new.mean(0)
    else:
        new = outputs[ids1].softmax(1).detach()
        probs = None if len(new) == 0 else new.mean(0)
    loss = (ent * (1 / torch.exp(ent.detach() - e0))).mean(0)
    if fishers is not None:
        for n in names:
            loss = loss + alpha * (fishers[n][0] * (params[n] - fishers[n][1]) ** 2).sum()
    if len(ent) > 0:
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        with torch.no_grad():
            for n, g in zip(names, grads):
                buf[n] = g.clone() if n not in buf else 0.9 * buf[n] + g
                params[n].sub_(lr * buf[n])
    return outputs.detach(), probs, len(ids1[0]), len(ent)


def test_two_steps_match_the_official_update(tmp_path):
    model = tiny_model(seed=3)
    x1, x2 = batch(11), batch(12)
    with torch.no_grad():
        ent = softmax_entropy(model.eval()(x1)).sort().values
    e0 = float(ent[5] + ent[6]) / 2  # 6 of 8 are reliable at the first step
    fisher_x = [batch(20, 4), batch(21, 4)]
    ref = copy.deepcopy(model)

    # the transcription first: it tells which d_margin makes the second step drop some reliable samples
    probe = Adapter(copy.deepcopy(model), TTAConfig(method="eata", e0_factor=e0 / math.log(3)), fisher_batches=fisher_x)
    fishers = {n: (f.clone(), a.clone()) for n, (f, a) in probe.state.fisher.items()}
    names = [n for n, _ in probe.named_params]
    for p in ref.parameters():
        p.requires_grad_(False)
    params = dict(ref.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    lr, alpha, buf = 0.05, 1e4, {}
    out1, probs, n1, s1 = official_eata_step(ref.eval(), params, names, x1, e0, None, None, fishers, alpha, lr, buf)
    with torch.no_grad():
        out = ref(x2)
        reliable = softmax_entropy(out) < e0
        cos = F.cosine_similarity(probs.unsqueeze(0), out[reliable].softmax(1), dim=1).abs().sort().values
    assert len(cos) >= 2
    d_margin = float(cos[0] + cos[1]) / 2  # one reliable sample passes the redundancy filter at the second step
    out2, probs2, n2, s2 = official_eata_step(ref, params, names, x2, e0, d_margin, probs, fishers, alpha, lr, buf)

    cfg = TTAConfig(method="eata", e0_factor=e0 / math.log(3), d_margin=d_margin, fisher_alpha=alpha, batch_size=8,
                    base_lr=lr / 8 * 64)
    adapter = Adapter(model, cfg, fisher_batches=fisher_x)
    assert torch.allclose(adapter.predict_and_adapt(x1), out1, atol=1e-6)
    assert torch.allclose(adapter.predict_and_adapt(x2), out2, atol=1e-5)
    assert [(r.passed_first, r.passed_second) for r in adapter.records] == [(n1, s1), (n2, s2)] == [(6, 6), (n2, 1)]
    assert n2 > 1 and torch.allclose(adapter.state.probs_ema, probs2, atol=1e-6)  # averaged over the selected only
    for n in names:  # tolerance: float32 reductions in a different order
        assert torch.allclose(dict(model.named_parameters())[n], params[n], atol=1e-6), n

    # the Fisher term did act: without it (ETA) the second step lands elsewhere
    eta = Adapter(tiny_model(seed=3), TTAConfig(**{**cfg.__dict__, "fisher_alpha": 0.0}), fisher_batches=fisher_x)
    eta.predict_and_adapt(x1)
    eta.predict_and_adapt(x2)
    assert eta.state.fisher is None and eta.state.describe()["variant"] == "eta"
    moved = max(float((p - params[n]).abs().max()) for n, p in eta.named_params)
    assert moved > 1e-5


def test_nothing_selected_means_no_update_and_reset_forgets_the_average():
    model = tiny_model(seed=0)
    before = copy.deepcopy(model.state_dict())
    adapter = Adapter(model, TTAConfig(method="eata", e0_factor=0.0))  # E0 = 0: nothing is reliable
    adapter.predict_and_adapt(batch(0, 4))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert adapter.records[0].skipped and adapter.records[0].passed_first == 0 and adapter.state.probs_ema is None
    adapter = Adapter(tiny_model(seed=0), TTAConfig(method="eata", e0_factor=10.0, episodic=True))
    adapter.predict_and_adapt(batch(0, 4))
    assert adapter.state.probs_ema is not None
    adapter.reset()
    assert adapter.state.probs_ema is None


# ----------------------------------------------------------------------------------------------------------------
# Fisher images through the run directory and the command line


@pytest.fixture
def stream(tmp_path):
    path, _ = saved_model_and_labeled_stream(tmp_path)
    write_noise_images(tmp_path / "source", 10, seed=9)
    return path, tmp_path


def test_without_fisher_images_eata_is_eta_and_says_so(stream):
    path, tmp = stream
    lines = []
    summary = tta_run_dir(str(path), str(tmp / "eta"), TTAConfig(method="eata", batch_size=4),
                          eval_labels=str(tmp / "stream"), log=lines.append)
    assert any("running ETA" in line for line in lines)
    assert summary["variant"] == "eta" and summary["fisher_images"] == 0
    lines.clear()
    cfg = TTAConfig(method="eata", batch_size=4, fisher_images=str(tmp / "source"), fisher_size=6)
    summary = tta_run_dir(str(path), str(tmp / "eata"), cfg, eval_labels=str(tmp / "stream"), log=lines.append)
    assert any("Fisher information from 6 image(s)" in line for line in lines)
    manifest = json.loads((tmp / "eata" / "manifest.json").read_text())
    assert manifest["result"]["variant"] == "eata" and manifest["result"]["fisher_images"] == 6
    assert manifest["config"]["fisher_images"] == str(tmp / "source")


def test_tta_command_takes_eata_and_its_source(stream, capsys):
    from adaptsoup_cli.main import main

    path, tmp = stream
    with pytest.raises(SystemExit) as info:
        main(["tta", "--model", str(path), "--eval-labels", str(tmp / "stream"), "--method", "eata", "--source",
              str(tmp / "source"), "--d-margin", "0.4", "--fisher-alpha", "1", "--batch-size", "4", "--out", str(tmp / "cli"),
              "--no-progress"])
    assert info.value.code in (0, None), capsys.readouterr().err
    result = json.loads((tmp / "cli" / "manifest.json").read_text())["result"]
    assert result["method"] == "eata" and result["fisher_images"] == 10 and result["d_margin"] == 0.4
