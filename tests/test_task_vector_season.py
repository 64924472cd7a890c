"""``mix --method self-season-tv``: task-vector scales learned by Self-Seasoning's loss, no labels."""

from __future__ import annotations

import pytest
import torch

from adaptsoup.core.checkpoint import read_checkpoint, save_checkpoint
from adaptsoup.core.data import Preprocess, load_folder
from adaptsoup.core.models import model_meta
from adaptsoup.errors import AdaptsoupError
from adaptsoup.soup import methods
from adaptsoup.soup.methods.task_vector_season import TaskVectorSeasonOptions, task_vector_coefficients
from adaptsoup.soup.registry import MixContext
from helpers import tiny_model, write_noise_images


def test_the_coefficients_start_at_the_uniform_soup_and_always_sum_to_one():
    assert task_vector_coefficients(torch.zeros(2)).tolist() == [0.0, 0.5, 0.5]
    c = task_vector_coefficients(torch.tensor([0.3, 0.1], dtype=torch.float64))
    assert c.tolist() == pytest.approx([1 - 0.8 - 0.6, 0.8, 0.6]) and float(c.sum()) == pytest.approx(1.0)


def _task_vector_ingredients(tmp_path):
    deployed = tiny_model(seed=1)
    base = save_checkpoint(tmp_path / "deployed.safetensors", deployed.state_dict(), model_meta(deployed))
    paths = []
    for seed in (2, 3):
        other = tiny_model(seed=seed).state_dict()
        # deployed + a small task vector in the encoder; the deployed head (as adapt --preset task-vector makes them)
        state = {k: (v + 0.05 * (other[k] - v) if v.is_floating_point() and not k.startswith("head") else v)
                 for k, v in deployed.state_dict().items()}
        paths.append(save_checkpoint(tmp_path / f"tv{seed}.safetensors", state, model_meta(deployed)))
    write_noise_images(tmp_path / "target", 32, seed=5)
    target = load_folder(tmp_path / "target", Preprocess.for_model(deployed), cache=False)
    return base, paths, target


def test_the_written_soup_is_the_deployed_model_plus_the_learned_scales_times_the_task_vectors(tmp_path):
    base, paths, target = _task_vector_ingredients(tmp_path)
    messages = []
    ctx = MixContext(paths=paths, names=["a", "b"], stock_path=base, target=target, log=messages.append)
    res = methods.get("self-season-tv")(ctx, TaskVectorSeasonOptions(epochs=3, batch_size=16, lr=0.5, min_lr=0.05))
    scales = res.coefficients
    assert len(scales) == 2 and scales != pytest.approx([0.5, 0.5], abs=1e-4)  # it moved away from the uniform soup
    assert res.info["deployed_coefficient"] == pytest.approx(1.0 - sum(scales))
    deployed = read_checkpoint(base)[0]
    vectors = [{k: read_checkpoint(p)[0][k].double() - deployed[k].double() for k in deployed} for p in paths]
    for key in ("blocks.0.attn.qkv.weight", "head.weight"):
        want = deployed[key].double() + sum(s * v[key] for s, v in zip(scales, vectors))
        assert torch.allclose(res.state_dict[key].double(), want, atol=1e-6), key
    assert "task-vector scales" in messages[-1]


def test_it_needs_target_images_and_the_deployed_model(tmp_path):
    base, paths, target = _task_vector_ingredients(tmp_path)
    with pytest.raises(AdaptsoupError, match="needs unlabeled target images"):
        methods.get("self-season-tv")(MixContext(paths=paths, names=["a", "b"], stock_path=base))
    with pytest.raises(AdaptsoupError, match="needs the deployed model"):
        methods.get("self-season-tv")(MixContext(paths=paths, names=["a", "b"], target=target))
