"""``adapt --preset``: named recipes under the recipe file and the flags."""

from __future__ import annotations

import pytest

from adaptsoup.errors import AdaptsoupError
from adaptsoup.pipeline.job import AdaptRequest, resolve_config
from adaptsoup.pipeline.presets import PRESETS


def test_the_task_vector_preset_is_the_frozen_label_free_recipe_and_flags_and_files_override_it(tmp_path):
    base = {"model": "m.safetensors", "target": "t", "pretrained": "p.safetensors", "out": str(tmp_path / "a")}
    cfg = resolve_config(AdaptRequest(settings=base, preset="task-vector"))
    assert (cfg.finetune_back, cfg.task_vector_scale, cfg.inter.ssl, cfg.inter.lrs, cfg.inter.steps, cfg.inter.batch_size) == (
        False, 1.5, ["mae"], [1e-5, 3e-5], [600], 64)
    assert not cfg.source  # no labels needed
    recipe = tmp_path / "r.toml"
    recipe.write_text("[inter]\nsteps = [300]\n")
    cfg = resolve_config(AdaptRequest(settings={**base, "out": str(tmp_path / "b"), "inter": {"lrs": [2e-5]}}, recipe_file=recipe,
                                      preset="task-vector"))
    assert (cfg.inter.steps, cfg.inter.lrs, cfg.finetune_back) == ([300], [2e-5], False)  # file over preset, flag over both


def test_a_preset_refuses_in_one_line_what_it_cannot_run_without(tmp_path):
    with pytest.raises(AdaptsoupError, match=r"--preset task-vector needs --pretrained"):
        resolve_config(AdaptRequest(settings={"model": "m", "target": "t", "out": str(tmp_path / "a")}, preset="task-vector"))
    with pytest.raises(AdaptsoupError, match=r"unknown --preset 'fast'; choose from: task-vector"):
        resolve_config(AdaptRequest(settings={"model": "m", "target": "t"}, preset="fast"))
    assert set(PRESETS) == {"task-vector"}
