"""Recipes: defaults < config file < flags; unknown keys and bad values are clear errors."""

from __future__ import annotations

import pytest

from adaptsoup.errors import AdaptsoupError
from adaptsoup.pipeline.plan import finetune_runs, inter_runs
from adaptsoup.pipeline.recipe import AdaptConfig, load_recipe_file, merge, validate


def test_flags_that_were_not_given_do_not_erase_defaults_or_the_file():
    flags = {"model": "m", "vanilla": None, "inter": {"lrs": None, "epochs": None}, "finetune": {"lrs": [1e-3], "steps": None}}
    cfg = AdaptConfig.from_dict(merge({}, flags))
    assert cfg.inter.lrs == [1e-5, 2e-5, 3e-5, 4e-5] and cfg.vanilla == 0 and cfg.finetune.lrs == [1e-3]
    from_file = {"vanilla": 3, "inter": {"lrs": [5e-5], "mask_ratios": 0.9}}
    cfg = AdaptConfig.from_dict(merge(from_file, flags))
    assert cfg.vanilla == 3 and cfg.inter.lrs == [5e-5] and cfg.inter.mask_ratios == [0.9]
    cfg = AdaptConfig.from_dict(merge(from_file, {"vanilla": 1, "inter": {"lrs": [7e-5]}}))
    assert cfg.vanilla == 1 and cfg.inter.lrs == [7e-5]


def test_recipe_files_toml_and_yaml(tmp_path):
    (tmp_path / "r.toml").write_text('vanilla = 2\n[inter]\nlrs = [1e-5, 2e-5]\n')
    (tmp_path / "r.yaml").write_text("vanilla: 2\ninter:\n  lrs: [1.0e-5, 2.0e-5]\n")
    assert load_recipe_file(tmp_path / "r.toml") == load_recipe_file(tmp_path / "r.yaml")
    (tmp_path / "bad.toml").write_text("lrs = [")
    with pytest.raises(AdaptsoupError, match="cannot parse"):
        load_recipe_file(tmp_path / "bad.toml")
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(AdaptsoupError, match=".toml, .yaml"):
        load_recipe_file(tmp_path / "r.json")


def test_unknown_keys_are_named():
    with pytest.raises(AdaptsoupError, match=r"\[inter\] lr\b"):
        AdaptConfig.from_dict({"inter": {"lr": 1e-3}})
    with pytest.raises(AdaptsoupError, match="vanila"):
        AdaptConfig.from_dict({"vanila": 2})


def test_grid_sizes_are_products_of_the_axes():
    cfg = AdaptConfig.from_dict({"inter": {"lrs": [1e-5, 2e-5], "mask_ratios": [0.75, 0.9], "seeds": [0, 1, 2]}, "finetune": {"lrs": [1e-4, 2e-4]}})
    runs = inter_runs(cfg.inter, num_images=1000)
    assert len(runs) == 12 and len({r.name for r in runs}) == 12
    assert all(r.steps == 79 for r in runs)  # 10 epochs of 1,000 images at batch 128, rounded up
    assert len(finetune_runs(cfg.finetune)) == 2


@pytest.mark.parametrize("raw,match", [
    ({"inter": {"lrs": [0.0]}}, "positive"),
    ({"inter": {"mask_ratios": [1.0]}}, "mask ratios"),
    ({"finetune": {"augment": "weird"}}, "augmentation"),
    ({"inter": {"ssl": "simclr"}}, "self-supervised loss"),
    ({"vanilla": -1}, "vanilla"),
    ({"device": "tpu"}, "device"),
])
def test_bad_values_are_refused(raw, match):
    with pytest.raises(AdaptsoupError, match=match):
        validate(AdaptConfig.from_dict({"source": "src", **raw}))


def test_source_is_needed_unless_label_free():
    with pytest.raises(AdaptsoupError, match="--source"):
        validate(AdaptConfig.from_dict({}))
    validate(AdaptConfig.from_dict({"finetune_back": False}))
    with pytest.raises(AdaptsoupError, match="vanilla"):
        validate(AdaptConfig.from_dict({"finetune_back": False, "vanilla": 2}))


def test_settings_from_the_command_line_are_typed_by_their_field():
    from adaptsoup_bench.shift import BenchConfig
    from adaptsoup.pipeline.recipe import parse_settings

    got = parse_settings(["inter_lrs=1e-5, 2e-5", "ft_steps=500", "bf16=false", "sar_base_lr=none", "sar_reference_base_lr=2e-3"], BenchConfig)
    assert got == {"inter_lrs": [1e-5, 2e-5], "ft_steps": 500, "bf16": False, "sar_base_lr": None, "sar_reference_base_lr": 2e-3}
    cfg = BenchConfig.for_mode("full", **got)
    assert cfg.inter_lrs == [1e-5, 2e-5] and cfg.ft_steps == 500 and cfg.per_corruption == 2000  # the rest stays full


@pytest.mark.parametrize("item, message", [
    ("inter_step=5", "KEY one of"),          # a typo names the known settings
    ("inter_steps", "KEY=VALUE"),
    ("ft_steps=many", "cannot read 'many' as int"),
    ("bf16=maybe", "true or false"),
    ("severity=3", "use --severity"),
])
def test_bad_settings_are_clear_errors(item, message):
    from adaptsoup_bench.shift import BenchConfig
    from adaptsoup.pipeline.recipe import parse_settings

    with pytest.raises(AdaptsoupError, match=message):
        parse_settings([item], BenchConfig, reserved={"severity": "--severity"})
