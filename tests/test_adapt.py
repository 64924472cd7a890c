"""End-to-end ``adapt`` on a tiny model and a few dozen images: manifest, soup, resume after a crash."""

from __future__ import annotations

import json

import pytest
import torch

from adaptsoup.pipeline.adapt import run_adapt
from adaptsoup.core.checkpoint import read_checkpoint, save_checkpoint
from adaptsoup.errors import AdaptsoupError
from adaptsoup.ssl.mae import MaskedAutoencoder
from adaptsoup.core.models import load_model, model_meta
from adaptsoup.pipeline.recipe import AdaptConfig, FineTuneConfig, InterTrainConfig
from helpers import CLASS_NAMES, tiny_model, write_noise_images


class Crash(Exception):
    pass


@pytest.fixture
def setup(tmp_path):
    model = tiny_model()
    stock = save_checkpoint(tmp_path / "stock.safetensors", model.state_dict(), model_meta(model))
    for i, name in enumerate(CLASS_NAMES):
        write_noise_images(tmp_path / "source" / name, 8, seed=10 + i)
        write_noise_images(tmp_path / "eval" / name, 4, seed=20 + i)
    write_noise_images(tmp_path / "target" / "a", 12, seed=30)
    write_noise_images(tmp_path / "target" / "b" / "c", 12, seed=31, suffix=".jpg")
    (tmp_path / "target" / "broken.jpg").write_bytes(b"not an image")
    return tmp_path, stock


def config(tmp_path, stock_path, out="run", **overrides) -> AdaptConfig:
    cfg = AdaptConfig(
        model=str(stock_path), target=str(tmp_path / "target"), source=str(tmp_path / "source"), out=str(tmp_path / out),
        evals=[str(tmp_path / "eval")], vanilla=1, checkpoint_every_s=0.0,
        inter=InterTrainConfig(lrs=[1e-3, 2e-3], steps=[4], batch_size=8, decoder_warmup_steps=2),
        finetune=FineTuneConfig(lrs=[1e-3, 3e-3], steps=3, batch_size=8),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_adapt_writes_a_complete_run(setup):
    tmp_path, stock = setup
    result = run_adapt(config(tmp_path, stock), echo=None)
    run = result.run_dir
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["config"]["inter"]["lrs"] == [1e-3, 2e-3]
    assert manifest["environment"]["packages"]["torch"]
    assert manifest["data"]["target"] == {**manifest["data"]["target"], "images": 24, "skipped": 1}
    assert manifest["data"]["source"]["images"] == 22  # 2 held out (a tenth, class-balanced) for the estimates
    assert manifest["data"]["validation"]["images"] == 2 and "held out of every fine-tuning" in manifest["data"]["validation"]["origin"]
    rec = manifest["recommendation"]
    assert rec["model"] in {"deployed", "soup", "supervised_soup"} and rec["deployed"] == "deployed"
    assert {c["name"] for c in rec["candidates"]} == {"soup", "supervised_soup"}  # ingredients are never deployed
    assert set(manifest["estimates"]["models"]) == {"deployed", "soup", "supervised_soup", *(f"ingredient:{n}" for n in manifest["ingredients"])}
    assert result.recommendation == rec
    names = sorted(manifest["ingredients"])
    assert names == ["mae00-ft00", "mae00-ft01", "mae01-ft00", "mae01-ft01", "vanilla-ft00"]
    for name, record in manifest["ingredients"].items():
        assert record["status"] == "done" and (run / record["path"]).is_file()
        assert record["train"]["config"]["steps"] == 3
    assert set(manifest["timings_s"]) >= {"load_data", "inter_train", "fine_tune", "soup", "evaluate", "estimate"}
    # precision auto (the default): one probe per kind of training run (decoder warm-up, MAE, fine-tuning), kept in the
    # manifest; every run says which precision it used, and the runs of one kind all used the probe's choice
    probes = manifest["precision_probes"]
    assert len(probes) == 3 and set(probes.values()) <= {"fp32", "bf16", "bf16+math-attention"}
    trained = [r["train"]["precision"] for r in [*manifest["inter"].values(), *manifest["ingredients"].values()]]
    assert all(p["requested"] == "auto" and p["precision"] in probes.values() for p in trained)
    scores = manifest["metrics"]["eval"]
    assert set(scores) >= {"deployed", "soup", "supervised_soup", *names}
    assert all(0.0 <= v <= 100.0 for v in scores.values())
    # the soup loads as a model, carries metadata, and is the mean of the 4 self ingredients
    soup = load_model(None, result.soup_path)
    assert soup.pretrained_cfg["label_names"] == CLASS_NAMES
    _, meta = read_checkpoint(result.soup_path)
    assert meta.provenance["stage"] == "soup" and len(meta.provenance["parents"]) == 4
    states = [read_checkpoint(run / "ingredients" / f"{n}.safetensors")[0] for n in names if n.startswith("mae")]
    for key, value in soup.state_dict().items():
        mean = sum(s[key].double() for s in states) / 4
        assert torch.allclose(value.double(), mean, atol=1e-6), key
    # inter-trained encoders keep timm key names and no MAE keys
    enc_state, enc_meta = read_checkpoint(run / "inter" / "mae00.safetensors")
    assert "mask_token" not in enc_state and not any(k.startswith("decoder") for k in enc_state)
    assert enc_meta.provenance["stage"] == "inter-train"
    # the log says which decoder path was taken and what was skipped
    log = (run / "adapt.log").read_text()
    assert "warmed up" in log and "broken.jpg" in log
    assert not list((run / "state").iterdir()), "training state files are removed when runs finish"


def test_inter_training_changes_the_encoder_and_finetuning_the_head(setup):
    tmp_path, stock = setup
    result = run_adapt(config(tmp_path, stock, vanilla=0, evals=[]), echo=None)
    base, _ = read_checkpoint(stock)
    inter, _ = read_checkpoint(result.run_dir / "inter" / "mae00.safetensors")
    assert not torch.equal(base["blocks.0.attn.qkv.weight"], inter["blocks.0.attn.qkv.weight"])
    ing, _ = read_checkpoint(result.run_dir / "ingredients" / "mae00-ft00.safetensors")
    assert not torch.equal(inter["head.weight"], ing["head.weight"])


def test_stock_decoder_is_used_when_given(setup):
    tmp_path, stock = setup
    mae = MaskedAutoencoder(load_model(None, stock))
    decoder = save_checkpoint(tmp_path / "decoder.safetensors", mae.decoder_state_dict(), None)
    cfg = config(tmp_path, stock, vanilla=0, evals=[], stock=str(decoder))
    cfg.inter.lrs = [1e-3]
    result = run_adapt(cfg, echo=None)
    log = (result.run_dir / "adapt.log").read_text()
    assert "loaded from" in log and "warmed up" not in log
    assert not list((result.run_dir / "inter").glob("decoder_warmup*"))


def test_stock_decoder_can_be_warmed_up_before_the_encoder_moves(setup):
    tmp_path, stock = setup
    mae = MaskedAutoencoder(load_model(None, stock))
    given = mae.decoder_state_dict()
    decoder = save_checkpoint(tmp_path / "decoder.safetensors", given, None)
    cfg = config(tmp_path, stock, vanilla=0, evals=[], stock=str(decoder))
    cfg.inter.lrs, cfg.inter.decoder_warmup_loaded = [1e-3], True
    result = run_adapt(cfg, echo=None)
    assert "decoder warm-up (from the stock decoder)" in (result.run_dir / "adapt.log").read_text()
    (warm,) = (result.run_dir / "inter").glob("decoder_warmup_stock_*.safetensors")
    warmed, _ = read_checkpoint(warm)
    assert set(warmed) == set(given)
    assert any(not torch.equal(warmed[k], given[k]) for k in given), "the warm-up trained the stock's decoder"


def test_resume_after_a_crash_matches_an_uninterrupted_run(setup):
    tmp_path, stock = setup
    reference = run_adapt(config(tmp_path, stock, out="ref", evals=[]), echo=None)

    def crash_at(name: str, step: int):
        def hook(run: str, s: int) -> None:
            if run == name and s == step:
                raise Crash()
        return hook

    cfg = config(tmp_path, stock, out="crashy", evals=[])
    with pytest.raises(Crash):
        run_adapt(cfg, echo=None, on_step=crash_at("mae01", 2))  # mid inter-training
    assert (tmp_path / "crashy" / "state" / "mae01.pt").is_file()
    with pytest.raises(Crash):
        run_adapt(cfg, echo=None, on_step=crash_at("mae01-ft00", 1))  # mid fine-tuning
    result = run_adapt(cfg, echo=None)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["ingredients"]["mae01-ft00"]["train"]["resumed_from_step"] == 1
    assert manifest["inter"]["mae01"]["train"]["resumed_from_step"] == 2
    got, _ = read_checkpoint(result.soup_path)
    want, _ = read_checkpoint(reference.soup_path)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_class_mismatch_between_source_and_model_is_refused(setup):
    tmp_path, stock = setup
    write_noise_images(tmp_path / "source" / "zebra", 2, seed=99)
    with pytest.raises(AdaptsoupError, match="zebra"):
        run_adapt(config(tmp_path, stock), echo=None)


def test_non_vit_stock_is_refused(tmp_path):
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    path = save_checkpoint(tmp_path / "r.safetensors", model.state_dict(), None)
    cfg = AdaptConfig(model=str(path), arch="resnet18", target=str(tmp_path), source=str(tmp_path), out=str(tmp_path / "o"))
    write_noise_images(tmp_path / "t", 2)
    with pytest.raises(AdaptsoupError, match="VisionTransformer"):
        run_adapt(cfg, echo=None)


# -- the pre-trained protocol (issue #13) -----------------------------------------------------------------------


def _pretrained_file(tmp_path, with_decoder: bool = True):
    """A tiny 'pre-trained stock': another seed's weights than the deployed model, with an MAE decoder."""
    pre = tiny_model(seed=5)
    state = dict(pre.state_dict())
    if with_decoder:
        torch.manual_seed(6)
        state.update(MaskedAutoencoder(pre).decoder_state_dict())
    return save_checkpoint(tmp_path / "pretrained.safetensors", state, model_meta(pre)), pre


def _body(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def test_pretrained_protocol_starts_inter_training_and_vanilla_fine_tuning_from_the_pretrained_encoder(setup):
    tmp_path, stock = setup
    path, pre = _pretrained_file(tmp_path)
    deployed, _ = read_checkpoint(stock)
    # learning rates so small that a trained encoder stays where it started, to the float
    cfg = config(tmp_path, stock, pretrained=str(path), evals=[],
                 inter=InterTrainConfig(lrs=[1e-12], steps=[2], batch_size=8, decoder_warmup_steps=2),
                 finetune=FineTuneConfig(lrs=[1e-12], steps=2, batch_size=8))
    result = run_adapt(cfg, echo=None)
    run = result.run_dir
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["protocol"] == "pretrained"
    assert "MAE decoder: loaded from the pre-trained checkpoint" in (run / "adapt.log").read_text()
    inter, meta = read_checkpoint(run / "inter" / "mae00.safetensors")
    assert meta.provenance["parents"] == [str(path)]
    assert meta.class_names == CLASS_NAMES  # the deployed model's classes and preprocessing
    for name, value in _body(pre.state_dict()).items():
        assert torch.allclose(inter[name], value, atol=1e-6), name
        if value.abs().max() > 1e-2 and "norm" not in name:  # LayerNorms start at 1/0 in both, tokens near 0
            assert not torch.allclose(inter[name], deployed[name], atol=1e-3), name
    assert all(torch.count_nonzero(v) == 0 for k, v in inter.items() if k.startswith("head."))  # the head is dropped
    vanilla, vmeta = read_checkpoint(run / "ingredients" / "vanilla-ft00.safetensors")
    assert vmeta.provenance["parents"] == [str(path)]
    for name, value in _body(pre.state_dict()).items():
        assert torch.allclose(vanilla[name], value, atol=1e-5), name
    # the head is the linear probe's, fitted on the pre-trained encoder's features (not the deployed head)
    assert not torch.allclose(vanilla["head.weight"], deployed["head.weight"])
    assert (run / "inter" / "pretrained.probe.safetensors").is_file()


def test_deployed_protocol_is_recorded_and_pretrained_decoder_falls_back_to_stock(setup):
    tmp_path, stock = setup
    result = run_adapt(config(tmp_path, stock, evals=[], vanilla=0), echo=None)
    assert json.loads((result.run_dir / "manifest.json").read_text())["protocol"] == "deployed"
    path, _ = _pretrained_file(tmp_path, with_decoder=False)
    decoder = save_checkpoint(tmp_path / "decoder.safetensors", MaskedAutoencoder(tiny_model()).decoder_state_dict(), None)
    result = run_adapt(config(tmp_path, stock, out="run2", evals=[], vanilla=0, pretrained=str(path), stock=str(decoder)), echo=None)
    assert f"MAE decoder: loaded from {decoder}" in (result.run_dir / "adapt.log").read_text()


def test_pretrained_needs_an_existing_file_and_a_positive_task_vector_scale(setup):
    tmp_path, stock = setup
    with pytest.raises(AdaptsoupError, match="--pretrained checkpoint not found"):
        run_adapt(config(tmp_path, stock, pretrained=str(tmp_path / "missing.safetensors")), echo=None)
    path, _ = _pretrained_file(tmp_path)
    with pytest.raises(AdaptsoupError, match="task_vector_scale must be a number > 0"):
        run_adapt(config(tmp_path, stock, pretrained=str(path), finetune_back=False, vanilla=0, task_vector_scale=0), echo=None)


def test_pretrained_without_fine_tuning_makes_task_vector_ingredients(setup):
    """Label-free ingredients under the pretrained protocol: deployed + scale · (inter-trained − pretrained)."""
    tmp_path, stock = setup
    path, pre = _pretrained_file(tmp_path)
    deployed, _ = read_checkpoint(stock)
    cfg = config(tmp_path, stock, pretrained=str(path), finetune_back=False, vanilla=0, evals=[], task_vector_scale=2.0,
                 inter=InterTrainConfig(lrs=[1e-3], steps=[3], batch_size=8, decoder_warmup_steps=0))
    result = run_adapt(cfg, echo=None)
    inter, _ = read_checkpoint(result.run_dir / "inter" / "mae00.safetensors")
    ingredient, meta = read_checkpoint(result.run_dir / "ingredients" / "mae00.safetensors")
    assert meta.provenance["kind"] == "task-vector" and meta.provenance["task_vector_scale"] == 2.0
    moved = 0
    for name, value in deployed.items():
        if name.startswith("head.") or not value.is_floating_point():
            assert torch.equal(ingredient[name], value), name  # the deployed head and buffers, untouched
            continue
        delta = inter[name].double() - pre.state_dict()[name].double()
        assert torch.allclose(ingredient[name].double(), value.double() + 2.0 * delta, atol=1e-6), name
        moved += bool(delta.abs().max() > 0)
    assert moved > 0  # inter-training did move the encoder
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["ingredients"]["mae00"]["kind"] == "task-vector"
