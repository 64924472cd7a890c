"""Checkpoint reading and writing, and loading checkpoints into models."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from adaptsoup.core.checkpoint import CheckpointMeta, read_checkpoint, read_meta, save_checkpoint
from adaptsoup.errors import CheckpointError
from adaptsoup.core.models import class_names, encoder_state_dict, load_model, model_meta

from helpers import ARCH, CLASS_NAMES, MEAN, STD, logits, random_batch


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def _save_pt(path, obj):
    torch.save(obj, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# safetensors round trip


def test_safetensors_round_trip_keeps_tensors_and_meta(tmp_path, pico_model):
    meta = model_meta(pico_model, run="round-trip", seed=3)
    path = save_checkpoint(tmp_path / "model.safetensors", pico_model.state_dict(), meta)

    state, meta_back = read_checkpoint(path)
    _assert_same_tensors(state, pico_model.state_dict())
    assert meta_back == meta
    assert meta_back.arch == ARCH
    assert meta_back.num_classes == 3
    assert meta_back.class_names == CLASS_NAMES
    assert meta_back.input_size == (3, 32, 32)
    assert meta_back.mean == pytest.approx(MEAN)
    assert meta_back.std == pytest.approx(STD)
    assert meta_back.provenance == {"run": "round-trip", "seed": 3}
    assert read_meta(path) == meta


def test_meta_json_round_trip_ignores_unknown_fields():
    meta = CheckpointMeta(arch=ARCH, num_classes=2, class_names=["a", "b"], model_kwargs={"drop_rate": 0.1})
    text = meta.to_json().replace("{", '{"added_in_a_future_version": 1, ', 1)
    assert CheckpointMeta.from_json(text) == meta


def test_load_model_rebuilds_arch_from_metadata(tmp_path, pico_model):
    path = save_checkpoint(tmp_path / "model.safetensors", pico_model.state_dict(), model_meta(pico_model))
    loaded = load_model(None, path)

    assert type(loaded) is type(pico_model)
    assert loaded.num_classes == 3
    assert not loaded.training
    assert class_names(loaded) == CLASS_NAMES
    assert model_meta(loaded).mean == pytest.approx(MEAN)
    x = random_batch(6)
    assert torch.equal(logits(loaded, x), logits(pico_model, x))


def test_save_without_meta_then_load_needs_arch(tmp_path, pico_model):
    path = save_checkpoint(tmp_path / "bare.safetensors", pico_model.state_dict(), None)
    assert read_checkpoint(path)[1] is None
    with pytest.raises(CheckpointError, match="--arch"):
        load_model(None, path)
    x = random_batch(3)
    assert torch.equal(logits(load_model(ARCH, path), x), logits(pico_model, x))


# ----------------------------------------------------------------------------------------------------------------
# Plain PyTorch state dicts


WRAPPINGS = {
    "plain": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 7, "best_acc": 0.9},
    "model": lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
    "module-prefix": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "model-prefix": lambda sd: {f"model.{k}": v for k, v in sd.items()},
    "state_dict+module-prefix": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
}


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
@pytest.mark.parametrize("wrapping", sorted(WRAPPINGS))
def test_torch_state_dicts_load_wrapped_or_prefixed(tmp_path, pico_model, wrapping, suffix):
    path = _save_pt(tmp_path / f"weights{suffix}", WRAPPINGS[wrapping](pico_model.state_dict()))

    state, meta = read_checkpoint(path)
    assert meta is None
    _assert_same_tensors(state, pico_model.state_dict())

    loaded = load_model(ARCH, path)
    assert loaded.num_classes == 3  # taken from head.weight
    x = random_batch(4)
    assert torch.equal(logits(loaded, x), logits(pico_model, x))


def _broken(sd: dict[str, torch.Tensor], how: str) -> tuple[dict[str, torch.Tensor], str, str]:
    sd = dict(sd)
    if how == "mis-shaped":
        key = "blocks.0.mlp.fc1.weight"
        sd[key] = torch.zeros(5, 32)
    elif how == "missing":
        key = "blocks.1.norm1.weight"
        del sd[key]
    else:
        key = "extra_projection.weight"
        sd[key] = torch.zeros(4, 4)
    return sd, key, how


@pytest.mark.parametrize("how", ["mis-shaped", "missing", "unexpected"])
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_state_dict_that_does_not_fit_names_the_key(tmp_path, pico_model, how, fmt):
    sd, key, label = _broken(pico_model.state_dict(), how)
    if fmt == "pt":
        path = _save_pt(tmp_path / "broken.pt", sd)
        call = lambda: load_model(ARCH, path)  # noqa: E731
    else:
        path = save_checkpoint(tmp_path / "broken.safetensors", sd, model_meta(pico_model))
        call = lambda: load_model(None, path)  # noqa: E731
    with pytest.raises(CheckpointError) as info:
        call()
    message = str(info.value)
    assert key in message
    assert label in message
    assert str(path) in message
    assert "\n" not in message


def test_unreadable_checkpoints_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="folder"):
        read_checkpoint(tmp_path)
    (tmp_path / "weights.h5").write_bytes(b"\x89HDF")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        read_checkpoint(tmp_path / "weights.h5")
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "garbage.safetensors")
    (tmp_path / "garbage.pt").write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "garbage.pt")
    _save_pt(tmp_path / "no_tensors.pt", {"epoch": 3, "name": "x"})
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "no_tensors.pt")
    with pytest.raises(CheckpointError, match="safetensors"):
        save_checkpoint(tmp_path / "out.pt", {"w": torch.zeros(1)}, None)


# ----------------------------------------------------------------------------------------------------------------
# Untrusted pickles


class _OpenPayload:
    """Unpickling this calls ``open(marker, "w")``: creating the marker file proves code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _SystemPayload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("payload", [_OpenPayload, _SystemPayload], ids=["open", "os.system"])
@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_malicious_pickle_is_refused_without_running_code(tmp_path, payload, suffix):
    def evil_file(name: str, marker) -> os.PathLike:
        obj = {"state_dict": {"head.weight": torch.zeros(3, 32)}, "extra": payload(str(marker))}
        return _save_pt(tmp_path / f"{name}{suffix}", obj)

    # The payload is live: an unrestricted torch.load runs it (against a different marker).
    control_marker = tmp_path / "control-marker"
    torch.load(evil_file("control", control_marker), weights_only=False)
    assert control_marker.exists()

    marker = tmp_path / "pwned-marker"
    path = evil_file("evil", marker)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert not marker.exists()
    assert "refused" in str(info.value)
    with pytest.raises(CheckpointError):
        load_model(ARCH, path)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# MAE checkpoints, heads


def _with_mae_decoder(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    extra = {
        "mask_token": torch.randn(1, 1, 16),
        "decoder_embed.weight": torch.randn(16, 32),
        "decoder_embed.bias": torch.randn(16),
        "decoder_pos_embed": torch.randn(1, 65, 16),
        "decoder_blocks.0.norm1.weight": torch.ones(16),
        "decoder_pred.weight": torch.randn(48, 16),
    }
    return {**sd, **extra}


def test_encoder_state_dict_strips_mae_decoder(pico_model):
    sd = pico_model.state_dict()
    stripped = encoder_state_dict(_with_mae_decoder(sd))
    _assert_same_tensors(stripped, sd)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_load_model_ignores_mae_decoder_keys(tmp_path, pico_model, fmt):
    sd = _with_mae_decoder(pico_model.state_dict())
    if fmt == "pt":
        loaded = load_model(ARCH, _save_pt(tmp_path / "mae.pt", {"model": sd}))
    else:
        loaded = load_model(None, save_checkpoint(tmp_path / "mae.safetensors", sd, model_meta(pico_model)))
    x = random_batch(4)
    assert torch.equal(logits(loaded, x), logits(pico_model, x))


def test_num_classes_mismatch_errors_and_reset_head_replaces_it(tmp_path, pico_model):
    path = save_checkpoint(tmp_path / "model.safetensors", pico_model.state_dict(), model_meta(pico_model))
    pt_path = _save_pt(tmp_path / "model.pt", pico_model.state_dict())

    with pytest.raises(CheckpointError, match=r"head\.weight"):
        load_model(None, path, num_classes=5)
    with pytest.raises(CheckpointError, match=r"head\.weight"):
        load_model(ARCH, pt_path, num_classes=5)

    original = pico_model.state_dict()
    for source in (lambda: load_model(None, path, num_classes=5, reset_head=True),
                   lambda: load_model(ARCH, pt_path, num_classes=5, reset_head=True)):
        model = source()
        state = model.state_dict()
        assert model.num_classes == 5
        assert state["head.weight"].shape == (5, 32)
        assert state["head.bias"].shape == (5,)
        assert torch.isfinite(state["head.weight"]).all()
        for key, value in original.items():
            if not key.startswith("head."):
                assert torch.equal(state[key], value), key
        assert logits(model, random_batch(2)).shape == (2, 5)
        meta = model_meta(model)
        assert meta.num_classes == 5
        assert len(meta.class_names) == 5


def test_reset_head_keeps_a_head_that_fits(tmp_path, pico_model):
    path = save_checkpoint(tmp_path / "model.safetensors", pico_model.state_dict(), model_meta(pico_model))
    model = load_model(None, path, reset_head=True)
    _assert_same_tensors(model.state_dict(), pico_model.state_dict())


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes


def _leftovers(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp") or ".tmp" in name)


def test_save_checkpoint_leaves_no_temporary_file(tmp_path, pico_model):
    out = tmp_path / "ckpt"
    save_checkpoint(out / "model.safetensors", pico_model.state_dict(), model_meta(pico_model))
    save_checkpoint(out / "model.safetensors", pico_model.state_dict(), model_meta(pico_model))  # overwrite
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    assert _leftovers(out) == []


def test_failed_save_keeps_the_old_file_and_cleans_up(tmp_path, pico_model, monkeypatch):
    import adaptsoup.core.checkpoint as checkpoint_module

    target = tmp_path / "model.safetensors"
    save_checkpoint(target, pico_model.state_dict(), model_meta(pico_model))
    before = target.read_bytes()

    def torn_write(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", torn_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, {k: v * 0 for k, v in pico_model.state_dict().items()}, None)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_tied_weights_are_saved(tmp_path):
    shared = torch.randn(4, 4)
    path = save_checkpoint(tmp_path / "tied.safetensors", {"a.weight": shared, "b.weight": shared}, None)
    state, _ = read_checkpoint(path)
    assert torch.equal(state["a.weight"], shared) and torch.equal(state["b.weight"], shared)


def test_written_files_follow_the_umask(tmp_path, pico_model):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "model.safetensors", pico_model.state_dict(), None)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_checkpoint_copied_elsewhere_still_loads(tmp_path, pico_model):
    path = save_checkpoint(tmp_path / "a" / "model.safetensors", pico_model.state_dict(), model_meta(pico_model))
    copy = tmp_path / "b" / "renamed.safetensors"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    x = random_batch(2)
    assert torch.equal(logits(load_model(None, copy), x), logits(pico_model, x))
