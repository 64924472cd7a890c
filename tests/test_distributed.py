"""Data-parallel ``adapt`` (two gloo processes on CPU, as torchrun would start them) against one process."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from adaptsoup.core.checkpoint import read_checkpoint
from adaptsoup.core.distributed import World, rank_slice
from adaptsoup.errors import AdaptsoupError
from adaptsoup.pipeline.adapt import run_adapt
from adaptsoup.pipeline.recipe import AdaptConfig, FineTuneConfig, InterTrainConfig
from helpers import build_adapt_inputs

# Measured on this machine's CPU (gloo, 2 ranks; MAE 3 steps + LP-FT 3 steps at lr 1e-3, Adam): max |difference|
# between the ingredients 1.7e-5 (inter-trained encoder 2.0e-6): float reduction order, which Adam's first,
# sign-like steps amplify.  Training rank 1 on rank 0's slice instead (the bug this guards) gives 1.9e-2.
TOLERANCE = 5e-4
# The soup of a run with the recipe's own probe (weight decay 1e-4: nearly separable features, a badly conditioned
# probe): measured 1.8e-5, nearly all of it the probe's (encoders 1.5e-7 apart; a converged probe moves by about a
# hundred times its features' difference).  The 200-step L-BFGS probe gave 0.053 here.  (The probe's independence
# of the thread count is tests/test_probe.py's.)
SOUP_TOLERANCE = 1e-4


class Crash(Exception):
    pass


def _config(root: Path, out: str) -> AdaptConfig:
    return AdaptConfig(model=str(root / "stock.safetensors"), target=str(root / "target"), source=str(root / "source"), out=str(root / out),
                       checkpoint_every_s=0.0, precision="fp32", inter=InterTrainConfig(lrs=[1e-3], steps=[3], batch_size=8, decoder_warmup_steps=1),
                       finetune=FineTuneConfig(lrs=[1e-3], steps=3, batch_size=7, probe_weight_decay=0.1))  # 7: uneven slices; a well-posed probe


def _probe_config(root: Path, out: str) -> AdaptConfig:
    """The issue's command, smaller: the recipe's probe weight decay, MAE and fine-tuning at lr 1e-4."""
    return AdaptConfig(model=str(root / "stock.safetensors"), target=str(root / "target"), source=str(root / "source"), out=str(root / out),
                       checkpoint_every_s=1e9, precision="fp32", inter=InterTrainConfig(lrs=[1e-4], steps=[3], batch_size=8, decoder_warmup_steps=1),
                       finetune=FineTuneConfig(lrs=[1e-4], steps=3, batch_size=7))


def _rank(rank: int, port: int, root: str) -> None:
    """One of two ranks: a whole run, then a run cut off mid fine-tuning (as if killed)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    def crash(run: str, step: int) -> None:
        if run == "mae00-ft00" and step == 2:
            raise Crash()

    try:
        run_adapt(_config(Path(root), "two"), echo=None)
        run_adapt(_probe_config(Path(root), "probe-two"), echo=None)
        with contextlib.suppress(Crash):
            run_adapt(_config(Path(root), "cut"), echo=None, on_step=crash)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _two_ranks(root: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the ranks start without importing torch again (a second or two each, not ten)
    mp.start_processes(_rank, args=(port, str(root)), nprocs=2, join=True, start_method="fork")


def _max_difference(a: Path, b: Path) -> float:
    sa, sb = read_checkpoint(a)[0], read_checkpoint(b)[0]
    assert sa.keys() == sb.keys()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    build_adapt_inputs(root, per_class=4, target=10)
    one = run_adapt(_config(root, "one"), echo=None)
    run_adapt(_probe_config(root, "probe-one"), echo=None)
    _two_ranks(root)
    return root, one


def test_two_processes_make_the_one_process_ingredient(runs):
    root, one = runs
    ingredient = "ingredients/mae00-ft00.safetensors"
    assert _max_difference(one.run_dir / ingredient, root / "two" / ingredient) < TOLERANCE
    assert _max_difference(one.run_dir / "inter/mae00.safetensors", root / "two" / "inter/mae00.safetensors") < TOLERANCE
    manifest = json.loads((root / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["status"] == "complete"
    want = json.loads((one.run_dir / "manifest.json").read_text())["ingredients"]["mae00-ft00"]["train"]["losses"]
    assert manifest["ingredients"]["mae00-ft00"]["train"]["losses"] == pytest.approx(want, abs=1e-4)  # the global batch's loss
    assert not list((root / "two").rglob("*.tmp")) and not list((root / "two" / "state").iterdir())


def test_a_run_cut_off_with_two_processes_resumes_with_one(runs):
    root, one = runs
    assert (root / "cut" / "state" / "mae00-ft00.pt").is_file()
    resumed = run_adapt(_config(root, "cut"), echo=None)
    record = json.loads((resumed.manifest_path).read_text())["ingredients"]["mae00-ft00"]["train"]
    assert record["resumed_from_step"] == 2
    assert _max_difference(one.soup_path, resumed.soup_path) < TOLERANCE


def test_two_processes_make_the_one_process_soup_with_the_recipes_probe(runs):
    root, _ = runs
    assert _max_difference(root / "probe-one" / "soup.safetensors", root / "probe-two" / "soup.safetensors") < SOUP_TOLERANCE
    for run in ("probe-one", "probe-two"):
        probe = json.loads((root / run / "manifest.json").read_text())["ingredients"]["mae00-ft00"]["linear_probe"]
        assert probe["converged"] and probe["gradient_max"] <= 1e-10


def test_a_batch_is_sliced_across_ranks_without_overlap_or_gaps():
    slices = [rank_slice(7, World(rank, 3)) for rank in range(3)]
    assert [(s.start, s.stop) for s in slices] == [(0, 3), (3, 5), (5, 7)]
    with pytest.raises(AdaptsoupError, match="batch of 2 cannot be split across 3"):
        rank_slice(2, World(0, 3))
