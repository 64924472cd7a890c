"""Real-size models from timm's own sources, offline: a ``save_for_hf`` folder (``local-dir:``) and the local
Hugging Face cache (``hf-hub:``), through ``adapt``, ``mix``, ``tta`` and ``export`` at 224 px."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from timm.models import save_for_hf

from adaptsoup.core.checkpoint import read_checkpoint
from adaptsoup.core.data import Preprocess
from adaptsoup.core.models import load_model
from adaptsoup.core.sources import resolve_model_source
from adaptsoup.errors import CheckpointError
from adaptsoup_cli.main import main
from helpers import CLASS_NAMES, write_noise_images

HUB_ID = "timm/vit_base_patch16_224.mae"


def _vit_base_shaped(**kwargs) -> torch.nn.Module:
    """vit_base_patch16_224 at its real image and patch size (224 px, 16 px patches), one block 192 wide."""
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", depth=1, embed_dim=192, num_heads=3, num_classes=len(CLASS_NAMES), **kwargs)


def _save(model: torch.nn.Module, folder: Path) -> Path:
    save_for_hf(model, str(folder), model_config={"label_names": CLASS_NAMES}, safe_serialization=True)
    return folder


def _hub_cache(root: Path, model: torch.nn.Module) -> Path:
    """A Hugging Face cache holding ``HUB_ID`` as ``hf download`` leaves it."""
    repo = root / ("models--" + HUB_ID.replace("/", "--"))
    _save(model, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    return root


def _cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out, captured.err


@pytest.fixture
def images(tmp_path) -> Path:
    for i, name in enumerate(CLASS_NAMES):
        write_noise_images(tmp_path / "source" / name, 2, seed=10 + i, size=(64, 48))  # not square: resize + centre crop
    write_noise_images(tmp_path / "target", 4, seed=30, size=(48, 64))
    return tmp_path


def test_a_224px_vit_from_the_hub_cache_goes_through_adapt_mix_tta_and_export(tmp_path, images, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(_hub_cache(tmp_path / "hf", _vit_base_shaped())))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    code, out, err = _cli(capsys, "adapt", "--model", f"hf-hub:{HUB_ID}", "--target", images / "target", "--source", images / "source",
                          "--out", run, "--inter-lrs", "1e-4,2e-4", "--inter-steps", "2", "--decoder-warmup-steps", "1", "--ft-lrs", "1e-4",
                          "--ft-steps", "2", "--batch-size", "4", "--no-progress")
    assert code == 0, err
    soup = run / "soup.safetensors"
    _, meta = read_checkpoint(soup)
    assert (meta.arch, tuple(meta.input_size), meta.crop_pct, meta.class_names) == ("vit_base_patch16_224", (3, 224, 224), 0.9, CLASS_NAMES)
    assert meta.model_kwargs["depth"] == 1 and meta.model_kwargs["embed_dim"] == 192
    code, out, err = _cli(capsys, "mix", run, "--method", "model-stock", "--no-progress")
    assert code == 0, err
    code, out, err = _cli(capsys, "tta", "--model", soup, "--target", images / "target", "--method", "tent", "--batch-size", "2",
                          "--out", tmp_path / "tta", "--no-progress")
    assert code == 0, err
    code, out, err = _cli(capsys, "export", "--model", soup, "--onnx", tmp_path / "soup.onnx", "--images", images / "target")
    assert code == 0, err
    assert "parity on 4 images" in out and "top-1 agreement 100.0%" in out


def test_a_global_pool_vit_from_a_local_folder_adapts(tmp_path, images):
    from adaptsoup.pipeline.adapt import run_adapt
    from adaptsoup.pipeline.recipe import AdaptConfig, InterTrainConfig

    folder = _save(_vit_base_shaped(class_token=False, global_pool="avg"), tmp_path / "gap")
    model = load_model(None, f"local-dir:{folder}")
    assert model.cls_token is None and model.global_pool == "avg"
    assert Preprocess.for_model(model) == Preprocess((224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.9, "bicubic")
    cfg = AdaptConfig(model=f"local-dir:{folder}", target=str(images / "target"), source=str(images / "source"), out=str(tmp_path / "run"),
                      finetune_back=False, inter=InterTrainConfig(lrs=[1e-4], steps=[2], batch_size=4, decoder_warmup_steps=1))
    result = run_adapt(cfg, echo=None)
    soup = load_model(None, result.soup_path)
    assert soup.cls_token is None and soup.global_pool == "avg"
    state, _ = read_checkpoint(result.ingredients[0])
    assert not torch.equal(state["blocks.0.attn.qkv.weight"], model.state_dict()["blocks.0.attn.qkv.weight"])


def test_missing_sources_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match=f"not in the local Hugging Face cache {tmp_path / 'empty-cache'}"):
        resolve_model_source(f"hf-hub:{HUB_ID}")
    with pytest.raises(CheckpointError, match="has no config.json"):
        resolve_model_source(f"local-dir:{tmp_path}")
    code, out, err = _cli(capsys, "info", "hf-hub:timm/not_cached")
    assert code == 2 and err.count("\n") == 1 and "empty-cache" in err


def test_the_pretrained_protocol_takes_both_models_from_timm_sources(tmp_path, images, monkeypatch):
    """A user with a timm fine-tune of vit_base_patch16_224.mae: the deployed model from a folder, the MAE
    checkpoint it came from out of the offline hub cache; inter-training starts from the latter."""
    from adaptsoup.pipeline.adapt import run_adapt
    from adaptsoup.pipeline.recipe import AdaptConfig, FineTuneConfig, InterTrainConfig

    deployed = _save(_vit_base_shaped(), tmp_path / "deployed")
    torch.manual_seed(1)
    pretrained = timm.create_model("vit_base_patch16_224", depth=1, embed_dim=192, num_heads=3, num_classes=0)
    monkeypatch.setenv("HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", pretrained)))
    cfg = AdaptConfig(model=f"local-dir:{deployed}", pretrained=f"hf-hub:{HUB_ID}", target=str(images / "target"),
                      source=str(images / "source"), out=str(tmp_path / "run"), vanilla=0,
                      inter=InterTrainConfig(lrs=[1e-12], steps=[1], batch_size=4, decoder_warmup_steps=1),
                      finetune=FineTuneConfig(lrs=[1e-12], steps=1, batch_size=4))
    result = run_adapt(cfg, echo=None)
    inter, _ = read_checkpoint(result.run_dir / "inter" / "mae00.safetensors")
    key = "blocks.0.attn.qkv.weight"
    assert torch.allclose(inter[key], pretrained.state_dict()[key], atol=1e-6)  # from the hub checkpoint, not the deployed one
    assert not torch.allclose(inter[key], load_model(None, f"local-dir:{deployed}").state_dict()[key], atol=1e-3)
