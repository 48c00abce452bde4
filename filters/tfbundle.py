"""Read a TensorFlow checkpoint (the `variables/` of a SavedModel) without TensorFlow.

A checkpoint is a "tensor bundle": `variables.index`, a LevelDB-style sorted table mapping each variable's
name to a `BundleEntryProto` (dtype, shape, offset and size in the data file), and
`variables.data-00000-of-00001`, the raw bytes. Only what published Keras heads use is read: uncompressed
tables, one data shard, float/int/string tensors. Anything else raises `BundleError` naming what it found.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER = 5  # compression type byte + crc32c
DTYPES = {
    1: np.float32,
    2: np.float64,
    3: np.int32,
    4: np.uint8,
    5: np.int16,
    6: np.int8,
    9: np.int64,
    10: np.bool_,
    19: np.float16,
}
DT_STRING = 7


class BundleError(ValueError):
    """The files are not a checkpoint this reader understands."""


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """A protobuf/LevelDB base-128 varint at `pos`: (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise BundleError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def proto_fields(data: bytes) -> Iterator[tuple[int, int, object]]:
    """The fields of one protobuf message, in order: (field number, wire type, value). Length-delimited
    values are bytes (a sub-message, a string or a packed array: the caller knows which)."""
    pos = 0
    while pos < len(data):
        tag, pos = read_varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = read_varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise BundleError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) entries of one table block: keys share prefixes with the entry before."""
    restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * restarts
    pos, key = 0, b""
    while pos < end:
        shared, pos = read_varint(block, pos)
        unshared, pos = read_varint(block, pos)
        size, pos = read_varint(block, pos)
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + size]
        pos += size


def _block(data: bytes, handle: bytes) -> bytes:
    offset, pos = read_varint(handle, 0)
    size, _ = read_varint(handle, pos)
    if data[offset + size] != 0:
        raise BundleError("compressed table blocks are not supported")
    return data[offset : offset + size]


def read_table(path: Path) -> dict[bytes, bytes]:
    """Every (key, value) of a LevelDB-format table file."""
    data = Path(path).read_bytes()
    if len(data) < FOOTER_SIZE or struct.unpack_from("<Q", data, len(data) - 8)[0] != TABLE_MAGIC:
        raise BundleError(f"{path}: not a TensorFlow checkpoint index (no table magic)")
    footer = data[-FOOTER_SIZE:]
    _, pos = read_varint(footer, 0)  # metaindex offset
    _, pos = read_varint(footer, pos)  # metaindex size
    index = _block(data, footer[pos:])
    table = {}
    for _, handle in _block_entries(index):
        table.update(_block_entries(_block(data, handle)))
    return table


def _entry(value: bytes) -> dict:
    entry = {"dtype": 0, "shape": [], "shard": 0, "offset": 0, "size": 0}
    for number, _, field in proto_fields(value):
        if number == 1:
            entry["dtype"] = field
        elif number == 2:
            entry["shape"] = [
                next((v for n, _, v in proto_fields(dim) if n == 1), 0)
                for n, _, dim in proto_fields(field)
                if n == 2
            ]
        elif number == 3:
            entry["shard"] = field
        elif number == 4:
            entry["offset"] = field
        elif number == 5:
            entry["size"] = field
        elif number == 7:
            raise BundleError("sliced (partitioned) variables are not supported")
    return entry


def _decode(raw: bytes, entry: dict, name: str):
    if any(not isinstance(d, int) or d < 0 for d in entry["shape"]):
        raise BundleError(f"variable {name}: shape {entry['shape'][:8]} is not a list of sizes")
    count = math.prod(entry["shape"])
    if entry["dtype"] == DT_STRING:  # varint lengths, a 4-byte checksum, then the bytes
        lengths, pos = [], 0
        for _ in range(count):
            length, pos = read_varint(raw, pos)
            lengths.append(length)
        pos += 4
        strings = []
        for length in lengths:
            strings.append(raw[pos : pos + length])
            pos += length
        return np.array(strings, dtype=object).reshape(entry["shape"])
    if entry["dtype"] not in DTYPES:
        raise BundleError(f"variable {name}: unsupported dtype enum {entry['dtype']}")
    dtype = np.dtype(DTYPES[entry["dtype"]]).newbyteorder("<")
    if count * dtype.itemsize != len(raw):
        raise BundleError(
            f"variable {name}: shape {entry['shape'][:8]} of {dtype.name} does not fit the {len(raw)} bytes "
            f"the data shard holds for it"
        )
    value = np.frombuffer(raw, dtype=dtype, count=count).reshape(entry["shape"])
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise BundleError(f"variable {name}: holds NaN or infinite values; a usable head has finite weights")
    return value


def read_checkpoint(variables_dir: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint in `variables_dir` (a SavedModel's `variables/`), by name."""
    folder = Path(variables_dir)
    index = folder / "variables.index"
    if not index.exists():
        raise BundleError(f"{folder}: no variables.index")
    table = read_table(index)
    data_files: dict[int, bytes] = {}
    tensors = {}
    for key, value in table.items():
        if not key:  # the header entry (BundleHeaderProto)
            continue
        name = key.decode("utf-8")
        entry = _entry(value)
        if entry["shard"] not in data_files:
            shards = sorted(folder.glob("variables.data-*"))
            if entry["shard"] >= len(shards):
                raise BundleError(
                    f"{folder}: variable {name} is in data shard {entry['shard']}, which is missing"
                )
            data_files[entry["shard"]] = shards[entry["shard"]].read_bytes()
        raw = data_files[entry["shard"]][entry["offset"] : entry["offset"] + entry["size"]]
        if name == "_CHECKPOINTABLE_OBJECT_GRAPH":
            continue
        tensors[name] = _decode(raw, entry, name)
    return tensors
