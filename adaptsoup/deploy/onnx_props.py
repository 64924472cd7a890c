"""An ONNX file's metadata properties, read straight from the protobuf wire format.

An ONNX file is one serialised ``ModelProto``.  Its top-level fields are few (``ir_version``, the opsets, the
producer, ``graph``, ``metadata_props`` ...), and the graph, which holds the weights, is one length-prefixed
field that can be skipped with a seek.  So the ``metadata_props`` of a ViT-B file (330 MB) are read in well
under a millisecond, where an onnxruntime session takes seconds and ``onnx.load`` parses every weight.

Only the top level is checked (valid field tags and lengths, an ``ir_version`` and a ``graph``); a graph that
is corrupt inside is found when onnxruntime loads the model.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

from adaptsoup.errors import AdaptsoupError

# ModelProto field numbers (onnx/onnx.proto) and the wire types they must have: 0 varint, 2 length-delimited.
IR_VERSION, GRAPH, METADATA_PROPS = 1, 7, 14
KNOWN_WIRE_TYPES = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
MAX_METADATA_BYTES = 64 * 2**20  # one metadata entry larger than this is taken for garbage


class _Malformed(Exception):
    pass


def read_metadata_props(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of the ONNX model at ``path`` (key -> value), without parsing its graph.

    Raises :class:`AdaptsoupError` (one line) for a file that is empty, truncated or not an ONNX model.
    """
    try:
        with open(path, "rb") as handle:
            return _model_props(handle, os.fstat(handle.fileno()).st_size)
    except _Malformed as exc:
        raise AdaptsoupError(f"cannot load ONNX model {path} (garbage, truncated or empty?): {exc}") from None


def _model_props(handle: BinaryIO, size: int) -> dict[str, str]:
    if size == 0:
        raise _Malformed("empty file")
    props: dict[str, str] = {}
    seen: set[int] = set()
    while handle.tell() < size:
        field, wire = _tag(handle)
        if KNOWN_WIRE_TYPES.get(field, wire) != wire:
            raise _Malformed(f"ModelProto field {field} has wire type {wire}")
        seen.add(field)
        if wire == 0:
            _varint(handle)
        elif wire in (1, 5):
            _skip(handle, 8 if wire == 1 else 4, size)
        elif field == METADATA_PROPS:
            key, value = _entry(_read(handle, _length(handle, size, MAX_METADATA_BYTES)))
            props[key] = value
        else:
            _skip(handle, _length(handle, size), size)
    if not {IR_VERSION, GRAPH} <= seen:
        raise _Malformed("no ir_version or no graph: not an ONNX model")
    return props


def _entry(data: bytes) -> tuple[str, str]:
    """A ``StringStringEntryProto``: field 1 the key, field 2 the value (both UTF-8)."""
    text = {1: "", 2: ""}
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        field, wire = _tag(stream)
        if field not in text or wire != 2:
            raise _Malformed(f"metadata entry field {field} has wire type {wire}")
        try:
            text[field] = _read(stream, _length(stream, len(data))).decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed("metadata that is not UTF-8") from None
    return text[1], text[2]


def _tag(handle: BinaryIO) -> tuple[int, int]:
    tag = _varint(handle)
    field, wire = tag >> 3, tag & 7
    if field == 0 or wire not in (0, 1, 2, 5):  # 3 and 4 (groups) are not used by ONNX; 6 and 7 do not exist
        raise _Malformed(f"invalid protobuf tag {tag}")
    return field, wire


def _varint(handle: BinaryIO) -> int:
    value = 0
    for shift in range(0, 70, 7):
        byte = handle.read(1)
        if not byte:
            raise _Malformed("ends inside a field")
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
    raise _Malformed("a varint longer than 10 bytes")


def _length(handle: BinaryIO, size: int, limit: int | None = None) -> int:
    """A length prefix that fits in what is left of the file (and under ``limit``)."""
    length = _varint(handle)
    if length > size - handle.tell():
        raise _Malformed(f"a field of {length:,} bytes where {size - handle.tell():,} are left")
    if limit is not None and length > limit:
        raise _Malformed(f"a metadata entry of {length:,} bytes")
    return length


def _read(handle: BinaryIO, length: int) -> bytes:
    data = handle.read(length)
    if len(data) != length:
        raise _Malformed("ends inside a field")
    return data


def _skip(handle: BinaryIO, length: int, size: int) -> None:
    if length > size - handle.tell():
        raise _Malformed("ends inside a field")
    handle.seek(length, os.SEEK_CUR)
