"""Checkpoints read one tensor at a time, so that mixing holds the result and not every ingredient.

:func:`open_tensors` gives a :class:`TensorFile`: its keys, shapes and dtypes (from the header alone), its
metadata, and ``read(key)`` / ``read_into(key, out)`` of one tensor.  A safetensors file is read with plain
positioned reads, not a memory map: a mapped file's pages stay in the process's resident set once touched,
so reading M mapped ingredients tensor by tensor would still end with all M of them resident.  ``read_into``
fills a preallocated tensor (a slot of a stack) without an intermediate copy when the dtypes agree.

Other sources (``.pt``/``.pth`` state dicts, timm folders, ``hf-hub:``) are read whole through
:func:`adaptsoup.core.checkpoint.read_checkpoint` and served from memory.  Keys are normalised exactly as
``read_checkpoint`` does (``module.``/``model.`` prefixes stripped).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterator

import torch

from adaptsoup.core.checkpoint import META_KEY, SAFETENSORS_SUFFIXES, CheckpointMeta, normalised_keys, read_checkpoint
from adaptsoup.core.sources import resolve_model_source
from adaptsoup.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100_000_000


class TensorFile:
    """A checkpoint's tensors, read on demand.  Use as a context manager (it may hold an open file)."""

    def __init__(self, templates: dict[str, torch.Tensor], meta: CheckpointMeta | None, name: str) -> None:
        self.templates = templates  # key -> data-less ``meta`` tensor with the stored shape and dtype
        self.meta = meta
        self.name = name

    def keys(self) -> list[str]:
        return list(self.templates)

    def read(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Copy tensor ``key`` into ``out`` (same shape; cast to ``out``'s dtype)."""
        out.copy_(self.read(key))

    def close(self) -> None:
        pass

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InMemoryTensors(TensorFile):
    """A state dict already in memory (the sources that cannot be read tensor by tensor)."""

    def __init__(self, state: dict[str, torch.Tensor], meta: CheckpointMeta | None, name: str) -> None:
        super().__init__({k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}, meta, name)
        self.state = state

    def read(self, key: str) -> torch.Tensor:
        return self.state[key]

    def close(self) -> None:
        self.state = {}


class SafetensorsTensors(TensorFile):
    """A safetensors file: the header parsed once, each tensor read from its byte range on request."""

    def __init__(self, path: Path) -> None:
        self.handle = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            header, self.data_start = _read_header(self.handle, path)
            metadata = header.pop("__metadata__", None) or {}
            meta = CheckpointMeta.from_json(metadata[META_KEY]) if META_KEY in metadata else None
            self.entries = {new: header[old] for new, old in normalised_keys(list(header)).items()}
            templates = {k: torch.empty(e["shape"], dtype=_dtype(e, path), device="meta") for k, e in self.entries.items()}
        except BaseException:
            self.handle.close()
            raise
        super().__init__(templates, meta, path.name)

    def read(self, key: str) -> torch.Tensor:
        template = self.templates[key]
        out = torch.empty(template.shape, dtype=template.dtype)
        self._fill(key, out)
        return out

    def read_into(self, key: str, out: torch.Tensor) -> None:
        if out.dtype == self.templates[key].dtype and out.is_contiguous() and out.device.type == "cpu":
            self._fill(key, out)
        else:
            out.copy_(self.read(key))

    def _fill(self, key: str, out: torch.Tensor) -> None:
        begin, end = self.entries[key]["data_offsets"]
        if end - begin != out.numel() * out.element_size():
            raise CheckpointError(f"{self.name}: tensor {key!r} has {end - begin} bytes for shape {tuple(out.shape)}")
        if out.numel() == 0:
            return
        self.handle.seek(self.data_start + begin)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        if self.handle.readinto(view) != end - begin:
            raise CheckpointError(f"{self.name}: truncated file (tensor {key!r})")

    def close(self) -> None:
        self.handle.close()


def open_tensors(path: str | os.PathLike) -> TensorFile:
    """The checkpoint at ``path`` (any model source) as a :class:`TensorFile`."""
    resolved = resolve_model_source(path)
    if resolved.is_file() and resolved.suffix in SAFETENSORS_SUFFIXES and sys.byteorder == "little":
        try:
            return SafetensorsTensors(resolved)
        except _UnsupportedDtype:
            pass  # e.g. float8 entries: safetensors' own reader knows them
    state, meta = read_checkpoint(path)
    return InMemoryTensors(state, meta, Path(resolved).name)


def iter_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` of a checkpoint, one tensor in memory at a time (for safetensors files)."""
    with open_tensors(path) as tensors:
        for key in tensors.keys():
            yield key, tensors.read(key)


def _read_header(handle, path: Path) -> tuple[dict, int]:
    """The JSON header of an open safetensors file and the offset where its data start."""
    try:
        size = int.from_bytes(handle.read(8), "little")
        if not 2 <= size <= min(path.stat().st_size - 8, MAX_HEADER_BYTES):
            raise ValueError("bad header length")
        header = json.loads(handle.read(size))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {type(exc).__name__}: {str(exc)[:120]}") from None
    return header, 8 + size


class _UnsupportedDtype(Exception):
    """A dtype this reader does not map (the whole-file reader is used instead)."""


def _dtype(entry: dict, path: Path) -> torch.dtype:
    if not isinstance(entry, dict) or "dtype" not in entry or "shape" not in entry or "data_offsets" not in entry:
        raise CheckpointError(f"cannot read {path} as safetensors: bad header entry {str(entry)[:80]}")
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise _UnsupportedDtype(entry["dtype"])
    return SAFETENSORS_DTYPES[entry["dtype"]]
