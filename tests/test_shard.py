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
from adaptsoup.pipeline import claims as claims_module
from adaptsoup.pipeline.claims import DONE, MINE, NEW, OTHER, TAKEN_OVER, Claims
from adaptsoup.pipeline.shard import Shard, unit_owner
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
    assert sorted(p.name for p in (tmp_path / "run" / "claims").iterdir() if not p.name.startswith(".")) == ["finish.done"]
    soup_written = rerun.soup_path.stat().st_mtime_ns
    before = len(log.read_text())
    again = run_adapt(cfg, echo=None, shard=Shard(1, 2))  # a requeued array task after the run finished: nothing is redone
    assert again.complete and again.soup_path.stat().st_mtime_ns == soup_written
    assert "nothing to do" in log.read_text()[before:] and "uniform soup" not in log.read_text()[before:].lower()
    want = json.loads(reference.manifest_path.read_text())
    finished = run_adapt(cfg, echo=None)  # adapt --resume RUN: writes the soups and evaluation again, as one process
    assert finished.soup_path.stat().st_mtime_ns != soup_written
    for result in (rerun, again, finished):
        got, _ = read_checkpoint(result.soup_path)
        ref, _ = read_checkpoint(reference.soup_path)
        assert all(torch.equal(got[k], ref[k]) for k in ref)
        assert json.loads(result.manifest_path.read_text())["metrics"] == want["metrics"]


def test_units_are_dealt_round_robin(tmp_path):
    plan = plan_run(AdaptConfig(vanilla=2, inter=InterTrainConfig(lrs=[1, 2, 3], steps=[1]), finetune=FineTuneConfig(lrs=[1, 2])), 10)
    owner = unit_owner(plan, 2)
    assert [owner[i.name] for i in plan.inters] == [1, 2, 1]
    assert owner["mae01-ft00"] == owner["mae01-ft01"] == 2  # an encoder's fine-tunings stay with it
    assert (owner["vanilla-ft00"], owner["vanilla-ft01"]) == (2, 1)


def test_a_live_jobs_claim_is_never_shared_whatever_its_label_and_a_closed_jobs_is_taken_over(tmp_path):
    first, second = Claims(tmp_path, "all"), Claims(tmp_path, "all")  # two `adapt --resume RUN` in one process
    assert first.claim("x") == NEW
    assert second.claim("x") == OTHER and first.claim("x") == MINE
    second.release("x")  # not its claim: left alone
    assert first.path("x").is_file()
    record = json.loads(first.path("x").read_text())
    assert {"owner", "token", "host", "pid", "pid_start", "since"} <= set(record) and record["token"] == first.token
    first.close()  # the job ended holding it (a crash): the next job takes it over
    assert second.claim("x") == TAKEN_OVER
    assert json.loads(second.path("x").read_text())["token"] == second.token
    second.release("x")
    assert not second.path("x").exists()


def test_finished_work_is_never_claimed_again_even_when_it_appears_while_waiting_for_the_lock(tmp_path):
    import socket
    import subprocess
    import sys

    claims = Claims(tmp_path, "1/2")
    assert claims.claim("a", done=lambda: True) == DONE and not claims.path("a").exists()
    answers = iter([False, True])  # not done when first looked at, written by another job before the lock was won
    assert claims.claim("b", done=lambda: next(answers)) == DONE and not claims.path("b").exists()
    claims.mark_done("c")
    assert claims.is_done("c") and not claims.path("c").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claims.path("d").write_text(json.dumps({"owner": "2/2", "token": "t", "host": socket.gethostname(), "pid": dead.pid}))
    assert claims.claim("d", done=lambda: True) == DONE and not claims.path("d").exists()  # a job died after writing, before releasing
    alive = Claims(tmp_path, "2/2")
    assert alive.claim("e") == NEW
    assert claims.claim("e", done=lambda: True) == DONE and alive.path("e").exists()  # a live job releases its own claim


def test_an_empty_or_torn_claim_file_does_not_block_its_unit(tmp_path):
    claims = Claims(tmp_path, "1/2")
    claims.path("e").write_text("")  # left by a job killed between create and write (the old O_EXCL claim)
    claims.path("t").write_text('{"owner": "1/2", "pi')
    assert claims.claim("e") == TAKEN_OVER and claims.claim("t") == TAKEN_OVER


def test_a_claim_is_taken_over_only_when_its_holder_is_provably_gone(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time

    here = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    parent = os.getppid()
    cases = {
        "dead pid on this host": ({"host": here, "pid": dead.pid}, TAKEN_OVER),
        "live pid on this host": ({"host": here, "pid": parent, "pid_start": claims_module.process_start(parent)}, OTHER),
        "reused pid on this host": ({"host": here, "pid": parent, "pid_start": "1"}, TAKEN_OVER),
        "other host, fresh heartbeat": ({"host": here + "-elsewhere", "pid": 1}, OTHER),
        "other host, stale heartbeat": ({"host": here + "-elsewhere", "pid": 1, "stale": True}, TAKEN_OVER),
    }
    claims = Claims(tmp_path, "2/2")
    for name, (record, want) in cases.items():
        path = claims.path(name)
        path.write_text(json.dumps({"owner": "2/2", "token": "someone", **record}))
        if record.get("stale"):
            old = time.time() - claims.stale_s - 5
            os.utime(path, (old, old))
        assert claims.claim(name) == want, name


def test_the_heartbeat_touches_held_claims_and_never_one_taken_over(tmp_path):
    import os

    holder, thief = Claims(tmp_path, "1/2"), Claims(tmp_path, "2/2")
    assert holder.claim("a") == NEW and holder.claim("b") == NEW
    for name in ("a", "b"):
        os.utime(holder.path(name), (1_000_000, 1_000_000))
    holder.close()  # as if a stale job on another host
    assert thief.claim("b") == TAKEN_OVER
    os.utime(thief.path("b"), (1_000_000, 1_000_000))
    claims_module.HEARTBEAT.hold(holder.path("a"), holder.token)  # still registered: a job on another host, alive
    claims_module.HEARTBEAT.hold(holder.path("b"), holder.token)
    claims_module.HEARTBEAT.beat()
    assert holder.path("a").stat().st_mtime > 1_000_000  # touched
    assert thief.path("b").stat().st_mtime == 1_000_000  # another job's now: not touched by the old holder
    claims_module.HEARTBEAT.drop(holder.path("a"))
    claims_module.HEARTBEAT.drop(holder.path("b"))


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


def test_two_live_jobs_racing_on_every_unit_with_one_killed_make_each_unit_once_and_the_one_process_soup(tmp_path):
    """Real processes on one run directory: two copies of the same job (a duplicated ``--shard 1/1``, or two
    ``adapt --resume``) start together and race for every unit; one is killed with SIGKILL (no handler runs)
    while it trains.  No unit is ever trained by two live jobs, the killed job's unit is resumed once by the
    job that comes to it next, and the soup is bit-identical to one process's."""
    import os
    import re
    import signal
    from pathlib import Path
    import subprocess
    import sys
    import time

    build_adapt_inputs(tmp_path, per_class=4, target=10)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'model = "{tmp_path / "stock.safetensors"}"\ntarget = "{tmp_path / "target"}"\nsource = "{tmp_path / "source"}"\n'
                      "vanilla = 1\ncheckpoint_every_s = 0.0\nprecision = \"fp32\"\n[inter]\nlrs = [1e-3, 2e-3]\nsteps = [12]\nbatch_size = 8\n"
                      "decoder_warmup_steps = 3\n[finetune]\nlrs = [1e-3]\nsteps = 20\nbatch_size = 8\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def adapt(out: str, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "adaptsoup_cli.main", "adapt", "--config", str(recipe), "--out", str(tmp_path / out), "--no-progress", *extra]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finished(proc: subprocess.Popen) -> str:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
        return output

    reference = adapt("ref")
    jobs = [adapt("run", "--shard", "1/1"), adapt("run", "--shard", "1/1")]
    run = tmp_path / "run"
    victim, unit = None, None
    deadline = time.monotonic() + 240
    while victim is None and time.monotonic() < deadline and all(job.poll() is None for job in jobs):
        for claim_file in (run / "claims").glob("*.json") if (run / "claims").is_dir() else []:
            record = claims_module.read_claim(claim_file)
            name = claim_file.stem.split(".", 1)[-1]
            job = next((j for j in jobs if j.pid == record.get("pid")), None)
            if job is not None and (run / "state" / f"{name}.pt").is_file():
                victim, unit = job, claim_file.stem
                break
        time.sleep(0.02)
    assert victim is not None, "no job was caught training: make the units longer"
    os.kill(victim.pid, signal.SIGKILL)
    killed_output, _ = victim.communicate(timeout=30)
    # what the victim held when it died (read after the kill: it may have finished the unit it was caught on and
    # moved to the next between the look and the kill); an inter-training run's claim nests its decoder warm-up's
    held = {f.stem for f in (run / "claims").glob("*.json") if claims_module.read_claim(f).get("pid") == victim.pid}

    def output(claim: str) -> Path:
        kind, _, name = claim.partition(".")
        return run / "ingredients" / f"{name}.safetensors" if kind == "ingredient" else run / "inter" / f"{name or kind}.safetensors"

    unfinished = {c for c in held if not output(c).exists()}  # what the victim died making: another job must take it over
    survivor_output = finished(next(j for j in jobs if j is not victim))
    outputs = [killed_output, survivor_output]
    if not (run / "soup.safetensors").exists():  # the survivor had passed the unit while the victim held it: the task requeued
        outputs.append(finished(adapt("run", "--shard", "1/1")))
    finished(reference)

    text = "\n".join(outputs)
    starts = re.findall(r"(?:inter-train|fine-tune) (\S+): ", text) + re.findall(r"(decoder warm-up) \(", text)
    counts = {name: starts.count(name) for name in set(starts)}
    resumable = {"decoder warm-up" if c.startswith("decoder_warmup") else c.split(".", 1)[1] for c in held}
    assert all(n == 1 or (n == 2 and name in resumable) for name, n in counts.items()), (held, counts)  # once; a killed one resumed once
    taken = re.findall(r"(\S+): taking over the claim", text)
    assert unfinished <= set(taken) <= held and len(taken) == len(set(taken)), (taken, held)  # only a dead job's claims, once each
    if unit.startswith("ingredient.") and unit in held:
        killed = unit.split(".", 1)[1]
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["ingredients"][killed]["train"]["resumed_from_step"] > 0
    assert sorted(p.name for p in (run / "claims").iterdir() if not p.name.startswith(".")) == ["finish.done"]
    got, _ = read_checkpoint(run / "soup.safetensors")
    ref, _ = read_checkpoint(tmp_path / "ref" / "soup.safetensors")
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def _rank_that_disagrees(rank: int, port: int, root: str) -> None:
    """One of two torchrun-like ranks of ``adapt --shard 1/1``; rank 1 sees no ingredient on disk (a shared
    filesystem that is slow to show another job's files): only rank 0's view may decide."""
    import os
    from pathlib import Path

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      ADAPTSOUP_DIST_TIMEOUT_S="60")
    torch.set_num_threads(1)
    if rank == 1:
        real = Path.is_file
        Path.is_file = lambda self: False if self.parent.name == "ingredients" else real(self)
    try:
        result = run_adapt(_config(Path(root), "run"), echo=None, shard=Shard(1, 1))
        assert result.complete
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ranks_of_a_sharded_data_parallel_job_follow_rank_0s_view_of_the_grid(tmp_path):
    """The soups of a complete grid are written by a 2-rank ``--shard`` job even when rank 1 sees the grid
    incomplete (before, each rank decided alone and rank 0 waited at a broadcast rank 1 never joined)."""
    import socket

    import torch.multiprocessing as mp

    build_adapt_inputs(tmp_path, per_class=4, target=10)
    for i, name in enumerate(CLASS_NAMES):
        write_noise_images(tmp_path / "eval" / name, 2, seed=40 + i)
    reference = run_adapt(_config(tmp_path, "run"), echo=None)
    want = read_checkpoint(reference.soup_path)[0]
    reference.soup_path.unlink()
    (tmp_path / "run" / "claims" / "finish.done").unlink()  # the grid made, the soups not yet written
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_that_disagrees, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    got = read_checkpoint(reference.soup_path)[0]
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (tmp_path / "run" / "claims" / "finish.done").is_file()
