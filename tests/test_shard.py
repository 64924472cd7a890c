"""``adapt --shard I/N``: the grid made by independent jobs in one run directory, claims, the finishing run."""

from __future__ import annotations

import json

import pytest
import torch

from adaptsoup.core.checkpoint import read_checkpoint
from adaptsoup.errors import AdaptsoupError
from adaptsoup.pipeline.adapt import run_adapt
from adaptsoup.pipeline.job import AdaptRequest, resolve_config
from adaptsoup.pipeline.plan import plan_run
from adaptsoup.pipeline.recipe import AdaptConfig, FineTuneConfig, InterTrainConfig
from adaptsoup.pipeline.shard import Shard, claim, unit_owner
from helpers import CLASS_NAMES, build_adapt_inputs, write_noise_images


class Crash(Exception):
    pass


def _config(root, out: str) -> AdaptConfig:
    return AdaptConfig(model=str(root / "stock.safetensors"), target=str(root / "target"), source=str(root / "source"), out=str(root / out),
                       evals=[str(root / "eval")], vanilla=1, checkpoint_every_s=0.0, precision="fp32",
                       inter=InterTrainConfig(lrs=[1e-3, 2e-3], steps=[2], batch_size=8, decoder_warmup_steps=1),
                       finetune=FineTuneConfig(lrs=[1e-3], steps=3, batch_size=8))


def _crash_at(name: str, step: int):
    def hook(run: str, s: int) -> None:
        if run == name and s == step:
            raise Crash()
    return hook


def test_two_shards_and_a_rerun_after_a_kill_make_the_one_process_soup(tmp_path):
    build_adapt_inputs(tmp_path, per_class=4, target=10)
    for i, name in enumerate(CLASS_NAMES):
        write_noise_images(tmp_path / "eval" / name, 2, seed=40 + i)
    reference = run_adapt(_config(tmp_path, "ref"), echo=None)
    cfg = _config(tmp_path, "run")
    first = run_adapt(cfg, echo=None, shard=Shard(1, 2))
    assert not first.complete and first.missing == ["mae01-ft00"] and not first.soup_path.exists()
    with pytest.raises(Crash):
        run_adapt(cfg, echo=None, shard=Shard(2, 2), on_step=_crash_at("mae01-ft00", 1))  # killed mid-ingredient
    with pytest.raises(AdaptsoupError, match=r"ingredient\.mae01-ft00 is claimed by shard 2/2 .*rerun it"):
        run_adapt(cfg, echo=None)  # the finishing run does not steal a shard's claim
    log = tmp_path / "run" / "adapt.log"
    before = len(log.read_text())
    rerun = run_adapt(cfg, echo=None, shard=Shard(2, 2))  # the array task again: takes over its claim, finds the grid complete
    assert rerun.complete
    later = log.read_text()[before:]
    assert "taking over the claim" in later and "inter-train " not in later and "fine-tune mae00" not in later
    assert later.count("fine-tune ") == 1 and "fine-tune mae01-ft00" in later
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["ingredients"]["mae01-ft00"]["train"]["resumed_from_step"] == 1
    assert set(manifest["ingredients"]) == {"mae00-ft00", "mae01-ft00", "vanilla-ft00"}  # both shards' records
    assert manifest["shards"]["1/2"]["status"] == "done" and manifest["shards"]["2/2"]["status"] == "done, wrote the soups"
    assert not list((tmp_path / "run" / "claims").iterdir())
    want = json.loads(reference.manifest_path.read_text())
    finished = run_adapt(cfg, echo=None)  # adapt --resume RUN: writes the soups and evaluation again, as one process
    for result in (rerun, finished):
        got, _ = read_checkpoint(result.soup_path)
        ref, _ = read_checkpoint(reference.soup_path)
        assert all(torch.equal(got[k], ref[k]) for k in ref)
        assert json.loads(result.manifest_path.read_text())["metrics"] == want["metrics"]


def test_units_are_dealt_round_robin_and_claims_are_exclusive(tmp_path):
    plan = plan_run(AdaptConfig(vanilla=2, inter=InterTrainConfig(lrs=[1, 2, 3], steps=[1]), finetune=FineTuneConfig(lrs=[1, 2])), 10)
    owner = unit_owner(plan, 2)
    assert [owner[i.name] for i in plan.inters] == [1, 2, 1]
    assert owner["mae01-ft00"] == owner["mae01-ft01"] == 2  # an encoder's fine-tunings stay with it
    assert (owner["vanilla-ft00"], owner["vanilla-ft01"]) == (2, 1)
    assert claim(tmp_path, "x", "1/2") == "new"
    assert claim(tmp_path, "x", "2/2") == "other"
    assert claim(tmp_path, "x", "1/2") == "taken over"


def test_shards_join_a_run_only_with_its_recipe(tmp_path):
    with pytest.raises(AdaptsoupError, match="--shard takes I/N"):
        Shard.parse("2of3")
    with pytest.raises(AdaptsoupError, match="between 1 and N"):
        Shard.parse("3/2")
    settings = {"model": "m", "target": "t", "source": "s", "out": str(tmp_path / "run")}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({"config": AdaptConfig.from_dict(settings).to_dict()}))
    assert resolve_config(AdaptRequest(settings=settings, shard="2/2")).out == settings["out"]
    with pytest.raises(AdaptsoupError, match="with another recipe: give every shard the same flags"):
        resolve_config(AdaptRequest(settings={**settings, "seed": 3}, shard="2/2"))
    with pytest.raises(AdaptsoupError, match="--shard needs --out"):
        resolve_config(AdaptRequest(settings={**settings, "out": None}, shard="1/2"))


def test_the_slurm_example_is_valid_bash_and_passes_only_flags_adapt_knows():
    import re
    import subprocess
    from pathlib import Path

    import typer

    from adaptsoup_cli.main import app

    script = Path(__file__).resolve().parent.parent / "examples" / "slurm_adapt.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    adapt = typer.main.get_command(app).commands["adapt"]
    known = {opt for param in adapt.params for opt in param.opts + param.secondary_opts}
    command = script.read_text().split("adaptsoup)\" adapt", 1)[1]
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", command))
    assert "--shard" in used and used <= known, used - known


def test_jobs_sharing_a_manifest_keep_each_others_newer_records(tmp_path):
    from adaptsoup.core.manifest import Manifest

    path = tmp_path / "manifest.json"
    a, b = Manifest(path, {"shards": {}}, shared=True), Manifest(path, {"shards": {}}, shared=True)
    a.update("shards", "1/2", {"status": "running"})
    b.update("shards", "2/2", {"status": "running"})
    a.update("ingredients", "x", 1)  # a now holds b's "running" record
    b.update("shards", "2/2", {"status": "done"})
    a.update("shards", "1/2", {"status": "done"})  # must not write b's stale record back
    assert json.loads(path.read_text())["shards"] == {"1/2": {"status": "done"}, "2/2": {"status": "done"}}
    assert json.loads(path.read_text())["ingredients"] == {"x": 1}


def test_a_shard_killed_with_sigkill_mid_fine_tuning_resumes_to_the_one_process_soup(tmp_path):
    """A real ``kill -9`` of a ``--shard`` job (no exception handler runs): its claim and state file stay; the
    rerun takes the claim over, resumes the fine-tuning, and the soup is bit-identical to one process's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    build_adapt_inputs(tmp_path, per_class=4, target=10)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'model = "{tmp_path / "stock.safetensors"}"\ntarget = "{tmp_path / "target"}"\nsource = "{tmp_path / "source"}"\n'
                      "vanilla = 1\ncheckpoint_every_s = 0.0\nprecision = \"fp32\"\n[inter]\nlrs = [1e-3, 2e-3]\nsteps = [2]\nbatch_size = 8\n"
                      "decoder_warmup_steps = 1\n[finetune]\nlrs = [1e-3]\nsteps = 30\nbatch_size = 8\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def adapt(out: str, *extra: str, wait: bool = True) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "adaptsoup_cli.main", "adapt", "--config", str(recipe), "--out", str(tmp_path / out), "--no-progress", *extra]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if wait:
            output, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, output
        return proc

    adapt("ref")
    adapt("run", "--shard", "1/2")
    victim = adapt("run", "--shard", "2/2", wait=False)
    state = tmp_path / "run" / "state" / "mae01-ft00.pt"
    deadline = time.monotonic() + 240
    while not state.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert victim.poll() is None, "the shard finished before it could be killed: make its fine-tuning longer"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert (tmp_path / "run" / "claims" / "ingredient.mae01-ft00.json").exists() and not (tmp_path / "run" / "soup.safetensors").exists()
    adapt("run", "--shard", "2/2")  # the array task again: takes its claim over and finishes the grid
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["ingredients"]["mae01-ft00"]["train"]["resumed_from_step"] > 0
    got, _ = read_checkpoint(tmp_path / "run" / "soup.safetensors")
    ref, _ = read_checkpoint(tmp_path / "ref" / "soup.safetensors")
    assert all(torch.equal(got[k], ref[k]) for k in ref)
