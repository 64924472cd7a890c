"""The drift guard (adaptsoup.tta.guard): its signals in closed form, its window rule, the resets it makes in an
Adapter, a guarded run that never fires predicting exactly as an unguarded one, and its flags in ``tta`` and
``adapt``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adaptsoup.errors import AdaptsoupError
from adaptsoup.tta.adapter import TTA_METHODS, Adapter, StepRecord, TTAConfig
from adaptsoup.tta.guard import DriftGuard, agreement, marginal_entropy
from adaptsoup.tta.stream import guard_log
from adaptsoup_cli.main import main
from helpers import build_adapt_inputs, saved_model_and_labeled_stream, tiny_model

CLASSES = 10


def stream_batch(n: int, seed: int) -> torch.Tensor:
    """Normalised inputs whose per-image colour offsets spread a tiny ViT's predictions over several classes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g) + 3 * torch.randn(n, 3, 1, 1, generator=g)


def spread_model(seed: int = 1) -> torch.nn.Module:
    """A tiny 10-class ViT whose head bias is centred on the stream, so that its predictions use many classes."""
    model = tiny_model(num_classes=CLASSES, seed=seed).eval()
    with torch.no_grad():
        model.head.bias.sub_(model(stream_batch(512, 99)).mean(0))
    return model


def one_hot_logits(classes: list[int], num_classes: int = 4) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(classes), num_classes).float() * 50.0


# ----------------------------------------------------------------------------------------------------------------
# The signals


def test_agreement_of_identical_logits_is_one_and_of_permuted_classes_zero():
    logits = torch.randn(32, 5, generator=torch.Generator().manual_seed(0))
    assert agreement(logits, logits) == 1.0
    shifted = logits[:, [1, 2, 3, 4, 0]]  # every row's argmax moves to another class
    assert agreement(logits, shifted) == 0.0
    assert agreement(one_hot_logits([0, 1, 2, 3]), one_hot_logits([0, 1, 3, 2])) == 0.5


def test_marginal_entropy_is_ln_c_for_a_uniform_mean_and_zero_for_one_class():
    assert marginal_entropy(torch.zeros(8, 7)) == pytest.approx(math.log(7))
    assert marginal_entropy(one_hot_logits([0, 1, 2, 3])) == pytest.approx(math.log(4), abs=1e-6)  # confident, balanced
    assert marginal_entropy(one_hot_logits([2, 2, 2, 2])) == pytest.approx(0.0, abs=1e-6)
    assert marginal_entropy(one_hot_logits([0, 0, 1, 1])) == pytest.approx(math.log(2), abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# The window rule


def test_the_guard_fires_exactly_when_the_window_mean_agreement_crosses_its_threshold():
    guard = DriftGuard(window=4, min_agreement=0.5, min_marginal_ratio=0.0)
    anchor = one_hot_logits([0, 1, 2, 3])
    same, half, none = anchor, one_hot_logits([0, 1, 3, 2]), one_hot_logits([1, 2, 3, 0])
    assert [guard.observe(a, anchor) for a in (none, none, none)] == [None, None, None]  # the window is not full yet
    assert guard.observe(same, anchor) == "agreement 0.25 < 0.5 over 4 batches"  # (0 + 0 + 0 + 4) / 16
    assert len(guard.signals) == 0  # the window restarts after firing
    for a in (same, same, half):
        assert guard.observe(a, anchor) is None
    assert guard.observe(half, anchor) is None  # (4 + 4 + 2 + 2) / 16 = 0.75
    assert guard.observe(none, anchor) is None  # the window moves: (4 + 2 + 2 + 0) / 16 = 0.5, not below 0.5
    assert guard.observe(none, anchor) == "agreement 0.25 < 0.5 over 4 batches"  # (2 + 2 + 0 + 0) / 16


def test_the_guard_fires_on_a_collapsed_mean_prediction_even_when_agreement_is_high():
    guard = DriftGuard(window=2, min_agreement=0.5, min_marginal_ratio=0.5)
    anchor = torch.tensor([[0.1, 0.0, 0.0, 0.0]] * 8)  # top-1 class 0, but unsure: mean prediction near uniform
    collapsed = one_hot_logits([0] * 8)  # the same top-1, all the mass on class 0
    assert guard.observe(collapsed, anchor) is None
    assert guard.observe(collapsed, anchor) == "marginal entropy ratio 0.00 < 0.5 over 2 batches"
    assert DriftGuard(window=1, min_agreement=0.5, min_marginal_ratio=0.0).observe(collapsed, anchor) is None  # signal off


@pytest.mark.parametrize("window,agree,ratio", [(0, 0.5, 0.5), (2, -0.1, 0.5), (2, 0.5, 1.5), (2.5, 0.5, 0.5)])
def test_bad_guard_settings_are_refused(window, agree, ratio):
    with pytest.raises(AdaptsoupError, match="guard_"):
        DriftGuard(window, agree, ratio)
    with pytest.raises(AdaptsoupError, match="guard_"):
        Adapter(tiny_model(), TTAConfig(method="tent", guard=True, guard_window=window, guard_min_agreement=agree,
                                        guard_min_marginal_ratio=ratio))


# ----------------------------------------------------------------------------------------------------------------
# In an Adapter


def run_stream(cfg: TTAConfig, batches: int = 24) -> tuple[Adapter, torch.Tensor, torch.Tensor]:
    """``cfg`` over a seeded stream of 16-image batches; the adapter, its online logits and the unadapted model's."""
    adapter, anchor = Adapter(spread_model(), cfg), spread_model()
    logits, reference = [], []
    for b in range(batches):
        x = stream_batch(16, b)
        logits.append(adapter.predict_and_adapt(x))
        with torch.no_grad():
            reference.append(anchor(x))
    return adapter, torch.cat(logits), torch.cat(reference)


def test_a_destructive_learning_rate_collapses_without_the_guard_and_is_reset_with_it():
    cfg = TTAConfig(method="tent", batch_size=16, base_lr=1.0, optimizer="adam", guard_window=4)
    plain, logits, reference = run_stream(cfg)
    late = slice(8 * 16, None)
    assert agreement(logits[late], reference[late]) < 0.3  # collapsed onto few classes, away from the soup
    assert marginal_entropy(logits[late]) < 0.5 * marginal_entropy(reference[late])
    assert not any(r.guard_reset for r in plain.records) and plain.guard is None and plain.anchor is None

    cfg.guard = True
    guarded, logits_g, _ = run_stream(cfg)
    fired = [r for r in guarded.records if r.guard_reset]
    assert len(fired) > 0
    assert all(r.guard_reason and r.guard_reason.endswith("over 4 batches") for r in fired)
    assert all(("agreement" in r.guard_reason) or ("marginal entropy ratio" in r.guard_reason) for r in fired)
    assert all(r.guard_reason is None for r in guarded.records if not r.guard_reset)
    assert fired[0].batch >= 3  # a full window first
    assert agreement(logits_g, reference) > agreement(logits, reference)
    # after a reset the next batch is predicted by the unadapted model again
    after = fired[0].batch + 1
    rows = slice(after * 16, (after + 1) * 16)
    assert torch.allclose(logits_g[rows], reference[rows], atol=1e-4)


@pytest.mark.parametrize("method", TTA_METHODS)
def test_a_guard_that_never_fires_leaves_the_predictions_bit_identical(method):
    cfg = TTAConfig(method=method, batch_size=16, base_lr=1e-2, e0_factor=10.0, d_margin=1.0, guard_window=2,
                    guard_min_agreement=0.0, guard_min_marginal_ratio=0.0)
    _, plain, reference = run_stream(cfg, batches=6)
    assert not torch.allclose(plain[-16:], reference[-16:], atol=1e-4)  # it did adapt
    cfg.guard = True
    guarded, logits, _ = run_stream(cfg, batches=6)
    assert not any(r.guard_reset for r in guarded.records) and len(guarded.guard.signals) == 2  # it looked, and let go
    assert torch.equal(plain, logits)


def test_a_reset_of_the_method_itself_restarts_the_guards_window():
    cfg = TTAConfig(method="sar", batch_size=16, base_lr=1e-2, e0_factor=10.0, reset_threshold=1e9, guard=True)
    adapter = Adapter(spread_model(), cfg)
    adapter.predict_and_adapt(stream_batch(16, 0))
    assert adapter.records[-1].reset and not adapter.records[-1].guard_reset
    assert len(adapter.guard.signals) == 0


def test_the_log_says_how_many_guard_resets_and_at_which_batches():
    records = [StepRecord(b, 4, 4, 4, 0.1, None, False, False, guard_reset=b in (3, 9), guard_reason="x") for b in range(12)]
    assert guard_log(records) == ", 2 guard resets at batches 3, 9"
    assert guard_log(records[:5]) == ", 1 guard reset at batch 3"
    assert guard_log(records[:2]) == ", no guard reset"


# ----------------------------------------------------------------------------------------------------------------
# The command line


@pytest.fixture
def tta_inputs(tmp_path):
    return saved_model_and_labeled_stream(tmp_path)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return (0 if info.value.code is None else info.value.code), captured.out, captured.err


def test_tta_guard_flags_reach_the_manifest_and_the_log(tmp_path, tta_inputs, capsys):
    model, stream = tta_inputs
    code, out, err = run_cli(capsys, "tta", "--model", model, "--eval-labels", stream, "--method", "tent", "--batch-size", 2,
                             "--base-lr", 100, "--optimizer", "adam", "--guard", "--guard-window", 2, "--guard-min-agreement",
                             0.9, "--guard-min-marginal-ratio", 0.25, "--out", tmp_path / "o", "--no-progress")
    assert code == 0, err
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["config"]["guard"] is True and manifest["config"]["guard_window"] == 2
    assert manifest["config"]["guard_min_agreement"] == 0.9 and manifest["config"]["guard_min_marginal_ratio"] == 0.25
    result = manifest["result"]
    assert result["guard"] is True and result["guard_resets"] == len(result["guard_reset_batches"])
    assert len(result["guard_reasons"]) == min(5, result["guard_resets"])
    assert "guard reset" in err and f"guard resets: {result['guard_resets']}" in out


@pytest.mark.parametrize("args,fragment", [
    (["--guard-window", "0"], "--guard-window"),
    (["--guard-min-agreement", "1.5"], "--guard-min-agreement"),
    (["--guard-min-marginal-ratio", "-0.1"], "--guard-min-marginal-ratio"),
])
def test_bad_guard_values_are_one_line_errors(tmp_path, tta_inputs, capsys, args, fragment):
    model, stream = tta_inputs
    code, _, err = run_cli(capsys, "tta", "--model", model, "--target", stream, "--guard", *args, "--out", tmp_path / "o")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adaptsoup: error:") and fragment in lines[0]
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_guard_with_foa_is_a_one_line_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "tta", "--onnx", tmp_path / "m.onnx", "--method", "foa", "--target", tmp_path, "--guard")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--guard" in err


def test_adapt_tta_guard_is_recorded_in_the_recipe(tmp_path, capsys):
    stock = build_adapt_inputs(tmp_path, per_class=4, target=8)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("vanilla = 0\ncheckpoint_every_s = 0.0\n[inter]\nlrs = [1e-3]\nsteps = [1]\nbatch_size = 8\n"
                      "decoder_warmup_steps = 1\n[finetune]\nlrs = [1e-3]\nsteps = 1\nbatch_size = 8\n")
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "adapt", "--model", stock, "--target", tmp_path / "target", "--source",
                             tmp_path / "source", "--out", run, "--config", recipe, "--validation-holdout", 0, "--tta", "tent",
                             "--tta-batch-size", 4, "--tta-guard", "--no-progress")
    assert code == 0, err
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["tta_guard"] is True
    assert manifest["tta"]["guard"] is True and "guard_resets" in manifest["tta"]
    assert "guard reset" in "".join(out.split("\n"))
    tta_manifest = json.loads((run / "tta" / "manifest.json").read_text())
    assert tta_manifest["config"]["guard"] is True
