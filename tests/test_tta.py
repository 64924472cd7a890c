"""Test-time adaptation: SAR's filter, SAM step, parameter selection and reset rule; Tent; the tta command."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import timm
import torch

import adaptsoup  # noqa: F401
from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.core.data import ImageSet, Preprocess, load_folder
from adaptsoup.errors import AdaptsoupError
from adaptsoup.core.models import model_meta
from adaptsoup.tta.adapter import Adapter, TTAConfig, norm_parameters
from adaptsoup.tta.entropy import softmax_entropy
from adaptsoup.tta.sar import reliable, update_ema
from adaptsoup.tta.stream import run_tta, tta_run_dir
from helpers import CLASS_NAMES, tiny_model, write_noise_images


def test_entropy_filter_keeps_confident_samples_only():
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0], [3.0, 2.9, 0.0]])
    ent = softmax_entropy(logits)
    assert ent[1].item() == pytest.approx(math.log(3))
    e0 = 0.4 * math.log(3)
    assert reliable(ent, e0).tolist() == [True, False, False]


@pytest.mark.parametrize("depth,blocks", [(4, 3), (6, 4), (12, 9)])
def test_sar_updates_layernorms_below_the_top_quarter(depth, blocks):
    model = timm.create_model("vit_pico_patch4_32", depth=depth, global_pool="avg")  # has fc_norm
    names = [n for n, _ in norm_parameters(model, "sar")]
    assert len(names) == blocks * 4  # norm1/norm2 weight and bias per block
    assert {n.split(".")[1] for n in names} == {str(i) for i in range(blocks)}
    assert not any(n.startswith(("norm.", "fc_norm.")) for n in names)
    tent = [n for n, _ in norm_parameters(model, "tent")]
    assert len(tent) == depth * 4 + 2  # every block + fc_norm (norm is Identity with avg pooling)


def test_vit_b_selection_matches_the_reference_count():
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    params = norm_parameters(model, "sar")
    assert len(params) == 36 and params[-1][0] == "blocks.8.norm2.bias"


def test_only_selected_parameters_change():
    model = tiny_model(seed=0)
    before = copy.deepcopy(model.state_dict())
    adapter = Adapter(model, TTAConfig(method="sar", e0_factor=10.0, batch_size=8, base_lr=0.1))
    adapter.predict_and_adapt(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    selected = {n for n, _ in adapter.named_params}
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= selected


def trainable_like(ref, adapter):
    """``ref``'s parameters by name, with gradients on exactly the ones ``adapter`` updates."""
    params = dict(ref.named_parameters())
    names = [n for n, _ in adapter.named_params]
    for p in ref.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    return params, names


def test_sam_step_matches_a_hand_written_reference():
    torch.manual_seed(0)
    model = tiny_model(seed=3)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)
    cfg = TTAConfig(method="sar", e0_factor=10.0, rho=0.05, base_lr=0.5, batch_size=6, reset_threshold=-1.0)  # everything passes
    adapter = Adapter(model, cfg)
    logits = adapter.predict_and_adapt(x)

    # the same formulas by hand: g1 at w; e = rho g1/|g1|; g2 at w+e; w <- w - lr g2 (SGD, first step: no momentum yet)
    params, names = trainable_like(ref, adapter)
    first = ref.eval()(x)
    assert torch.allclose(first, logits, atol=1e-6)
    e0 = 10.0 * math.log(3)
    ent = softmax_entropy(first)
    g1 = torch.autograd.grad(ent[ent < e0].mean(), [params[n] for n in names])
    norm = torch.sqrt(sum((g ** 2).sum() for g in g1))
    with torch.no_grad():
        for n, g in zip(names, g1):
            params[n].add_(cfg.rho * g / (norm + 1e-12))
    ent2 = softmax_entropy(ref(x))
    g2 = torch.autograd.grad(ent2[ent2 < e0].mean(), [params[n] for n in names])
    with torch.no_grad():
        for n, g, g_first in zip(names, g2, g1):
            params[n].sub_(cfg.rho * g_first / (norm + 1e-12))
            params[n].sub_(cfg.lr() * g)
    for n in names:
        assert torch.allclose(dict(model.named_parameters())[n], params[n], atol=1e-6), n


def test_sam_step_with_both_filters_dropping_samples_matches_the_reference_way():
    """The reference forwards the whole batch at w+e and masks twice; the adapter forwards only the reliable ones."""
    model = tiny_model(seed=0)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        ent0 = softmax_entropy(ref(x)).sort().values
    e0 = float(ent0[2] + ent0[3]) / 2  # 3 of 8 pass the first filter; at w + e(w) one of them no longer does
    cfg = TTAConfig(method="sar", e0_factor=e0 / math.log(3), rho=0.5, base_lr=0.5, batch_size=8, reset_threshold=-1.0)
    adapter = Adapter(model, cfg)
    adapter.predict_and_adapt(x)
    record = adapter.records[0]
    assert (record.passed_first, record.passed_second) == (3, 2)

    params, names = trainable_like(ref, adapter)
    ent = softmax_entropy(ref(x))
    first = ent < e0
    g1 = torch.autograd.grad(ent[first].mean(), [params[n] for n in names])
    norm = torch.sqrt(sum((g ** 2).sum() for g in g1))
    saved = {n: params[n].detach().clone() for n in names}
    with torch.no_grad():
        for n, g in zip(names, g1):
            params[n].add_(cfg.rho * g / (norm + 1e-12))
    ent2 = softmax_entropy(ref(x))[first]  # the whole batch, then the first mask, then the second
    second = ent2 < e0
    assert int(second.sum()) == record.passed_second
    g2 = torch.autograd.grad(ent2[second].mean(), [params[n] for n in names])
    with torch.no_grad():
        for n, g in zip(names, g2):
            params[n].copy_(saved[n] - cfg.lr() * g)
    for n in names:
        assert torch.allclose(dict(model.named_parameters())[n], params[n], atol=1e-6), n


def test_online_predictions_come_before_each_update_in_a_seeded_order():
    images = ImageSet(images=torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
                      labels=None, paths=[f"{i}.png" for i in range(10)])
    pre = Preprocess(size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    cfg = TTAConfig(method="tent", batch_size=4, base_lr=5.0, seed=3)
    model = tiny_model(seed=0)
    with torch.no_grad():
        before = model.eval()(pre.normalize(images.images))
    res, _ = run_tta(copy.deepcopy(model), images, pre, cfg)
    first_batch = res.order[:4]
    assert torch.allclose(res.logits[first_batch], before[first_batch], atol=1e-5)  # predicted, then updated
    later = res.order[4:]
    assert not torch.allclose(res.logits[later], before[later], atol=1e-3)  # the updates did change later predictions
    again, _ = run_tta(copy.deepcopy(model), images, pre, cfg)
    assert torch.equal(again.order, res.order) and torch.allclose(again.logits, res.logits)
    other, _ = run_tta(copy.deepcopy(model), images, pre, dataclasses.replace(cfg, seed=4))
    assert not torch.equal(other.order, res.order)


def test_adapting_under_no_grad_still_adapts():
    model = tiny_model(seed=0)
    before = copy.deepcopy(model.state_dict())
    adapter = Adapter(model, TTAConfig(method="tent", base_lr=1.0))
    with torch.no_grad():
        adapter.predict_and_adapt(torch.randn(4, 3, 32, 32))
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_tent_with_adam_as_its_cifar_reference():
    cfg = TTAConfig(method="tent", optimizer="adam", batch_size=200)
    assert cfg.lr() == pytest.approx(1e-3)
    model = tiny_model(seed=0)
    before = copy.deepcopy(model.state_dict())
    adapter = Adapter(model, dataclasses.replace(cfg, batch_size=4))
    assert isinstance(adapter.optimizer, torch.optim.Adam)
    adapter.predict_and_adapt(torch.randn(4, 3, 32, 32))
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(AdaptsoupError, match="adam for tent"):
        Adapter(tiny_model(seed=0), TTAConfig(method="sar", optimizer="adam"))


def test_no_reliable_sample_means_no_update():
    model = tiny_model(seed=0)
    before = copy.deepcopy(model.state_dict())
    adapter = Adapter(model, TTAConfig(method="sar", e0_factor=0.0))  # E0 = 0: nothing passes
    adapter.predict_and_adapt(torch.randn(4, 3, 32, 32))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert adapter.records[0].skipped and adapter.records[0].passed_first == 0


def test_ema_and_reset_rule_on_a_constructed_loss_sequence():
    ema = None
    seq = [1.0, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    history = []
    for loss in seq:
        ema = update_ema(ema, loss)
        history.append(ema)
    assert history[0] == 1.0 and history[1] == pytest.approx(0.95)
    assert history[2] == pytest.approx(0.9 * 0.95 + 0.01)
    # with losses pinned near zero, the adapter resets when the EMA falls below 0.2 and then restarts it
    model = tiny_model(seed=0)
    adapter = Adapter(model, TTAConfig(method="sar", e0_factor=10.0, reset_threshold=0.2))
    adapter.ema = 0.21
    original = copy.deepcopy(adapter._initial_model)
    with torch.no_grad():
        model.head.weight.mul_(100)  # confident predictions: second-step loss near 0
    adapter.predict_and_adapt(torch.randn(8, 3, 32, 32))
    record = adapter.records[-1]
    assert record.reset and adapter.ema is None
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_tent_updates_all_layernorms_and_reduces_entropy(tmp_path):
    model = tiny_model(seed=0)
    write_noise_images(tmp_path / "s", 32, seed=2)
    pre = Preprocess.for_model(model)
    images = load_folder(tmp_path / "s", pre, cache=False)
    x = pre.normalize(images.images)
    with torch.no_grad():
        before = softmax_entropy(model(x)).mean()
    result, adapter = run_tta(model, images, pre, TTAConfig(method="tent", batch_size=32, base_lr=5.0, shuffle=False))
    for _ in range(5):
        adapter.predict_and_adapt(x)
    with torch.no_grad():
        after = softmax_entropy(adapter.model(x)).mean()
    assert after < before
    assert result.logits.shape == (32, 3)


def test_episodic_mode_predicts_every_batch_from_the_initial_model(tmp_path):
    model = tiny_model(seed=0)
    write_noise_images(tmp_path / "s", 16, seed=2)
    pre = Preprocess.for_model(model)
    images = load_folder(tmp_path / "s", pre, cache=False)
    with torch.no_grad():
        reference = model(pre.normalize(images.images))
    result, _ = run_tta(model, images, pre, TTAConfig(method="tent", batch_size=4, base_lr=5.0, episodic=True, shuffle=False))
    assert torch.allclose(result.logits, reference, atol=1e-5)


def test_tta_run_dir_writes_predictions_checkpoint_and_manifest(tmp_path):
    model = tiny_model(seed=0)
    path = save_checkpoint(tmp_path / "m.safetensors", model.state_dict(), model_meta(model))
    for i, name in enumerate(CLASS_NAMES):
        write_noise_images(tmp_path / "stream" / name, 5, seed=i)
    summary = tta_run_dir(str(path), str(tmp_path / "out"), TTAConfig(method="sar", batch_size=4), eval_labels=str(tmp_path / "stream"), log=lambda m: None)
    assert summary["batches"] == 4 and summary["method"] == "sar"
    out = tmp_path / "out"
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0] == "path,class,probability,stream_position,label" and len(rows) == 16
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["result"]["batches"] == 4 and 0 <= manifest["result"]["online_accuracy"] <= 100
    assert "filtered_out_first" in manifest["result"] and "resets" in manifest["result"]
    from adaptsoup.core.models import load_model

    adapted = load_model(None, out / "adapted.safetensors")
    assert adapted.pretrained_cfg["label_names"] == CLASS_NAMES
    with pytest.raises(AdaptsoupError):
        tta_run_dir(str(path), str(tmp_path / "o2"), TTAConfig(), log=lambda m: None)


def test_non_vit_is_refused():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    with pytest.raises(AdaptsoupError, match="VisionTransformer"):
        norm_parameters(model, "sar")
