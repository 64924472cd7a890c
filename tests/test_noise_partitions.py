"""Noisy soups and partition soups."""

from __future__ import annotations

import json

import pytest
import torch

from adaptsoup.pipeline.adapt import run_adapt
from adaptsoup.core.checkpoint import read_checkpoint
from adaptsoup.pipeline.diversity import add_parameter_noise, class_partitions, indices_of_classes, tensor_stds
from adaptsoup.pipeline.plan import inter_runs
from adaptsoup.pipeline.recipe import AdaptConfig, FineTuneConfig, InterTrainConfig
from helpers import build_adapt_inputs, tiny_model


def test_noise_of_multiplier_zero_changes_nothing():
    state = tiny_model().state_dict()
    out = add_parameter_noise(state, 0.0, tensor_stds(state), seed=1)
    assert all(torch.equal(out[k], v) for k, v in state.items())


def test_noise_std_matches_the_request():
    state = {"w": torch.randn(400, 400, generator=torch.Generator().manual_seed(0)) * 3.0, "idx": torch.arange(5)}
    stds = tensor_stds(state)
    assert stds["w"] == pytest.approx(3.0, rel=0.02) and "idx" not in stds
    out = add_parameter_noise(state, 0.1, stds, seed=2)
    assert float((out["w"] - state["w"]).std()) == pytest.approx(0.1 * stds["w"], rel=0.02)
    assert torch.equal(out["idx"], state["idx"])
    again = add_parameter_noise(state, 0.1, stds, seed=2)
    assert torch.equal(again["w"], out["w"])  # seeded
    with pytest.raises(ValueError):
        add_parameter_noise(state, -1.0, stds, seed=0)


@pytest.mark.parametrize("classes,parts,mode", [(10, 4, "range"), (1000, 4, "range"), (10, 3, "random"), (7, 7, "random")])
def test_partitions_are_disjoint_and_cover_the_classes(classes, parts, mode):
    groups = class_partitions(classes, parts, mode, seed=3)
    assert len(groups) == parts
    flat = [c for g in groups for c in g]
    assert sorted(flat) == list(range(classes)) and len(flat) == len(set(flat))
    assert max(map(len, groups)) - min(map(len, groups)) <= 1
    if mode == "range":
        assert all(g == list(range(g[0], g[-1] + 1)) for g in groups)
    assert class_partitions(1000, 4)[0] == list(range(250))


def test_partition_indices():
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    assert indices_of_classes(labels, [1, 2]).tolist() == [1, 2, 3, 5]


def test_grid_axes_for_noise_and_partitions():
    cfg = InterTrainConfig(lrs=[1e-4], steps=[3], noise_stage="before_mix", noise_multipliers=[0.0, 0.1], partitions=2)
    runs = inter_runs(cfg, 100)
    assert [r.name for r in runs] == ["mae00-p0-n0", "mae00-p0-n1", "mae00-p1-n0", "mae00-p1-n1"]
    assert [r.noise for r in runs] == [0.0, 0.1, 0.0, 0.1] and [r.partition for r in runs] == [0, 0, 1, 1]


@pytest.fixture
def small(tmp_path):
    return tmp_path, build_adapt_inputs(tmp_path)


def _cfg(tmp_path, stock, out, **inter):
    return AdaptConfig(model=str(stock), target=str(tmp_path / "target"), source=str(tmp_path / "source"), out=str(tmp_path / out),
                       checkpoint_every_s=1e9, inter=InterTrainConfig(lrs=[1e-3], steps=[2], batch_size=6, decoder_warmup_steps=1, **inter),
                       finetune=FineTuneConfig(lrs=[1e-3], steps=2, batch_size=6))


@pytest.mark.parametrize("stage", ["before_inter", "before_finetune", "before_mix"])
def test_adapt_with_noise_at_each_stage(small, stage):
    tmp_path, stock = small
    result = run_adapt(_cfg(tmp_path, stock, stage, noise_stage=stage, noise_multipliers=[0.0, 0.3]), echo=None)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    records = manifest["ingredients"]
    assert records["mae00-n1-ft00"]["noise"] == {"stage": stage, "multiplier": 0.3}
    quiet, _ = read_checkpoint(result.run_dir / "ingredients" / "mae00-n0-ft00.safetensors")
    loud, _ = read_checkpoint(result.run_dir / "ingredients" / "mae00-n1-ft00.safetensors")
    assert not torch.equal(quiet["blocks.0.attn.qkv.weight"], loud["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("loss", ["mae", "supervised"])
def test_partition_soup(small, loss):
    tmp_path, stock = small
    result = run_adapt(_cfg(tmp_path, stock, f"part-{loss}", partitions=3, partition_loss=loss), echo=None)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["partitions"]["classes"] == [[0], [1], [2]]
    assert sorted(manifest["ingredients"]) == ["mae00-p0-ft00", "mae00-p1-ft00", "mae00-p2-ft00"]
    log = (result.run_dir / "adapt.log").read_text()
    assert "source partition 1 (6 images)" in log  # the one image held out for the estimates is of class 0
