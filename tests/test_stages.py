"""The stages of ``adapt`` one at a time, the registry of inter-training losses, and where runs start."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import timm
import torch

from adaptsoup.core.run_dir import RunDir
from adaptsoup.errors import AdaptsoupError
from adaptsoup.pipeline.context import open_run
from adaptsoup.pipeline.finetune_back import finetune_back
from adaptsoup.pipeline.inter_train import inter_train
from adaptsoup.pipeline.plan import plan_run
from adaptsoup.pipeline.start import StartPoint, start_checkpoint
from adaptsoup.pipeline.recipe import AdaptConfig, FineTuneConfig, InterTrainConfig
from adaptsoup.ssl.mae import MaskedAutoencoder
from adaptsoup.ssl.mmcr import MMCR
from adaptsoup.ssl.mocov3 import MoCoV3
from adaptsoup.ssl.registry import SSL_LOSSES, SSLSettings, ssl_loss
from helpers import build_adapt_inputs


def test_the_registry_builds_each_loss_and_refuses_unknown_names():
    assert list(SSL_LOSSES) == ["mae", "mocov3", "mmcr"]
    settings = SSLSettings(mask_ratio=0.5, decoder_depth=1, temperature=0.1, lam=0.2, views=3)
    built = {name: loss.wrap(timm.create_model("vit_pico_patch4_32"), settings) for name, loss in SSL_LOSSES.items()}
    assert isinstance(built["mae"], MaskedAutoencoder) and built["mae"].mask_ratio == 0.5 and built["mae"].decoder_config.depth == 1
    assert isinstance(built["mocov3"], MoCoV3) and built["mocov3"].temperature == 0.1
    assert isinstance(built["mmcr"], MMCR) and built["mmcr"].lam == 0.2
    assert [SSL_LOSSES[n].views(settings) for n in SSL_LOSSES] == [1, 2, 3]
    for name, loss in SSL_LOSSES.items():
        views = loss.views(settings)
        x = torch.randn(4, 3, 32, 32) if views == 1 else torch.randn(views, 4, 3, 32, 32)
        assert torch.isfinite(loss.loss_fn(built[name], x, None)), name
    with pytest.raises(AdaptsoupError, match="mae, mocov3, mmcr"):
        ssl_loss("simclr")


def test_fine_tuning_back_starts_from_the_inter_trained_encoder_and_the_rest_from_the_deployed_model(tmp_path):
    cfg = AdaptConfig(model=str(tmp_path / "deployed.safetensors"), arch="vit_pico_patch4_32", target="t", source="s", out=str(tmp_path))
    run_dir = RunDir(tmp_path)
    (inter,) = plan_run(AdaptConfig(inter=InterTrainConfig(lrs=[1e-3], steps=[1])), 10).inters
    # inter-training and vanilla fine-tuning: the deployed model itself (its arch, as given) ...
    assert start_checkpoint(cfg, run_dir) == StartPoint(Path(cfg.model), "vit_pico_patch4_32", pretrained=False)
    # ... or, with --pretrained (the paper's protocol), the pre-trained encoder inside the deployed architecture
    paper = dataclasses.replace(cfg, pretrained=str(tmp_path / "mae_pretrain.pth"))
    assert start_checkpoint(paper, run_dir) == StartPoint(tmp_path / "mae_pretrain.pth", "vit_pico_patch4_32", pretrained=True)
    # fine-tuning back: the ingredient's own inter-trained encoder, under either protocol
    own = StartPoint(tmp_path / "inter" / f"{inter.name}.safetensors", None, pretrained=False)
    assert start_checkpoint(cfg, run_dir, inter) == start_checkpoint(paper, run_dir, inter) == own


def test_each_stage_runs_alone_on_the_run_directory(tmp_path):
    stock = build_adapt_inputs(tmp_path, per_class=4, target=10)
    cfg = AdaptConfig(model=str(stock), target=str(tmp_path / "target"), source=str(tmp_path / "source"), out=str(tmp_path / "run"),
                      checkpoint_every_s=0.0, inter=InterTrainConfig(lrs=[1e-3, 2e-3], steps=[2], batch_size=8, decoder_warmup_steps=1),
                      finetune=FineTuneConfig(lrs=[1e-3], steps=2, batch_size=8))
    ctx = open_run(cfg, echo=None)
    plan = plan_run(cfg, len(ctx.inputs.target))
    inter_train(ctx, plan)
    assert sorted(p.name for p in (tmp_path / "run" / "inter").glob("mae??.safetensors")) == ["mae00.safetensors", "mae01.safetensors"]
    assert not list((tmp_path / "run" / "ingredients").iterdir())
    log = tmp_path / "run" / "adapt.log"
    before = len(log.read_text())
    ctx = open_run(cfg, echo=None)  # a later invocation (another process, another machine) picks up from the files
    finetune_back(ctx, plan)
    assert sorted(ctx.manifest.data["ingredients"]) == ["mae00-ft00", "mae01-ft00"]
    later = log.read_text()[before:]
    assert "fine-tune mae00-ft00" in later and "inter-train " not in later
