"""Soups: closed-form checks of the streaming weighted average."""

from __future__ import annotations

import pytest
import torch

from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.soup.mixing import SoupError, get_mixer, stream_weighted_average, weighted_average
from adaptsoup.core.models import model_meta
from helpers import tiny_model


def _save(tmp_path, name, model):
    return save_checkpoint(tmp_path / f"{name}.safetensors", model.state_dict(), model_meta(model))


def test_soup_of_identical_ingredients_is_the_ingredient(tmp_path):
    model = tiny_model(seed=1)
    paths = [_save(tmp_path, f"m{i}", model) for i in range(3)]
    from adaptsoup.soup.mixing import MixContext

    soup = get_mixer("uniform")(MixContext(paths=paths, names=["a", "b", "c"])).state_dict
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
        get_mixer("nope")
