"""MoCo v3 and MMCR: losses against their definitions, and inter-training with them inside adapt."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import adaptsoup  # noqa: F401
from adaptsoup.pipeline.adapt import run_adapt
from adaptsoup.core.checkpoint import read_checkpoint
from adaptsoup.pipeline.plan import inter_runs
from adaptsoup.pipeline.recipe import AdaptConfig, FineTuneConfig, InterTrainConfig, MMCRGrid, MoCoV3Grid
from adaptsoup.ssl.mmcr import MMCR, mmcr_loss
from adaptsoup.ssl.mocov3 import MoCoV3, mocov3_loss
from helpers import build_adapt_inputs


def direct_ctr(q, k, t):
    """-mean_i log( exp(q_i·k_i/t) / Σ_j exp(q_i·k_j/t) ) · 2t, written out."""
    q = q / q.norm(dim=1, keepdim=True)
    k = k / k.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(q.shape[0]):
        num = torch.exp(q[i] @ k[i] / t)
        den = sum(torch.exp(q[i] @ k[j] / t) for j in range(k.shape[0]))
        total = total - torch.log(num / den)
    return total / q.shape[0] * 2 * t


@pytest.mark.parametrize("t", [0.1, 0.2, 1.0])
def test_mocov3_loss_matches_its_definition(t):
    g = torch.Generator().manual_seed(0)
    q1, q2, k1, k2 = (torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in range(4))
    want = direct_ctr(q1, k2, t) + direct_ctr(q2, k1, t)
    assert mocov3_loss(q1, q2, k1, k2, t).item() == pytest.approx(want.item(), abs=1e-5)


def test_mmcr_is_minus_the_nuclear_norm_for_one_view_and_falls_when_views_agree():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 1, 8, generator=g)
    centroids = F.normalize(z, dim=-1).squeeze(1)
    assert mmcr_loss(z, lam=0.0).item() == pytest.approx(-torch.linalg.svdvals(centroids).sum().item(), abs=1e-5)
    # with one view each image's own matrix is a unit vector: the local term is exactly λ
    assert mmcr_loss(z, lam=0.5).item() == pytest.approx(mmcr_loss(z, lam=0.0).item() + 0.5, abs=1e-5)
    base = torch.randn(6, 1, 8, generator=g)
    agreeing = base.repeat(1, 4, 1) + 0.01 * torch.randn(6, 4, 8, generator=g)
    disagreeing = base.repeat(1, 4, 1) + 2.0 * torch.randn(6, 4, 8, generator=g)
    assert mmcr_loss(agreeing).item() < mmcr_loss(disagreeing).item()


@pytest.mark.parametrize("cls,views", [(MoCoV3, 2), (MMCR, 3)])
def test_wrappers_train_the_encoder(cls, views):
    encoder = timm.create_model("vit_pico_patch4_32")
    module = cls(encoder)
    loss = module(torch.randn(views, 5, 3, 32, 32))
    loss.backward()
    assert torch.isfinite(loss) and encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in module.head_parameters() if p.requires_grad)


def test_grids_per_algorithm():
    cfg = InterTrainConfig(ssl=["mae", "mocov3", "mmcr"], lrs=[1e-4, 2e-4], steps=[5],
                           mocov3=MoCoV3Grid(temperatures=[0.1, 1.0]), mmcr=MMCRGrid(lambdas=[0.0, 0.1, 0.5]))
    runs = inter_runs(cfg, num_images=100)
    assert [r.name for r in runs if r.ssl == "mocov3"] == ["mocov300", "mocov301", "mocov302", "mocov303"]
    assert sum(r.ssl == "mae" for r in runs) == 2 and sum(r.ssl == "mmcr" for r in runs) == 6
    assert {r.temperature for r in runs if r.ssl == "mocov3"} == {0.1, 1.0}


def test_adapt_mixes_ingredients_of_three_ssl_algorithms(tmp_path):
    stock = build_adapt_inputs(tmp_path, target=16)
    cfg = AdaptConfig(model=str(stock), target=str(tmp_path / "target"), source=str(tmp_path / "source"), out=str(tmp_path / "run"),
                      checkpoint_every_s=1e9,
                      inter=InterTrainConfig(ssl=["mae", "mocov3", "mmcr"], lrs=[1e-3], steps=[3], batch_size=8, decoder_warmup_steps=1,
                                             head_warmup_frac=0.5, mmcr=MMCRGrid(lambdas=[0.1], views=3)),
                      finetune=FineTuneConfig(lrs=[1e-3], steps=2, batch_size=8))
    result = run_adapt(cfg, echo=None)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert sorted(manifest["ingredients"]) == ["mae00-ft00", "mmcr00-ft00", "mocov300-ft00"]
    assert {manifest["inter"][n]["ssl"] for n in manifest["inter"]} == {"mae", "mocov3", "mmcr"}
    for name in ("mocov300", "mmcr00"):
        state, meta = read_checkpoint(result.run_dir / "inter" / f"{name}.safetensors")
        assert not any(k.startswith(("projector", "predictor", "encoder.")) for k in state)  # heads discarded
        assert meta.provenance["ssl"] in ("mocov3", "mmcr")
        assert (result.run_dir / "inter" / f"{name}.heads.safetensors").is_file()
    soup, _ = read_checkpoint(result.soup_path)
    assert "head.weight" in soup


def test_every_ssl_algorithm_trains_under_bf16_autocast(tmp_path):
    """The benchmarks run with --bf16: every inter-training loss and the fine-tuning must stay finite there."""
    stock = build_adapt_inputs(tmp_path, target=16)
    cfg = AdaptConfig(model=str(stock), target=str(tmp_path / "target"), source=str(tmp_path / "source"), out=str(tmp_path / "run"),
                      checkpoint_every_s=1e9, precision="bf16",
                      inter=InterTrainConfig(ssl=["mae", "mocov3", "mmcr"], lrs=[1e-3], steps=[3], batch_size=8, decoder_warmup_steps=1,
                                             head_warmup_frac=0.5, mmcr=MMCRGrid(lambdas=[0.1], views=2)),
                      finetune=FineTuneConfig(lrs=[1e-3], steps=2, batch_size=8))
    result = run_adapt(cfg, echo=None)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    for name, record in manifest["inter"].items():
        assert all(math.isfinite(x) for x in record["train"]["losses"]), name
    for path in result.ingredients:
        state, _ = read_checkpoint(path)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path.name
