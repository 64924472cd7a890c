"""Which parameters decay: the rule the optimizer applies is the one its docstring states (MAE's)."""

from __future__ import annotations

import timm
import torch

import adaptsoup  # noqa: F401
from adaptsoup.ssl.mae import MaskedAutoencoder
from adaptsoup.ssl.mocov3 import MoCoV3
from adaptsoup.train.optim import make_optimizer, no_weight_decay_names


def test_fine_tuning_a_vit_skips_its_tokens_position_embedding_biases_and_norms():
    vit = timm.create_model("vit_pico_patch4_32", num_classes=3)
    skipped = no_weight_decay_names(vit)
    assert {"pos_embed", "cls_token", "norm.weight", "norm.bias", "head.bias", "blocks.0.norm1.weight"} <= skipped
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "head.weight"}.isdisjoint(skipped)


def test_inter_training_wrappers_decay_tokens_and_position_embedding_as_mae_pretraining_does():
    mae = MaskedAutoencoder(timm.create_model("vit_pico_patch4_32", num_classes=3))
    skipped = no_weight_decay_names(mae)
    assert {"mask_token", "encoder.cls_token", "encoder.pos_embed"}.isdisjoint(skipped)
    assert {"encoder.norm.weight", "decoder_norm.weight", "decoder_embed.bias"} <= skipped
    assert "decoder_pos_embed" not in skipped  # fixed sin-cos: not trained at all
    moco = MoCoV3(timm.create_model("vit_pico_patch4_32", num_classes=3))
    assert {"encoder.cls_token", "encoder.pos_embed"}.isdisjoint(no_weight_decay_names(moco))


def test_the_optimizer_uses_exactly_those_groups():
    mae = MaskedAutoencoder(timm.create_model("vit_pico_patch4_32", num_classes=3))
    optimizer = make_optimizer(mae, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999))
    names = {id(p): n for n, p in mae.named_parameters()}
    undecayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert undecayed == no_weight_decay_names(mae)
    assert decayed | undecayed == {n for n, p in mae.named_parameters() if p.requires_grad}
    assert torch.is_tensor(mae.mask_token) and "mask_token" in decayed
