"""``export --model RUN``: the run's recommendation decides what is exported; a soup estimated worse needs --force."""

from __future__ import annotations

import json

import pytest

from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.core.models import model_meta
from adaptsoup.errors import AdaptsoupError
from adaptsoup.pipeline.deploy_choice import resolve_export
from helpers import tiny_model
from test_cli import run_cli


def _run(tmp_path, recommendation):
    run = tmp_path / "run"
    (run / "soups").mkdir(parents=True)
    model = tiny_model()
    deployed = save_checkpoint(tmp_path / "deployed.safetensors", model.state_dict(), model_meta(model))
    for rel in ("soup.safetensors", "soups/supervised_soup.safetensors"):
        save_checkpoint(run / rel, model.state_dict(), model_meta(model))
    (run / "manifest.json").write_text(json.dumps({"kind": "adapt", "cwd": str(tmp_path), "config": {"model": "deployed.safetensors"},
                                                   "recommendation": recommendation}))
    return run, deployed


def _recommendation(switch: bool, soup_gain: float | None, supervised_gain: float = 1.5) -> dict:
    verdict = lambda name, gain: {"name": name, "gains": {}, "min_gain": gain, "mean_gain": gain, "ci95": None,  # noqa: E731
                                  "qualifies": False, "why": f"doc estimates {gain} points"}
    return {"model": "supervised_soup" if switch else "deployed", "path": "soups/supervised_soup.safetensors" if switch else "deployed.safetensors",
            "switch": switch, "gain": supervised_gain if switch else 0.0, "ci95": [0.4, 2.5] if switch else [0.0, 0.0], "reason": "why",
            "candidates": [verdict("soup", soup_gain), verdict("supervised_soup", supervised_gain)],
            "candidate_paths": {"soup": "soup.safetensors", "supervised_soup": "soups/supervised_soup.safetensors"}}


def test_a_run_directory_exports_its_recommendation_or_the_deployed_model(tmp_path):
    run, deployed = _run(tmp_path, _recommendation(switch=True, soup_gain=-0.8))
    choice = resolve_export(run)
    assert choice.path == run / "soups/supervised_soup.safetensors" and "+1.50 points [+0.40, +2.50]" in choice.note
    (run / "manifest.json").write_text(json.dumps({**json.loads((run / "manifest.json").read_text()),
                                                   "recommendation": _recommendation(switch=False, soup_gain=-0.8)}))
    choice = resolve_export(run)
    assert choice.path == deployed and "keeping the deployed model" in choice.note


def test_a_soup_estimated_worse_than_the_deployed_model_is_refused_unless_forced(tmp_path):
    run, _ = _run(tmp_path, _recommendation(switch=False, soup_gain=-0.8))
    with pytest.raises(AdaptsoupError, match=r"estimates soup -0.80 points below the deployed model .*--force"):
        resolve_export(run / "soup.safetensors")
    assert resolve_export(run / "soup.safetensors", force=True).note.endswith("(forced)")
    assert "+1.50" in resolve_export(run / "soups" / "supervised_soup.safetensors").note  # estimated better: no refusal
    outside = tmp_path / "deployed.safetensors"
    assert resolve_export(outside).path == outside and resolve_export(outside).note is None  # not in a run: as it is


def test_a_run_without_a_recommendation_is_a_one_line_error_and_its_files_export_unchecked(tmp_path):
    run, _ = _run(tmp_path, None)
    with pytest.raises(AdaptsoupError, match="holds no deploy recommendation"):
        resolve_export(run)
    assert "exported unchecked" in resolve_export(run / "soup.safetensors").note


def test_export_refuses_in_one_line_with_exit_2(tmp_path, capsys):
    run, _ = _run(tmp_path, _recommendation(switch=False, soup_gain=-0.8))
    code, _, err = run_cli(capsys, "export", "--model", str(run / "soup.safetensors"), "--onnx", str(tmp_path / "soup.onnx"))
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "soup.onnx").exists()
