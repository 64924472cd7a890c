"""The MAE wrapper: masking, loss on masked patches only, gradients, timm token conventions, decoder I/O."""

from __future__ import annotations

import pytest
import timm
import torch

import adaptsoup  # noqa: F401
from adaptsoup.errors import CheckpointError, ModelError
from adaptsoup.ssl.mae import DecoderConfig, MaskedAutoencoder, sincos_pos_embed_2d
from adaptsoup.core.models import MAE_DECODER_PREFIXES, encoder_state_dict

VARIANTS = {
    "cls": {},
    "cls+reg": dict(reg_tokens=2),
    "no-cls": dict(class_token=False, global_pool="avg"),
    "no-embed-class+reg": dict(no_embed_class=True, reg_tokens=1),
}


def make(variant: str = "cls", mask_ratio: float = 0.75) -> MaskedAutoencoder:
    torch.manual_seed(0)
    encoder = timm.create_model("vit_pico_patch4_32", **VARIANTS[variant])
    return MaskedAutoencoder(encoder, mask_ratio=mask_ratio)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_masking_keeps_exactly_the_visible_count(ratio):
    mae = make(mask_ratio=ratio)
    keep, mask, restore = mae.random_masking(64, batch=5, device=torch.device("cpu"))
    expected = max(1, int(64 * (1 - ratio)))
    assert keep.shape == (5, expected)
    assert torch.all((mask == 0).sum(dim=1) == expected)
    # each sample keeps its own distinct patches, and ids_restore inverts the shuffle
    assert all(len(set(row.tolist())) == expected for row in keep)
    assert torch.equal(torch.gather(mask, 1, keep), torch.zeros_like(keep, dtype=mask.dtype))
    assert not torch.equal(keep[0], keep[1])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_shapes_and_gradients_reach_the_encoder(variant):
    mae = make(variant)
    loss, pred, mask = mae(torch.randn(3, 3, 32, 32))
    assert pred.shape == (3, 64, 4 * 4 * 3) and mask.shape == (3, 64)
    assert torch.isfinite(loss)
    loss.backward()
    enc = mae.encoder
    assert enc.patch_embed.proj.weight.grad is not None and enc.patch_embed.proj.weight.grad.abs().sum() > 0
    assert enc.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert enc.pos_embed.grad.abs().sum() > 0
    if enc.cls_token is not None:
        assert enc.cls_token.grad is not None
    if getattr(enc, "reg_token", None) is not None:
        assert enc.reg_token.grad is not None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encoder_on_all_tokens_matches_timm_forward_features(variant):
    """With nothing masked and patches in order, the wrapper's encoder is timm's forward_features."""
    mae = make(variant, mask_ratio=0.0).eval()
    x = torch.randn(2, 3, 32, 32)
    # mask ratio 0 keeps all patches but shuffles them; undo the shuffle before comparing patch tokens
    gen = torch.Generator().manual_seed(3)
    latent, mask, restore = mae.forward_encoder(x, generator=gen)
    gen = torch.Generator().manual_seed(3)
    keep, _, _ = mae.random_masking(64, 2, torch.device("cpu"), generator=gen)
    reference = mae.encoder.forward_features(x)
    npt = mae.num_prefix
    assert torch.allclose(latent[:, :npt], reference[:, :npt], atol=1e-5)
    expected_patches = torch.gather(reference[:, npt:], 1, keep.unsqueeze(-1).expand(-1, -1, reference.shape[-1]))
    assert torch.allclose(latent[:, npt:], expected_patches, atol=1e-5)


def test_loss_ignores_visible_patches():
    mae = make()
    images = torch.randn(2, 3, 32, 32)
    target = mae.patchify(images)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    mask = torch.zeros(2, 64)
    mask[:, :16] = 1
    perfect_on_masked = target.clone()
    perfect_on_masked[:, 16:] += 100.0  # garbage on visible patches must not count
    assert mae.loss(images, perfect_on_masked, mask).item() == pytest.approx(0.0, abs=1e-6)
    wrong_on_masked = target.clone()
    wrong_on_masked[:, :16] += 1.0
    assert mae.loss(images, wrong_on_masked, mask).item() == pytest.approx(1.0, rel=1e-5)


def test_patchify_order_matches_mae():
    mae = make()
    img = torch.arange(3 * 32 * 32, dtype=torch.float32).reshape(1, 3, 32, 32)
    patches = mae.patchify(img)
    # patch (row 0, col 1), pixel (p=0, q=0), channel 2
    assert patches[0, 1, 2].item() == img[0, 2, 0, 4].item()
    # patch (row 1, col 0), pixel (p=1, q=2), channel 0: index (p*4 + q)*3 + c
    assert patches[0, 8, (1 * 4 + 2) * 3].item() == img[0, 0, 5, 2].item()


def test_sincos_embedding_matches_mae_layout():
    emb = sincos_pos_embed_2d(16, (2, 3), num_prefix=1)
    assert emb.shape == (1, 1 + 6, 16)
    assert torch.all(emb[0, 0] == 0)
    # position (row 0, col 0): sin(0)=0 and cos(0)=1 for both halves
    assert torch.allclose(emb[0, 1], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    # first half encodes the column: moving one column changes it, the second half stays
    assert not torch.allclose(emb[0, 2, :8], emb[0, 1, :8]) and torch.allclose(emb[0, 2, 8:], emb[0, 1, 8:])


def test_decoder_state_uses_original_mae_names_and_round_trips():
    mae = make()
    state = mae.decoder_state_dict()
    assert state and all(k.startswith(MAE_DECODER_PREFIXES) for k in state)
    assert {"decoder_embed.weight", "mask_token", "decoder_pos_embed", "decoder_norm.weight", "decoder_pred.weight"} <= set(state)
    assert any(k.startswith("decoder_blocks.0.attn.qkv") for k in state)
    other = make()
    torch.nn.init.normal_(other.decoder_embed.weight)
    # a full MAE checkpoint (encoder + decoder keys) loads its decoder; encoder keys are ignored
    full = {**other.encoder.state_dict(), **state}
    other.load_decoder_state_dict(full)
    assert torch.equal(other.decoder_embed.weight, mae.decoder_embed.weight)
    # and the encoder part of such a checkpoint has no MAE keys left for timm
    assert not any(k.startswith(MAE_DECODER_PREFIXES) for k in encoder_state_dict(full))


def test_decoder_mismatch_is_a_clear_error():
    mae = make()
    with pytest.raises(CheckpointError, match="no MAE decoder keys"):
        mae.load_decoder_state_dict(mae.encoder.state_dict())
    wrong = MaskedAutoencoder(timm.create_model("vit_pico_patch4_32"), DecoderConfig(dim=64, depth=1, num_heads=2))
    with pytest.raises(CheckpointError, match="mis-shaped"):
        mae.load_decoder_state_dict(wrong.decoder_state_dict())


def test_non_vit_is_refused():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    with pytest.raises(ModelError, match="VisionTransformer"):
        MaskedAutoencoder(model)


def test_decoder_sizes_scale_with_the_encoder():
    assert DecoderConfig.for_encoder(768) == DecoderConfig(512, 8, 16)
    assert DecoderConfig.for_encoder(192).dim < 512
