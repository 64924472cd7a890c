"""Property test (issue #15): any recipe value either validates or is refused with a one-line AdaptsoupError
(the CLI's ``adaptsoup: error: ...`` and exit 2) — never another exception."""

from __future__ import annotations

import dataclasses

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from adaptsoup.errors import AdaptsoupError
from adaptsoup.pipeline.recipe import AdaptConfig, FineTuneConfig, InterTrainConfig, MMCRGrid, MoCoV3Grid, load_recipe_file, validate

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.sampled_from(["mae", "cpu", "3a", "none", "1e-5,2e-5", "uniform", "sar", "hf-hub:x/y", "local-dir:/nope"]),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=4), SCALARS, max_size=2))


def _table(cls, depth: int = 0) -> st.SearchStrategy:
    keys = [f.name for f in dataclasses.fields(cls)] + ["bogus"]
    nested = {"inter": InterTrainConfig, "finetune": FineTuneConfig, "mocov3": MoCoV3Grid, "mmcr": MMCRGrid}

    def value_for(key: str) -> st.SearchStrategy:
        if key in nested and depth < 2:
            return st.one_of(_table(nested[key], depth + 1), VALUES)
        return VALUES

    return st.lists(st.sampled_from(keys), max_size=4, unique=True).flatmap(
        lambda chosen: st.fixed_dictionaries({k: value_for(k) for k in chosen}))


RECIPES = st.one_of(_table(AdaptConfig), VALUES)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(recipe=RECIPES)
@example(recipe={"\n": 1})  # found by this test: an unknown key's newline reached the message
@example(recipe={"finetune": {"a\nb": None, " ": 2}})
def test_any_recipe_validates_or_is_refused_in_one_line(tmp_path, recipe):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    try:
        raw = load_recipe_file(path)
        cfg = AdaptConfig.from_dict({"source": "src", **raw} if isinstance(raw, dict) else raw)
        validate(cfg)
    except AdaptsoupError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message, message


def test_every_adaptsoup_error_is_one_line():
    from adaptsoup.errors import DataError, one_line

    assert one_line("plain text, é and ü") == "plain text, é and ü"
    assert str(AdaptsoupError("a\nb\r\tc\x1b")) == "a\\nb\\r\\tc\\x1b"
    assert str(DataError("folder not found: /data/new\nline")) == "folder not found: /data/new\\nline"
