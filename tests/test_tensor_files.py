"""Checkpoints read one tensor at a time (adaptsoup.core.tensor_files) give exactly what the whole-file reader gives."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from adaptsoup.core.checkpoint import read_checkpoint, save_checkpoint
from adaptsoup.core.tensor_files import InMemoryTensors, SafetensorsTensors, iter_tensors, open_tensors
from adaptsoup.errors import CheckpointError


def _zoo() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "module.w": torch.randn(3, 5, generator=gen),
        "module.half": torch.randn(7, generator=gen).to(torch.bfloat16),
        "module.f16": torch.randn(2, 2, generator=gen).half(),
        "module.f64": torch.randn(4, generator=gen).double(),
        "module.index": torch.arange(6),
        "module.mask": torch.tensor([True, False, True]),
        "module.scalar": torch.tensor(2.5),
        "module.empty": torch.zeros(0, 4),
    }


def test_tensor_by_tensor_equals_the_whole_file(tmp_path):
    path = tmp_path / "zoo.safetensors"
    save_file(_zoo(), str(path))
    whole, _ = read_checkpoint(path)
    with open_tensors(path) as tensors:
        assert isinstance(tensors, SafetensorsTensors)
        assert tensors.keys() == list(whole) and "w" in whole  # the "module." prefix stripped as read_checkpoint does
        for key, want in whole.items():
            got = tensors.read(key)
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), key
            assert tensors.templates[key].device.type == "meta" and tensors.templates[key].shape == want.shape
        slot = torch.empty(7)  # a float32 slot filled from a bf16 tensor: cast on the way
        tensors.read_into("half", slot)
        assert torch.equal(slot, whole["half"].float())
        stack = torch.zeros(2, 3, 5)
        tensors.read_into("w", stack[1])  # straight into a slot of a stack
        assert torch.equal(stack[1], whole["w"]) and stack[0].abs().sum() == 0
    assert [k for k, _ in iter_tensors(path)] == list(whole)


def test_metadata_and_other_formats(tmp_path):
    from tests.helpers import tiny_model
    from adaptsoup.core.models import model_meta

    model = tiny_model()
    path = save_checkpoint(tmp_path / "m.safetensors", model.state_dict(), model_meta(model))
    with open_tensors(path) as tensors:
        assert tensors.meta is not None and tensors.meta.arch == model_meta(model).arch
    pt = tmp_path / "m.pt"
    torch.save({"state_dict": model.state_dict()}, pt)
    with open_tensors(pt) as tensors:
        assert isinstance(tensors, InMemoryTensors)
        assert torch.equal(tensors.read("head.weight"), model.state_dict()["head.weight"])


def test_truncated_and_garbage_files_are_one_line_errors(tmp_path):
    path = tmp_path / "zoo.safetensors"
    save_file(_zoo(), str(path))
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-20])
    with open_tensors(cut) as tensors, pytest.raises(CheckpointError, match="truncated"):
        for key in tensors.keys():
            tensors.read(key)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="cannot read"):
        open_tensors(garbage)
