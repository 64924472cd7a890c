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


# Issue #15: every value is typed before any work, with the key's path in a one-line message.
@pytest.mark.parametrize("raw, fragment", [
    ({"vanilla": "two"}, "vanilla: expected an integer, got 'two'"),
    ({"seed": 1.5}, "seed: expected an integer, got 1.5"),
    ({"checkpoint_every_s": "fast"}, "checkpoint_every_s: expected a finite number"),
    ({"inter": {"lrs": "abc"}}, "inter.lrs[0]: expected a finite number, got 'abc'"),
    ({"inter": {"mask_ratios": ["x"]}}, "inter.mask_ratios[0]: expected a finite number, got 'x'"),
    ({"inter": {"batch_size": "8"}}, "inter.batch_size: expected an integer, got '8'"),
    ({"inter": {"epochs": "ten"}}, "inter.epochs: expected a finite number, got 'ten'"),
    ({"finetune": {"steps": "2"}}, "finetune.steps: expected an integer, got '2'"),
    ({"inter": 5}, "[inter] must be a table"),
    ({"inter": {"mocov3": {"temperatures": [True]}}}, "inter.mocov3.temperatures[0]: expected a finite number"),
    ({"bf16": "yes"}, "bf16: expected true or false"),
    ({"device": 3}, "device: expected a string"),
    ({"inter": {"lrs": [float("nan")]}}, "inter.lrs[0]: expected a finite number"),
])
def test_wrong_types_are_refused_with_the_key_path(raw, fragment):
    with pytest.raises(AdaptsoupError) as info:
        AdaptConfig.from_dict(raw)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_recipe_that_is_not_a_table_is_refused(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(AdaptsoupError, match="must be a table"):
        AdaptConfig.from_dict(load_recipe_file(tmp_path / "list.yaml"))


def test_comma_separated_lists_are_still_read_as_lists():
    cfg = AdaptConfig.from_dict({"inter": {"lrs": "1e-5, 2e-5", "steps": "3,4", "ssl": "mae", "epochs": 2}, "evals": "a,b"})
    assert cfg.inter.lrs == [1e-5, 2e-5] and cfg.inter.steps == [3, 4] and cfg.inter.epochs == 2.0 and cfg.evals == ["a", "b"]


@pytest.mark.parametrize("raw, fragment", [
    ({"inter": {"batch_size": 0}}, "inter.batch_size must be >= 1, got 0"),
    ({"finetune": {"batch_size": -4}}, "finetune.batch_size must be >= 1, got -4"),
    ({"inter": {"steps": [-5]}}, "inter.steps must be >= 0, got -5"),
    ({"inter": {"epochs": -1}}, "inter.epochs must be > 0"),
    ({"max_target_images": -1}, "max_target_images must be >= 0, got -1"),
    ({"checkpoint_every_s": -1}, "checkpoint_every_s must be >= 0"),
    ({"inter": {"seeds": []}}, "inter.seeds is a grid axis"),
    ({"finetune": {"label_smoothing": 1.0}}, "finetune.label_smoothing must be < 1"),
])
def test_sizes_out_of_range_are_refused_with_the_key_path(raw, fragment):
    with pytest.raises(AdaptsoupError) as info:
        validate(AdaptConfig.from_dict({"source": "src", **raw}))
    assert fragment in str(info.value)
