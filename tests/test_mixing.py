"""Mixing methods: closed-form checks (Model Stock, one-hot, greedy), the kNN-entropy loss, Self-Seasoning."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

from adaptsoup.pipeline.adapt import run_adapt
from adaptsoup.core.checkpoint import read_checkpoint, save_checkpoint
from adaptsoup.core.data import Preprocess, load_folder
from adaptsoup.errors import AdaptsoupError
from adaptsoup.soup.methods.greedy import greedy
from adaptsoup.soup.methods.model_stock import model_stock_ratio, stream_model_stock
from adaptsoup.soup.methods.season import SeasonOptions, candidate_coefficients
from adaptsoup.soup.methods.self_season import SelfSeasonOptions, descend, self_season
from adaptsoup.soup.run import MixRequest, interpolate, mix_run
from adaptsoup.core.models import model_meta
from adaptsoup.pipeline.recipe import AdaptConfig, FineTuneConfig, InterTrainConfig
from adaptsoup.soup.knn import embedding_geometry, knn_accuracy, knn_entropy, split_retrieval_eval
from adaptsoup.soup.registry import MixContext
from adaptsoup.soup import methods
from adaptsoup.soup.stacked import StackedIngredients
from helpers import CLASS_NAMES, tiny_model, write_noise_images


def direct_knn_entropy(z, k=16, t=0.07):
    """The definition, written out row by row."""
    z = z / z.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(z.shape[0]):
        sims = torch.stack([z[i] @ z[j] for j in range(z.shape[0]) if j != i])
        top = sims.sort(descending=True).values[:k]
        p = torch.exp(top / t) / torch.exp(top / t).sum()
        total = total - (p * torch.log(p.clamp(min=1e-12))).sum()
    return total / z.shape[0]


@pytest.mark.parametrize("batch,dim,k", [(20, 8, 16), (40, 16, 16), (6, 4, 16), (10, 3, 4)])
def test_knn_entropy_matches_its_definition(batch, dim, k):
    z = torch.randn(batch, dim, generator=torch.Generator().manual_seed(batch), dtype=torch.float64)
    got = knn_entropy(z.float(), k=k)
    want = direct_knn_entropy(z, k=k)
    assert got.item() == pytest.approx(want.item(), abs=1e-6)


def test_a_shared_offset_flattens_the_loss_and_centring_undoes_it():
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    offset = 50.0 * torch.randn(16, generator=torch.Generator().manual_seed(2))  # like a final LayerNorm's bias
    ceiling = math.log(16)
    assert knn_entropy(z + offset).item() > ceiling - 1e-3  # every cosine near 1: the loss sits at ln k
    assert knn_entropy(z).item() < ceiling - 0.1
    # centring is the definition applied to z minus its batch mean, and it cancels any shared offset
    centred = knn_entropy(z + offset, center=True).item()
    assert centred == pytest.approx(direct_knn_entropy((z - z.mean(0)).double()).item(), abs=1e-5)
    assert centred == pytest.approx(knn_entropy(z, center=True).item(), abs=1e-5)
    flat, informative = embedding_geometry(z + offset), embedding_geometry(z + offset, center=True)
    assert flat["mean_cosine"] > 0.99 and flat["topk_gap_over_t"] < 0.1
    assert abs(informative["mean_cosine"]) < 0.05 and informative["topk_gap_over_t"] > 1.0


def test_knn_entropy_gradients_reach_mixture_logits():
    logits = torch.zeros(3, requires_grad=True)
    bases = torch.randn(3, 24, 8, generator=torch.Generator().manual_seed(0))
    z = torch.tensordot(torch.softmax(logits, 0), bases, dims=1)
    knn_entropy(z).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def _save(tmp_path, name, state, meta):
    return save_checkpoint(tmp_path / f"{name}.safetensors", state, meta)


def test_model_stock_identical_deltas_give_the_mean(tmp_path):
    stock = tiny_model(seed=0)
    meta = model_meta(stock)
    base = stock.state_dict()
    delta = {k: torch.randn_like(v) * 0.1 if v.is_floating_point() else v for k, v in base.items()}
    a = {k: base[k] + delta[k] if v.is_floating_point() else v for k, v in base.items()}
    paths = [_save(tmp_path, "a1", a, meta), _save(tmp_path, "a2", a, meta), _save(tmp_path, "a3", a, meta)]
    state, info = stream_model_stock(paths, _save(tmp_path, "stock", base, meta))
    for key, value in a.items():
        assert torch.allclose(state[key], value, atol=1e-6), key
        if value.is_floating_point():
            assert info["t"][key] == pytest.approx(1.0, abs=1e-9)
    assert not info["clamped"]


def test_model_stock_orthogonal_deltas_give_the_stock(tmp_path):
    stock = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    a = {"w": stock["w"] + torch.tensor([1.0, 0.0, 0.0, 0.0])}
    b = {"w": stock["w"] + torch.tensor([0.0, 2.0, 0.0, 0.0])}
    state, info = stream_model_stock([_save(tmp_path, "a", a, None), _save(tmp_path, "b", b, None)], _save(tmp_path, "s", stock, None))
    assert info["t"]["w"] == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(state["w"], stock["w"])


def test_model_stock_leaves_out_an_ingredient_identical_to_the_stock(tmp_path):
    # with the stock as a third ingredient its zero delta made every cosine NaN, so t = 0: the soup was the stock
    stock = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0]), "idx": torch.tensor([0, 1])}
    a = {"w": stock["w"] + torch.tensor([1.0, 1.0, 0.0, 0.0]), "idx": stock["idx"]}
    b = {"w": stock["w"] + torch.tensor([1.0, 0.0, 1.0, 0.0]), "idx": stock["idx"]}
    pa, pb, ps = _save(tmp_path, "a", a, None), _save(tmp_path, "b", b, None), _save(tmp_path, "s", stock, None)
    want, _ = stream_model_stock([pa, pb], ps)
    # cos = 1/2 between the two deltas: t = 2·(1/2) / (1 + 1/2) = 2/3 of the way from the stock to their mean
    assert torch.allclose(want["w"].double(), stock["w"].double() + 2 / 3 * torch.tensor([1.0, 0.5, 0.5, 0.0], dtype=torch.float64))
    messages = []
    ctx = MixContext(paths=[pa, pb, ps], names=["a", "b", "stock"], stock_path=ps, log=messages.append)
    result = methods.get("model-stock")(ctx)
    assert all(torch.equal(result.state_dict[k], want[k]) for k in want)
    assert result.info["excluded"] == ["stock"] and result.info["t_mean"] == pytest.approx(2 / 3)
    assert len(messages) == 1 and "left out stock" in messages[0]
    with pytest.raises(AdaptsoupError, match="at least 2 ingredients that differ from the stock; s.safetensors"):
        stream_model_stock([pa, ps], ps)


def test_self_season_keeps_the_epoch_with_the_lowest_mean_loss():
    # the loss pushes logit 0 up at a constant rate (Adam steps of exactly the learning rate); a bonus makes
    # epoch 1 (the second) the lowest whatever the logits, so its logits are kept, not the last epoch's
    calls = []

    def batch_loss(logits, idx):
        calls.append(len(idx))
        return -logits[0] + (-100.0 if len(calls) == 2 else 0.0)

    options = SelfSeasonOptions(epochs=4, batch_size=4, lr=0.1, min_lr=0.01)
    path = descend(3, 4, options, batch_loss, torch.Generator().manual_seed(0))
    assert path.steps == 4 and path.best_epoch == 1
    assert path.epoch_losses[1] == min(path.epoch_losses)
    # two cosine-scheduled steps: lr(0) = 0.1, lr(1) = 0.01 + 0.09·(1 + cos(π/4))/2
    assert path.best_logits[0].item() == pytest.approx(0.1 + 0.01 + 0.09 * (1 + math.cos(math.pi / 4)) / 2, abs=1e-6)
    assert path.last_logits[0].item() > path.best_logits[0].item()
    assert path.best_logits[1:].abs().max() == 0 and path.last_logits[1:].abs().max() == 0


def test_model_stock_ratio_formula_and_guards():
    assert model_stock_ratio(0.5, 2) == (pytest.approx(2 * 0.5 / 1.5), False)
    assert model_stock_ratio(1.0000001, 3) == (pytest.approx(1.0), False)  # rounding, not a clamp
    assert model_stock_ratio(1.5, 3) == (pytest.approx(1.0), True)
    t, clamped = model_stock_ratio(-0.5, 3)  # denominator 1 + 2*(-0.5) = 0: guarded
    assert t == 0.0 and clamped
    t, clamped = model_stock_ratio(-0.2, 3)  # negative t clamped to the stock
    assert t == 0.0 and clamped


def test_candidates_hold_uniform_and_one_hots_and_sum_to_one():
    c = candidate_coefficients(4, 50, seed=0)
    assert c.shape == (1 + 4 + 50, 4)
    assert torch.allclose(c.sum(1), torch.ones(len(c), dtype=torch.float64))
    assert torch.allclose(c[0], torch.full((4,), 0.25, dtype=torch.float64))
    assert torch.equal(c[1:5], torch.eye(4, dtype=torch.float64))
    assert (c >= 0).all()


def test_greedy_keeps_only_ingredients_that_help():
    # ingredient 0 alone scores 70, 1 alone 60, 2 alone 65; any soup containing 2 drops, 0+1 rises to 75
    def score(stack, alpha):
        used = {i for i in range(3) if alpha[i] > 0}
        if used == {0}:
            return 70.0
        if used == {1}:
            return 60.0
        if used == {2}:
            return 65.0
        return 50.0 if 2 in used else 75.0

    stack = types.SimpleNamespace(count=3)
    coefficients, chosen, individual, trail = greedy(stack, score)
    assert chosen == [0, 1]
    assert coefficients == [0.5, 0.5, 0.0]
    assert individual == [70.0, 60.0, 65.0]
    assert [t["kept"] for t in trail] == [True, False, True]  # order tried: 0, 2, 1


def test_greedy_tie_rule():
    def flat(stack, alpha):
        return 70.0

    stack = types.SimpleNamespace(count=2)
    assert greedy(stack, flat, tie="strict")[1] == [0]
    assert greedy(stack, flat, tie="keep")[1] == [0, 1]
    with pytest.raises(AdaptsoupError):
        greedy(stack, flat, tie="sometimes")


def test_knn_accuracy_on_separable_features():
    labels = torch.tensor([0, 1] * 20)
    feats = torch.nn.functional.one_hot(labels, 2).float() + 0.01 * torch.randn(40, 2, generator=torch.Generator().manual_seed(0))
    retrieval, evaluation = split_retrieval_eval(40, 0.5, seed=0)
    assert set(retrieval.tolist()).isdisjoint(evaluation.tolist())
    assert knn_accuracy(feats, labels, retrieval, evaluation, 2, k=5) == 100.0


def test_self_season_lowers_its_loss(tmp_path):
    paths = [save_checkpoint(tmp_path / f"m{s}.safetensors", tiny_model(seed=s).state_dict(), model_meta(tiny_model(seed=s))) for s in (1, 2, 3)]
    stack = StackedIngredients(paths)
    model = tiny_model(seed=1)
    write_noise_images(tmp_path / "target", 32, seed=5)
    pre = Preprocess.for_model(model)
    target = load_folder(tmp_path / "target", pre, cache=False)
    res = self_season(model, stack, target, pre, SelfSeasonOptions(epochs=15, batch_size=32, lr=0.3, min_lr=0.03))
    assert res.steps == 15
    assert res.losses[-1] < res.initial_loss
    assert sum(res.coefficients) == pytest.approx(1.0, abs=1e-6)
    assert max(res.coefficients) - min(res.coefficients) > 1e-3  # it moved away from uniform
    # the written soup is the coefficient-weighted average
    soup = stack.state_dict(torch.tensor(res.coefficients))
    states = [read_checkpoint(p)[0] for p in paths]
    key = "blocks.0.attn.qkv.weight"
    want = sum(c * s[key].double() for c, s in zip(res.coefficients, states))
    assert torch.allclose(soup[key].double(), want, atol=1e-6)


def _self_season_setup(tmp_path, count=3, images=40):
    paths = [save_checkpoint(tmp_path / f"m{s}.safetensors", tiny_model(seed=s).state_dict(), model_meta(tiny_model(seed=s)))
             for s in range(1, count + 1)]
    model = tiny_model(seed=1)
    write_noise_images(tmp_path / "target", images, seed=5)
    pre = Preprocess.for_model(model)
    return model, StackedIngredients(paths), load_folder(tmp_path / "target", pre, cache=False), pre


def test_gradient_caching_gives_the_direct_gradient(tmp_path):
    from adaptsoup.soup.grad_cache import ChunkedEmbedding, cached_embeddings
    from adaptsoup.soup.knn import knn_entropy
    from adaptsoup.soup.stacked import PreLogits
    from torch.func import functional_call

    model, stack, target, pre = _self_season_setup(tmp_path)
    module = PreLogits(model).eval()
    for p in module.parameters():
        p.requires_grad_(False)

    def mix_params(logits):
        return {"model." + k: v for k, v in stack.mix(torch.softmax(logits, 0)).items()}

    def embed_chunk(params, idx):
        return functional_call(module, params, (pre.normalize(target.images[idx]),)).float()

    idx = torch.randperm(len(target), generator=torch.Generator().manual_seed(0))[:37]
    start = torch.tensor([0.3, -0.2, 0.1])
    grads = {}
    for chunk in (37, 8, 5):  # one pass (plain back-propagation), then two chunkings with a ragged last chunk
        logits = start.clone().requires_grad_(True)
        loss = knn_entropy(cached_embeddings(logits, idx, ChunkedEmbedding(mix_params, embed_chunk, chunk)), k=6, center=True)
        loss.backward()
        grads[chunk] = (loss.item(), logits.grad.clone())
    assert grads[37][1].abs().max() > 1e-4  # a real gradient, not zeros that trivially agree
    for chunk in (8, 5):
        assert grads[chunk][0] == pytest.approx(grads[37][0], abs=1e-6)
        assert torch.allclose(grads[chunk][1], grads[37][1], rtol=1e-4, atol=1e-7)


def test_self_season_with_gradient_caching_learns_the_same_coefficients(tmp_path):
    model, stack, target, pre = _self_season_setup(tmp_path)
    common = dict(epochs=4, batch_size=20, lr=0.3, min_lr=0.03, k=6, center=True)
    direct = self_season(model, stack, target, pre, SelfSeasonOptions(**common, chunk_size=0))
    cached = self_season(model, stack, target, pre, SelfSeasonOptions(**common, chunk_size=6))
    assert max(direct.coefficients) - min(direct.coefficients) > 1e-3  # they moved
    assert cached.coefficients == pytest.approx(direct.coefficients, abs=1e-5)
    assert cached.losses == pytest.approx(direct.losses, abs=1e-5)
    assert cached.best_epoch == direct.best_epoch


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("mixrun")
    model = tiny_model()
    stock = save_checkpoint(tmp_path / "stock.safetensors", model.state_dict(), model_meta(model))
    for i, name in enumerate(CLASS_NAMES):
        write_noise_images(tmp_path / "source" / name, 6, seed=10 + i)
        write_noise_images(tmp_path / "labeled" / name, 6, seed=20 + i)
    write_noise_images(tmp_path / "target", 24, seed=30)
    cfg = AdaptConfig(
        model=str(stock), target=str(tmp_path / "target"), source=str(tmp_path / "source"), out=str(tmp_path / "run"),
        evals=[str(tmp_path / "labeled")], checkpoint_every_s=1e9,
        inter=InterTrainConfig(lrs=[1e-3, 3e-3], steps=[3], batch_size=8, decoder_warmup_steps=1),
        finetune=FineTuneConfig(lrs=[1e-3, 3e-3], steps=2, batch_size=8),
    )
    run_adapt(cfg, echo=None)
    return tmp_path


def test_mix_run_writes_soups_coefficients_and_plot(small_run):
    run = small_run / "run"
    opts = {"self-season": SelfSeasonOptions(epochs=2, batch_size=16), "season": SeasonOptions(samples=5)}
    mixes = mix_run(MixRequest(run_dir=run, methods=["uniform", "self-season", "season", "greedy", "best", "model-stock"],
                               labeled=str(small_run / "labeled"), options=opts), log=lambda m: None)
    manifest = json.loads((run / "manifest.json").read_text())
    assert set(manifest["mixes"]) == {"uniform", "self-season", "season", "greedy", "best", "model-stock"}
    for method, record in mixes.items():
        assert (run / record["path"]).is_file()
        assert record["wall_s"] >= 0
        if method != "model-stock":
            assert sum(record["coefficients"].values()) == pytest.approx(1.0, abs=1e-6)
            assert list(record["coefficients"]) == ["mae00-ft00", "mae00-ft01", "mae01-ft00", "mae01-ft01"]
        m = record["metrics"]["labeled"]
        assert {"soup", "uniform", "best_ingredient", "deployed"} <= set(m)
    # the uniform method's soup is adapt's soup
    a, _ = read_checkpoint(run / "soups" / "uniform.safetensors")
    b, _ = read_checkpoint(run / "soup.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert mixes["best"]["coefficients"][mixes["best"]["info"]["chosen"]] == 1.0
    assert mixes["self-season"]["options"]["epochs"] == 2 and mixes["season"]["options"]["samples"] == 5
    info = mixes["self-season"]["info"]
    assert info["best_epoch_loss"] == min(info["epoch_losses"]) == info["epoch_losses"][info["best_epoch"]]
    assert sum(info["last_epoch_coefficients"]) == pytest.approx(1.0, abs=1e-6)
    assert (run / "mix_coefficients.png").stat().st_size > 1000


def test_a_named_variant_sits_beside_the_method_and_is_scored_afresh(small_run):
    run = small_run / "run"
    mix_run(MixRequest(run_dir=run, methods=["best"], labeled=str(small_run / "labeled")), log=lambda m: None)
    # "best" again under another name, then "best" re-mixed as a different soup: each is scored as what it now is
    named = mix_run(MixRequest(run_dir=run, methods=["best"], labeled=str(small_run / "labeled"), save_as="best-copy"), log=lambda m: None)
    assert (run / "soups" / "best-copy.safetensors").is_file() and named["best-copy"]["method"] == "best"
    assert named["best-copy"]["metrics"]["labeled"]["soup"] == named["best"]["metrics"]["labeled"]["soup"]
    mixed = mix_run(MixRequest(run_dir=run, methods=["uniform"], save_as="best"), log=lambda m: None)
    scores = json.loads((run / "manifest.json").read_text())["metrics"]["labeled"]
    assert mixed["best"]["method"] == "uniform"
    assert mixed["best"]["metrics"]["labeled"]["soup"] == pytest.approx(scores["soup"])  # the uniform soup's accuracy
    with pytest.raises(AdaptsoupError, match="single --method"):
        mix_run(MixRequest(run_dir=run, methods=["uniform", "best"], save_as="x"), log=lambda m: None)
    with pytest.raises(AdaptsoupError, match="single --method"):
        mix_run(MixRequest(run_dir=run, methods=["uniform"], save_as="../escape"), log=lambda m: None)
    mix_run(MixRequest(run_dir=run, methods=["best"], labeled=str(small_run / "labeled")), log=lambda m: None)  # restore


def test_labels_methods_need_labels_and_unknown_methods_are_refused(small_run):
    with pytest.raises(AdaptsoupError, match="--labeled"):
        mix_run(MixRequest(run_dir=small_run / "run", methods=["greedy"]), log=lambda m: None)
    with pytest.raises(AdaptsoupError, match="unknown mixing method"):
        mix_run(MixRequest(run_dir=small_run / "run", methods=["gumbo"]), log=lambda m: None)


def test_interpolation_ends_are_the_ingredients(small_run):
    run = small_run / "run"
    res = interpolate(run, "mae00-ft00", "mae01-ft01", 3, str(small_run / "labeled"))
    scores = json.loads((run / "manifest.json").read_text())["metrics"]["labeled"]
    assert res["accuracy"][0] == pytest.approx(scores["mae00-ft00"])
    assert res["accuracy"][-1] == pytest.approx(scores["mae01-ft01"])
    assert (run / "interpolate_mae00-ft00_mae01-ft01.png").is_file()


def test_the_mix_command_gives_each_method_the_flags_it_takes(small_run, capsys):
    from adaptsoup_cli.main import main
    from adaptsoup_cli.mix import mix_options

    options = mix_options(["greedy", "self-season", "uniform"], {"tie": "keep", "epochs": 3, "k": 7, "samples": 9})
    assert (options["greedy"].tie, options["greedy"].k) == ("keep", 7)
    assert (options["self-season"].epochs, options["self-season"].k) == (3, 7)
    assert set(options) == {"greedy", "self-season", "uniform"}
    run = small_run / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["mix", str(run), "--method", "greedy", "--as", "greedy-keep", "--greedy-tie", "keep", "--k", "3",
              "--labeled", str(small_run / "labeled"), "--eval", str(small_run / "labeled"), "--no-progress"])
    assert exit_info.value.code in (None, 0), capsys.readouterr()
    record = json.loads((run / "manifest.json").read_text())["mixes"]["greedy-keep"]
    assert record["options"] == {"score": "auto", "k": 3, "split": 0.5, "seed": 0, "tie": "keep"}
