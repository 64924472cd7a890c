"""The ``adapt`` command as a library call: recipe file + flags, resume, and the mix / TTA stages a recipe asks for."""

from __future__ import annotations

import json

import pytest

from adaptsoup.core.checkpoint import read_checkpoint
from adaptsoup.errors import AdaptsoupError
from adaptsoup.pipeline.job import AdaptRequest, resolve_config, run_adapt_job
from adaptsoup_cli.main import main
from helpers import build_adapt_inputs

TINY = {"vanilla": 0, "checkpoint_every_s": 0.0,
        "inter": {"lrs": [1e-3, 2e-3], "steps": [2], "batch_size": 8, "decoder_warmup_steps": 1},
        "finetune": {"lrs": [1e-3], "steps": 2, "batch_size": 8}}


def write_recipe(path, extra: str = "") -> None:
    path.write_text(extra + "vanilla = 0\ncheckpoint_every_s = 0.0\n"
                    "[inter]\nlrs = [1e-3, 2e-3]\nsteps = [2]\nbatch_size = 8\ndecoder_warmup_steps = 1\n"
                    "[finetune]\nlrs = [1e-3]\nsteps = 2\nbatch_size = 8\n")


def inputs(tmp_path) -> dict:
    stock = build_adapt_inputs(tmp_path, per_class=4, target=10)
    return {"model": str(stock), "target": str(tmp_path / "target"), "source": str(tmp_path / "source")}


def test_the_recipes_mix_and_tta_act(tmp_path):
    recipe = tmp_path / "recipe.toml"
    write_recipe(recipe, 'mix = ["model-stock"]\ntta = "tent"\ntta_batch_size = 4\n')
    result = run_adapt_job(AdaptRequest(settings={**inputs(tmp_path), "out": str(tmp_path / "run")}, recipe_file=recipe), echo=None)
    manifest = json.loads(result.manifest_path.read_text())
    assert list(result.mixes) == ["model-stock"] and "model-stock" in manifest["mixes"]
    assert (result.run_dir / "soups" / "model-stock.safetensors").is_file()
    assert manifest["tta"]["method"] == "tent" and (result.run_dir / manifest["tta"]["adapted"]).is_file()
    assert manifest["status"] == "complete"


def test_flags_override_the_recipes_mix_and_tta(tmp_path):
    recipe = tmp_path / "recipe.toml"
    write_recipe(recipe, 'mix = ["model-stock"]\ntta = "tent"\n')
    settings = {**inputs(tmp_path), "out": str(tmp_path / "run"), "mix": ["uniform"], "tta": "sar", "tta_batch_size": 4}
    cfg = resolve_config(AdaptRequest(settings=settings, recipe_file=recipe))
    assert (cfg.mix, cfg.tta, cfg.tta_batch_size, cfg.inter.lrs) == (["uniform"], "sar", 4, [1e-3, 2e-3])


def test_tta_after_mix_adapts_the_mixed_soup(tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    write_recipe(recipe)
    paths = inputs(tmp_path)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["adapt", "--model", paths["model"], "--target", paths["target"], "--source", paths["source"], "--out", str(run),
              "--config", str(recipe), "--mix", "model-stock", "--tta", "sar", "--tta-batch-size", "4", "--no-progress"])
    captured = capsys.readouterr()
    assert exit_info.value.code in (0, None), captured.err
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["tta"]["soup"] == "model-stock" and manifest["tta"]["model"] == "soups/model-stock.safetensors"
    _, meta = read_checkpoint(run / "tta" / "adapted.safetensors")
    assert meta.provenance["parents"] == [str(run / "soups" / "model-stock.safetensors")]
    assert "sar on the model-stock soup" in (run / "adapt.log").read_text()
    assert "sar on the model-stock soup" in "".join(captured.out.split("\n"))


def test_resume_keeps_the_recorded_recipe_and_may_only_change_what_follows_the_soups(tmp_path):
    settings = {**inputs(tmp_path), "out": str(tmp_path / "run"), **TINY}
    first = run_adapt_job(AdaptRequest(settings=settings), echo=None)
    soup, _ = read_checkpoint(first.soup_path)
    with pytest.raises(AdaptsoupError, match="already holds a run"):
        resolve_config(AdaptRequest(settings=settings))
    with pytest.raises(AdaptsoupError, match="inter.lrs"):
        resolve_config(AdaptRequest(settings={"inter": {"lrs": [1.0]}}, resume=first.run_dir))
    with pytest.raises(AdaptsoupError, match="model"):
        resolve_config(AdaptRequest(settings={"model": "other.safetensors"}, resume=first.run_dir))
    again = run_adapt_job(AdaptRequest(settings={"mix": ["model-stock"]}, resume=first.run_dir), echo=None)
    assert list(again.mixes) == ["model-stock"]
    manifest = json.loads(again.manifest_path.read_text())
    assert manifest["config"]["mix"] == ["model-stock"] and manifest["config"]["inter"]["lrs"] == [1e-3, 2e-3]
    assert all(v.equal(read_checkpoint(again.soup_path)[0][k]) for k, v in soup.items())


def test_a_run_directory_recorded_before_the_after_soup_settings_existed_still_resumes(tmp_path):
    first = run_adapt_job(AdaptRequest(settings={**inputs(tmp_path), "out": str(tmp_path / "run"), **TINY}), echo=None)
    manifest = json.loads(first.manifest_path.read_text())
    for key in ("mix_labeled", "tta_batch_size", "tta_base_lr"):
        del manifest["config"][key]
    first.manifest_path.write_text(json.dumps(manifest))
    cfg = resolve_config(AdaptRequest(resume=first.run_dir, settings={"tta": "tent"}))
    assert (cfg.tta, cfg.tta_batch_size, cfg.mix_labeled) == ("tent", 64, None)


def test_mixing_methods_that_need_labels_are_refused_before_any_work(tmp_path):
    settings = {**inputs(tmp_path), "out": str(tmp_path / "run"), **TINY, "mix": ["season"]}
    with pytest.raises(AdaptsoupError, match="mix-labeled"):
        run_adapt_job(AdaptRequest(settings=settings), echo=None)
    assert not (tmp_path / "run").exists()


# Issue #15: resume that cannot surprise.
def test_a_run_that_failed_before_any_work_does_not_block_the_corrected_rerun(tmp_path):
    paths = inputs(tmp_path)
    (tmp_path / "empty").mkdir()
    settings = {**paths, "out": str(tmp_path / "run"), **TINY}
    with pytest.raises(AdaptsoupError, match="no images"):
        run_adapt_job(AdaptRequest(settings={**settings, "target": str(tmp_path / "empty")}), echo=None)
    assert (tmp_path / "run" / "manifest.json").is_file()  # the folder the failed attempt left
    cfg = resolve_config(AdaptRequest(settings=settings))
    assert cfg.target == paths["target"] and not (tmp_path / "run" / "manifest.json").exists()


def _recorded_run(tmp_path, monkeypatch) -> tuple:
    """A run directory whose manifest recorded relative paths from ``tmp_path`` (no work needed to resume it)."""
    from adaptsoup.pipeline.recipe import AdaptConfig

    inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = AdaptConfig.from_dict({"model": "stock.safetensors", "target": "target", "source": "source", "out": "run", **TINY})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({"config": cfg.to_dict(), "cwd": str(tmp_path), "protocol": "deployed"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return tmp_path / "run", elsewhere


def test_resume_from_another_folder_finds_the_runs_inputs_and_the_run_itself(tmp_path, monkeypatch):
    run, _ = _recorded_run(tmp_path, monkeypatch)
    cfg = resolve_config(AdaptRequest(resume=run))
    assert cfg.out == str(run) and cfg.target == str(tmp_path / "target") and cfg.model == str(tmp_path / "stock.safetensors")


def test_resume_refuses_when_the_data_moved(tmp_path, monkeypatch):
    run, _ = _recorded_run(tmp_path, monkeypatch)
    (tmp_path / "target").rename(tmp_path / "moved")
    with pytest.raises(AdaptsoupError, match=r"target .*target is not there any more"):
        resolve_config(AdaptRequest(resume=run))


@pytest.mark.parametrize("settings", [{"out": "elsewhere"}, {"inter": {"steps": [999]}}, {"finetune": {"lrs": [0.5]}}])
def test_resume_refuses_flags_that_would_change_finished_work(tmp_path, monkeypatch, settings):
    run, _ = _recorded_run(tmp_path, monkeypatch)
    with pytest.raises(AdaptsoupError, match="--resume takes the recipe recorded"):
        resolve_config(AdaptRequest(resume=run, settings=settings))


def test_every_command_that_touched_a_run_stays_in_its_manifest(tmp_path):
    from adaptsoup.core.manifest import Manifest
    from adaptsoup.pipeline.context import record_command
    from adaptsoup.pipeline.recipe import AdaptConfig

    manifest = Manifest(tmp_path / "manifest.json")
    record_command(manifest, "adaptsoup adapt --out run", AdaptConfig(), None)
    record_command(manifest, "adaptsoup adapt --resume run --mix uniform", AdaptConfig(), None)
    assert manifest.data["command"] == "adaptsoup adapt --out run"
    assert [c["command"] for c in manifest.data["commands"]] == ["adaptsoup adapt --out run", "adaptsoup adapt --resume run --mix uniform"]


def test_resume_checks_only_the_inputs_it_will_use_and_reads_a_bad_manifest_in_one_line(tmp_path, monkeypatch):
    run, _ = _recorded_run(tmp_path, monkeypatch)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"]["mix_labeled"] = "labels-that-moved"
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AdaptsoupError, match="mix_labeled"):
        resolve_config(AdaptRequest(resume=run))
    cfg = resolve_config(AdaptRequest(resume=run, settings={"mix_labeled": str(tmp_path / "source")}))
    assert cfg.mix_labeled == str(tmp_path / "source")
    (run / "manifest.json").write_text("{not json")
    with pytest.raises(AdaptsoupError, match="cannot read the recipe"):
        resolve_config(AdaptRequest(resume=run))
