"""Soups: closed-form checks of the streaming weighted average."""

from __future__ import annotations

import pytest
import torch

from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.soup import methods
from adaptsoup.soup.average import stream_weighted_average, weighted_average
from adaptsoup.soup.checks import SoupError
from adaptsoup.soup.registry import MixContext
from adaptsoup.soup.stacked import StackedIngredients
from adaptsoup.core.models import model_meta
from helpers import tiny_model


def _save(tmp_path, name, model):
    return save_checkpoint(tmp_path / f"{name}.safetensors", model.state_dict(), model_meta(model))


def test_soup_of_identical_ingredients_is_the_ingredient(tmp_path):
    model = tiny_model(seed=1)
    paths = [_save(tmp_path, f"m{i}", model) for i in range(3)]
    soup = methods.get("uniform")(MixContext(paths=paths, names=["a", "b", "c"])).state_dict
    for key, value in model.state_dict().items():
        assert torch.allclose(soup[key], value, atol=1e-7), key


def test_soup_of_two_is_their_mean(tmp_path):
    a, b = tiny_model(seed=1), tiny_model(seed=2)
    soup, meta = stream_weighted_average([_save(tmp_path, "a", a), _save(tmp_path, "b", b)])
    assert meta is not None and meta.arch == "vit_pico_patch4_32"
    for key, va in a.state_dict().items():
        vb = b.state_dict()[key]
        assert torch.allclose(soup[key], (va.double() + vb.double()).div(2).to(va.dtype), atol=1e-6), key


def test_one_hot_weights_give_that_ingredient(tmp_path):
    models = [tiny_model(seed=s) for s in (1, 2, 3)]
    paths = [_save(tmp_path, f"m{i}", m) for i, m in enumerate(models)]
    soup, _ = stream_weighted_average(paths, [0.0, 1.0, 0.0])
    for key, value in models[1].state_dict().items():
        assert torch.equal(soup[key], value), key


def test_float64_accumulation_and_non_float_buffers_copied():
    states = [{"w": torch.full((3,), 1.0 + 1e-7 * i, dtype=torch.float32), "idx": torch.tensor([1, 2, 3])} for i in range(3)]
    out = weighted_average(states)
    assert out["idx"].dtype == torch.int64 and torch.equal(out["idx"], states[0]["idx"])
    assert out["w"].dtype == torch.float32
    assert torch.allclose(out["w"].double(), torch.full((3,), 1.0 + 1e-7, dtype=torch.float64), atol=1e-9)


def test_incompatible_ingredients_are_a_clear_error(tmp_path):
    a = tiny_model(seed=1)
    b = tiny_model(num_classes=4, seed=1)
    with pytest.raises(SoupError, match=r"mis-shaped .*head.weight \(4, 32\) vs \(3, 32\)"):
        stream_weighted_average([_save(tmp_path, "a", a), _save(tmp_path, "b", b)])
    state = {k: v for k, v in a.state_dict().items() if k != "head.bias"}
    c = save_checkpoint(tmp_path / "c.safetensors", state, model_meta(a))
    with pytest.raises(SoupError, match="missing head.bias"):
        stream_weighted_average([_save(tmp_path, "a2", a), c])


@pytest.mark.parametrize("weights", [[1.0], [-1.0, 2.0], [0.0, 0.0], [float("nan"), 1.0]])
def test_bad_weights_are_refused(tmp_path, weights):
    a = tiny_model(seed=1)
    paths = [_save(tmp_path, "a", a), _save(tmp_path, "b", a)]
    with pytest.raises(SoupError):
        stream_weighted_average(paths, weights)


def test_unknown_mixer_lists_the_known_ones():
    from adaptsoup.errors import AdaptsoupError

    with pytest.raises(AdaptsoupError, match="uniform"):
        methods.get("nope")


def test_streamed_average_is_bit_identical_to_the_in_memory_one(tmp_path):
    models = [tiny_model(seed=s) for s in (1, 2, 3, 4)]
    paths = [_save(tmp_path, f"m{i}", m) for i, m in enumerate(models)]
    weights = [0.1, 0.2, 0.3, 0.4]
    streamed, _ = stream_weighted_average(paths, weights)
    in_memory = weighted_average([m.state_dict() for m in models], weights)
    assert set(streamed) == set(in_memory)
    for key, value in in_memory.items():
        assert streamed[key].dtype == value.dtype and torch.equal(streamed[key], value), key


def test_stacked_ingredients_hold_each_ingredient_in_its_slot(tmp_path):
    models = [tiny_model(seed=s) for s in (1, 2, 3)]
    stack = StackedIngredients([_save(tmp_path, f"m{i}", m) for i, m in enumerate(models)])
    for i, model in enumerate(models):
        for key, value in model.state_dict().items():
            held = stack.stacked[key][i] if key in stack.stacked else stack.constants[key]
            assert torch.equal(held, value), (i, key)
    one_hot = stack.state_dict(torch.tensor([0.0, 1.0, 0.0]))
    assert all(torch.equal(one_hot[k], v) for k, v in models[1].state_dict().items())


def test_every_method_is_registered_with_its_own_options():
    assert methods.names() == ["best", "greedy", "model-stock", "season", "self-season", "self-season-tv", "uniform"]
    needs = {name: methods.get(name).needs for name in methods.names()}
    assert needs == {"best": "labels", "greedy": "labels", "model-stock": "none", "season": "labels", "self-season": "target",
                     "self-season-tv": "target", "uniform": "none"}
    greedy = methods.get("greedy").options_from({"tie": "keep", "k": 5, "epochs": 3})  # epochs is not greedy's: ignored
    assert (greedy.tie, greedy.k, greedy.score) == ("keep", 5, "auto")
    assert methods.get("self-season").options_from({"epochs": 3, "samples": 9}).epochs == 3


def test_a_method_refuses_another_methods_options(tmp_path):
    from adaptsoup.errors import AdaptsoupError
    from adaptsoup.soup.methods.season import SeasonOptions

    paths = [_save(tmp_path, "a", tiny_model(seed=1)), _save(tmp_path, "b", tiny_model(seed=2))]
    with pytest.raises(AdaptsoupError, match="uniform takes UniformOptions, not SeasonOptions"):
        methods.get("uniform")(MixContext(paths=paths, names=["a", "b"]), SeasonOptions())


# -- task arithmetic --------------------------------------------------------------------------------------------


def test_add_task_vector_is_target_plus_scaled_difference_and_keeps_head_and_buffers():
    from adaptsoup.soup.task_vector import add_task_vector

    target = {"w": torch.tensor([1.0, 2.0]), "head.weight": torch.tensor([5.0]), "idx": torch.tensor([3])}
    base = {"w": torch.tensor([0.5, 0.5]), "head.weight": torch.tensor([0.0]), "idx": torch.tensor([9])}
    tuned = {"w": torch.tensor([1.5, 0.0]), "head.weight": torch.tensor([7.0]), "idx": torch.tensor([7])}
    out = add_task_vector(target, base, tuned, scale=0.5)
    assert torch.equal(out["w"], torch.tensor([1.5, 1.75]))  # 1 + 0.5·1, 2 + 0.5·(−0.5)
    assert torch.equal(out["head.weight"], target["head.weight"]) and torch.equal(out["idx"], target["idx"])
    assert out["w"].dtype == torch.float32


def test_add_task_vector_names_a_tensor_without_counterpart():
    from adaptsoup.soup.checks import SoupError
    from adaptsoup.soup.task_vector import add_task_vector

    with pytest.raises(SoupError, match="blocks.0.w .* base model"):
        add_task_vector({"blocks.0.w": torch.zeros(2)}, {"blocks.0.w": torch.zeros(3)}, {"blocks.0.w": torch.zeros(2)})
