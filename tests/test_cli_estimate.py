"""``adaptsoup estimate`` end to end on tiny models: the table, the recommendation, the JSON, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.core.models import model_meta
from adaptsoup_cli.main import main

from helpers import build_labeled_folder, tiny_model, write_noise_images


def run_cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return (0 if info.value.code is None else info.value.code), captured.out, captured.err


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adaptsoup: error:"), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def flat(text: str) -> str:
    """``text`` without whitespace: rich wraps its tables and lines to the console's width."""
    return "".join(text.split())


def save(path: Path, seed: int, num_classes: int = 3) -> Path:
    model = tiny_model(num_classes=num_classes, seed=seed)
    return save_checkpoint(path, model.state_dict(), model_meta(model))


@pytest.fixture
def inputs(tmp_path) -> dict:
    write_noise_images(tmp_path / "target", 10, seed=5)
    return {"target": tmp_path / "target", "validation": build_labeled_folder(tmp_path / "validation"),
            "models": [save(tmp_path / f"model{i}.safetensors", seed=i) for i in range(3)]}


def test_estimate_prints_every_estimator_and_writes_the_json(capsys, tmp_path, inputs):
    out_json = tmp_path / "out" / "estimates.json"
    args = ["estimate", "--target", inputs["target"], "--validation", inputs["validation"], "--json", out_json,
            "--resamples", 50, "--no-progress"]
    for model in inputs["models"]:
        args += ["--model", model]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    for fragment in ("estimatedtargetaccuracy", "model0", "model2", "deployed", "recommendation:", "rule:", "ALine", f"wrote{out_json}"):
        assert fragment in flat(out)
    result = json.loads(out_json.read_text())
    assert result["models"] == ["model0", "model1", "model2"]
    assert result["images"] == {"target": 10, "validation": 5}
    assert result["recommendation"]["deployed"] == "model0"
    assert set(result["estimates"]["model1"]) == {"atc-ne", "atc-mc", "doc", "cot", "aline-s", "aline-d"}
    assert result["inputs"]["models"]["model2"] == str(inputs["models"][2])


def test_estimate_with_one_model_and_a_named_deployed_model(capsys, inputs):
    code, out, err = run_cli(capsys, "estimate", "--target", inputs["target"], "--validation", inputs["validation"],
                             "--model", inputs["models"][1], "--no-progress", "--resamples", 20)
    assert code == 0, err
    assert "ALine:abstains:agreement-on-the-lineneedsatleast3models,got1" in flat(out)
    assert "recommendation:keepthedeployedmodelmodel1(nocandidatetocompare)" in flat(out)
    code, out, err = run_cli(capsys, "estimate", "--target", inputs["target"], "--validation", inputs["validation"],
                             "--model", inputs["models"][1], "--deployed", inputs["models"][0], "--no-progress", "--resamples", 20)
    assert code == 0, err
    assert "gainovermodel0" in flat(out) and "model1" in flat(out)


def test_estimate_errors_are_one_line(capsys, tmp_path, inputs):
    base = ["estimate", "--model", inputs["models"][0], "--model", inputs["models"][1], "--no-progress"]
    code, _, err = run_cli(capsys, *base, "--target", inputs["target"])
    assert code == 2
    assert_one_line_error(err, "--validation")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, *base, "--target", tmp_path / "empty", "--validation", inputs["validation"])
    assert code == 2
    assert_one_line_error(err, "no images")
    other = save(tmp_path / "four.safetensors", seed=7, num_classes=4)
    code, _, err = run_cli(capsys, *base, "--model", other, "--target", inputs["target"], "--validation", inputs["validation"])
    assert code == 2
    assert_one_line_error(err, "class mismatch", "four")
    (tmp_path / "model.pt").write_bytes(b"")
    code, _, err = run_cli(capsys, *base, "--model", tmp_path / "model.pt", "--target", inputs["target"], "--validation", inputs["validation"])
    assert code == 2
    assert_one_line_error(err, ".safetensors checkpoints only")
    code, _, err = run_cli(capsys, *base, "--target", inputs["target"], "--validation", inputs["validation"], "--vote", "atc,doc")
    assert code == 2
    assert_one_line_error(err, "--vote", "atc")
