"""The GGUF container: a header of typed key/value metadata and tensor descriptions, then aligned tensor data.

Layout (ggml's `gguf.h` and docs/gguf.md, version 3, little-endian): magic "GGUF", u32 version, u64 tensor count,
u64 key/value count; each key a string (u64 length + UTF-8 bytes), a u32 value type and the value; each tensor its
name, u32 dimension count, u64 sizes innermost first, u32 ggml type and u64 offset into the data section, which
starts at the next multiple of `general.alignment` (32 by default). Every field read is checked against the file
before it is used: sizes, counts, types, offsets, overlaps.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from infopt.errors import InfoptError
from infopt.formats.ggml_quants import BY_ID, TYPES
from infopt.formats.safetensors_io import append_file

MAGIC = b"GGUF"
VERSION = 3
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_STRING = 64 << 20  # one metadata string (a chat template, an embedded tokenizer.json) is at most 64 MiB


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR = {ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H", ValueType.INT16: "<h",
           ValueType.UINT32: "<I", ValueType.INT32: "<i", ValueType.FLOAT32: "<f", ValueType.BOOL: "<?",
           ValueType.UINT64: "<Q", ValueType.INT64: "<q", ValueType.FLOAT64: "<d"}
_NUMPY = {ValueType.UINT8: "<u1", ValueType.INT8: "<i1", ValueType.UINT16: "<u2", ValueType.INT16: "<i2",
          ValueType.UINT32: "<u4", ValueType.INT32: "<i4", ValueType.FLOAT32: "<f4", ValueType.UINT64: "<u8",
          ValueType.INT64: "<i8", ValueType.FLOAT64: "<f8"}


@dataclass(frozen=True)
class Typed:
    """A metadata value with its GGUF type (arrays: `element` is the element type)."""

    type: ValueType
    value: Any
    element: ValueType | None = None


def u32(v: int) -> Typed:
    return Typed(ValueType.UINT32, int(v))


def f32(v: float) -> Typed:
    return Typed(ValueType.FLOAT32, float(v))


def string(v: str) -> Typed:
    return Typed(ValueType.STRING, str(v))


def boolean(v: bool) -> Typed:
    return Typed(ValueType.BOOL, bool(v))


def array(element: ValueType, values) -> Typed:
    return Typed(ValueType.ARRAY, list(values), element)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: outermost first ([rows, cols] for a matrix)
    type: str  # ggml type name
    offset: int  # from the start of the data section
    nbytes: int
    shard: int = 0  # which file of a split model holds it (GGUFFile.shards)


# --- writing -------------------------------------------------------------------------------------------------


def _string_bytes(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value_bytes(value: Typed) -> bytes:
    if value.type == ValueType.STRING:
        return _string_bytes(value.value)
    if value.type == ValueType.ARRAY:
        element = value.element
        head = struct.pack("<IQ", int(element), len(value.value))
        if element == ValueType.STRING:
            return head + b"".join(_string_bytes(v) for v in value.value)
        if element == ValueType.BOOL:
            return head + bytes(bool(v) for v in value.value)
        return head + np.asarray(value.value, dtype=_NUMPY[element]).tobytes()
    return struct.pack(_SCALAR[value.type], value.value)


def u16(v: int) -> Typed:
    return Typed(ValueType.UINT16, int(v))


def i32(v: int) -> Typed:
    return Typed(ValueType.INT32, int(v))


# llama.cpp's split files (gguf-split; src/llama.cpp llama_split_path and llama-model-loader.cpp): shard k of n is
# PREFIX-{k:05d}-of-{n:05d}.gguf, k from 1; every shard is a whole GGUF file holding some of the tensors, with the
# keys split.no (u16, from 0), split.count (u16) and split.tensors.count (i32, the tensors of all shards); the first
# shard holds all the other metadata, and llama.cpp loads the model from it.
SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"
SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_name(prefix: str, index: int, count: int) -> str:
    """The file name of shard `index` (from 0) of `count`."""
    return f"{prefix}-{index + 1:05d}-of-{count:05d}.gguf"


@dataclass
class _Shard:
    staging_path: Path
    staging: BinaryIO
    tensors: list[TensorInfo]


class GGUFWriter:
    """Streams tensors into a staging file beside the target, then writes header + data in one pass on close.
    Peak memory is one tensor. With max_shard_bytes, the tensors go into llama.cpp's split files instead
    (TARGET-00001-of-0000N.gguf beside the target, with TARGET the target's name less ".gguf"): a shard is closed
    when the next tensor's data would take it past max_shard_bytes (a soft limit, counting tensor data as
    gguf-split does; a larger tensor gets a shard of its own)."""

    def __init__(self, path: Path, alignment: int = DEFAULT_ALIGNMENT, max_shard_bytes: int | None = None):
        self.path = path
        self.alignment = alignment
        self.max_shard_bytes = max_shard_bytes
        self.metadata: dict[str, Typed] = {}
        self._shards: list[_Shard] = []
        self._names: set[str] = set()
        self.paths: list[Path] = []  # the files written, once closed
        self._open_shard()

    @property
    def tensors(self) -> list[TensorInfo]:
        return [info for shard in self._shards for info in shard.tensors]

    def _open_shard(self) -> None:
        staging_path = self.path.with_name(f"{self.path.name}.{len(self._shards)}.data")
        self._shards.append(_Shard(staging_path, open(staging_path, "wb"), []))

    def add(self, key: str, value: Typed) -> None:
        self.metadata[key] = value

    def add_tensor(self, name: str, shape: tuple[int, ...], type_name: str, data: torch.Tensor) -> None:
        if name in self._names:
            raise InfoptError(f"GGUF tensor {name} written twice")
        self._names.add(name)
        raw = memoryview(data.contiguous().view(torch.uint8).numpy().reshape(-1))  # written as it is, no copy
        padded = len(raw) + (-len(raw) % self.alignment)
        shard = self._shards[-1]
        if (self.max_shard_bytes is not None and shard.tensors
                and shard.staging.tell() + padded > self.max_shard_bytes):
            if len(self._shards) == 0xFFFF:  # split.count is a u16
                raise InfoptError(f"a split of at most {self.max_shard_bytes} bytes a file needs more than 65535 "
                                  "files; give a larger --split-max-size")
            self._open_shard()
            shard = self._shards[-1]
        offset = shard.staging.tell()
        shard.staging.write(raw)
        shard.staging.write(b"\0" * (padded - len(raw)))
        shard.tensors.append(TensorInfo(name, tuple(int(s) for s in shape), type_name, offset, len(raw)))

    def _header(self, metadata: dict[str, Typed], tensors: list[TensorInfo]) -> bytes:
        header = bytearray(MAGIC + struct.pack("<IQQ", VERSION, len(tensors), len(metadata)))
        for key, value in metadata.items():
            header += _string_bytes(key) + struct.pack("<I", int(value.type)) + _value_bytes(value)
        for info in tensors:
            dims = tuple(reversed(info.shape))  # GGUF lists the innermost dimension first
            header += _string_bytes(info.name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
            header += struct.pack("<IQ", TYPES[info.type].id, info.offset)
        header += b"\0" * (-len(header) % self.alignment)
        return bytes(header)

    def close(self) -> None:
        for shard in self._shards:
            shard.staging.close()
        if self.alignment != DEFAULT_ALIGNMENT:
            self.metadata["general.alignment"] = u32(self.alignment)
        count = len(self._shards)
        if self.max_shard_bytes is None:
            outputs = [(self.path, self.metadata)]
        else:
            prefix = self.path.name.removesuffix(".gguf")
            split = {SPLIT_COUNT: u16(count), SPLIT_TENSORS: i32(len(self.tensors))}
            # later shards: the split keys, the alignment, and who wrote them (--force checks every file it replaces)
            rest = {k: v for k, v in self.metadata.items() if k in ("general.alignment", "general.quantized_by")}
            outputs = [(self.path.with_name(split_name(prefix, i, count)),
                        {**(self.metadata if i == 0 else rest), SPLIT_NO: u16(i), **split}) for i in range(count)]
        for (path, metadata), shard in zip(outputs, self._shards):
            with open(path, "wb") as out:
                out.write(self._header(metadata, shard.tensors))
                append_file(shard.staging_path, out)
                out.flush()
                os.fsync(out.fileno())
            shard.staging_path.unlink()
            self.paths.append(path)

    def abort(self) -> None:
        for shard in self._shards:
            shard.staging.close()
            shard.staging_path.unlink(missing_ok=True)


# --- reading -------------------------------------------------------------------------------------------------


class _Cursor:
    def __init__(self, data: memoryview, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def fail(self, what: str) -> InfoptError:
        return InfoptError(f"{self.path}: not a valid GGUF file ({what} at byte {self.pos})")

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"{n} bytes needed, the file ends")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self, limit: int = MAX_STRING) -> str:
        n = self.unpack("<Q")
        if n > limit or n > len(self.data) - self.pos:
            raise self.fail(f"a string of {n} bytes")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("a string that is not UTF-8") from None

    def value(self, type_id: int, depth: int = 0):
        try:
            vtype = ValueType(type_id)
        except ValueError:
            raise self.fail(f"unknown value type {type_id}") from None
        if vtype == ValueType.STRING:
            return self.string()
        if vtype == ValueType.ARRAY:
            element, count = self.unpack("<I"), self.unpack("<Q")
            if depth > 0:
                raise self.fail("an array nested in an array")
            try:
                etype = ValueType(element)
            except ValueError:
                raise self.fail(f"unknown array element type {element}") from None
            if etype in _NUMPY:
                width = np.dtype(_NUMPY[etype]).itemsize
                if count > (len(self.data) - self.pos) // width:
                    raise self.fail(f"an array of {count} values")
                return np.frombuffer(self.take(count * width), dtype=_NUMPY[etype]).tolist()
            if count > (len(self.data) - self.pos) // (1 if etype == ValueType.BOOL else 8):
                raise self.fail(f"an array of {count} values")
            return [self.value(element, depth + 1) for _ in range(count)]
        if vtype == ValueType.BOOL:
            raw = self.unpack("<B")
            if raw > 1:
                raise self.fail(f"a boolean of value {raw}")
            return bool(raw)
        return self.unpack(_SCALAR[vtype])


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_offset: int
    shards: list[tuple[Path, int]] | None = None  # a split model: each file and the start of its data section

    @property
    def paths(self) -> list[Path]:
        """Every file of the model (the shards of a split model, in order)."""
        return [path for path, _ in self.shards] if self.shards else [self.path]

    def tensor_bytes(self, info: TensorInfo) -> torch.Tensor:
        """The raw bytes of one tensor (uint8)."""
        path, data_offset = self.shards[info.shard] if self.shards else (self.path, self.data_offset)
        with open(path, "rb") as handle:
            handle.seek(data_offset + info.offset)
            raw = handle.read(info.nbytes)
        if len(raw) != info.nbytes:
            raise InfoptError(f"{path}: tensor {info.name} is cut short (the file changed while read)")
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def read_header(path: Path) -> GGUFFile:
    """Parse and check a GGUF model's header: one file, or, from the first shard of a split model, every shard
    (the first's metadata, all shards' tensors). Tensor data is read later, on demand."""
    first = read_file_header(path)
    count = first.metadata.get(SPLIT_COUNT)
    if count is None:
        return first
    number = first.metadata.get(SPLIT_NO)
    total = first.metadata.get(SPLIT_TENSORS)
    for key, value in ((SPLIT_COUNT, count), (SPLIT_NO, number), (SPLIT_TENSORS, total)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InfoptError(f"{path}: a split GGUF file needs an integer {key}, it has {value!r}")
    if number != 0:
        prefix = _split_prefix(path)
        first_name = split_name(prefix, 0, count) if prefix else "its first shard"
        raise InfoptError(f"{path} is shard {number + 1} of {count} of a split model; open its first shard, "
                          f"{first_name}")
    if count < 1:
        raise InfoptError(f"{path}: split.count is 0")
    if count == 1:
        return _check_split_total(first, total)
    prefix = _split_prefix(path, count)
    if prefix is None:
        raise InfoptError(f"{path}: the first shard of a {count}-file split model is named PREFIX-00001-of-"
                          f"{count:05d}.gguf, which is how llama.cpp and infopt find the others")
    shards, tensors = [(first.path, first.data_offset)], dict(first.tensors)
    for index in range(1, count):
        shard_path = path.with_name(split_name(prefix, index, count))
        if not shard_path.is_file():
            raise InfoptError(f"{path}: shard {index + 1} of {count}, {shard_path.name}, is missing")
        shard = read_file_header(shard_path)
        if (shard.metadata.get(SPLIT_NO), shard.metadata.get(SPLIT_COUNT)) != (index, count):
            raise InfoptError(f"{shard_path}: its split.no / split.count say shard "
                              f"{shard.metadata.get(SPLIT_NO)!r} of {shard.metadata.get(SPLIT_COUNT)!r}, "
                              f"not {index} of {count}")
        for name, info in shard.tensors.items():
            if name in tensors:
                raise InfoptError(f"{shard_path}: tensor {name[:60]!r} is in two shards")
            tensors[name] = dataclasses.replace(info, shard=index)
        shards.append((shard.path, shard.data_offset))
    merged = GGUFFile(first.path, first.version, first.metadata, tensors, first.data_offset, shards)
    return _check_split_total(merged, total)


def _split_prefix(path: Path, count: int | None = None) -> str | None:
    match = SPLIT_NAME.match(path.name)
    if match is None or (count is not None and (int(match["no"]), int(match["count"])) != (1, count)):
        return None
    return match["prefix"]


def _check_split_total(model: GGUFFile, total: int) -> GGUFFile:
    if total != len(model.tensors):
        raise InfoptError(f"{model.path}: split.tensors.count says {total} tensors, the shards hold "
                          f"{len(model.tensors)}")
    return model


def read_file_header(path: Path) -> GGUFFile:
    """Parse and check one GGUF file's header (a split model's shard on its own)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(4)
            if head != MAGIC:
                raise InfoptError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
            mapped = np.memmap(path, dtype=np.uint8, mode="r") if size else None
    except OSError as exc:
        raise InfoptError(f"cannot read {path}: {exc.strerror}") from None
    cursor = _Cursor(memoryview(mapped), path)
    cursor.take(4)
    version = cursor.unpack("<I")
    if version not in (2, 3):
        raise cursor.fail(f"version {version} (readable: 2 and 3)")
    n_tensors, n_kv = cursor.unpack("<Q"), cursor.unpack("<Q")
    if n_tensors > size // 32 or n_kv > size // 12:
        raise cursor.fail(f"{n_tensors} tensors and {n_kv} keys in {size} bytes")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cursor.string(limit=65535)
        if key in metadata:
            raise cursor.fail(f"key {key[:60]!r} given twice")
        metadata[key] = cursor.value(cursor.unpack("<I"))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1 or alignment > 1 << 16 \
            or alignment & (alignment - 1):
        raise cursor.fail(f"general.alignment {alignment!r} (a power of two up to 65536)")
    raw_infos = []
    for _ in range(n_tensors):
        name = cursor.string(limit=65535)
        n_dims = cursor.unpack("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cursor.fail(f"tensor {name[:60]!r} with {n_dims} dimensions")
        dims = [cursor.unpack("<Q") for _ in range(n_dims)]
        type_id, offset = cursor.unpack("<I"), cursor.unpack("<Q")
        raw_infos.append((name, dims, type_id, offset))
    data_offset = cursor.pos + (-cursor.pos % alignment)
    tensors: dict[str, TensorInfo] = {}
    for name, dims, type_id, offset in raw_infos:
        if name in tensors:
            raise InfoptError(f"{path}: tensor {name[:60]!r} is listed twice")
        if type_id not in BY_ID:
            raise InfoptError(f"{path}: tensor {name[:60]!r} has ggml type {type_id}, which infopt does not read "
                              f"(readable: {', '.join(TYPES)})")
        t = BY_ID[type_id]
        count = 1
        for d in dims:
            if d < 1 or d > 1 << 40:
                raise InfoptError(f"{path}: tensor {name[:60]!r} has a dimension of {d}")
            count *= d
        if count > size * 8 or dims[0] % t.block:
            raise InfoptError(f"{path}: tensor {name[:60]!r} of shape {dims} does not fit type {t.name}")
        nbytes = count // t.block * t.nbytes
        if offset % alignment or data_offset + offset + nbytes > size:
            raise InfoptError(f"{path}: tensor {name[:60]!r} lies outside the file or off its alignment "
                              f"(offset {offset}, {nbytes} bytes, file {size} bytes)")
        tensors[name] = TensorInfo(name, tuple(reversed(dims)), t.name, offset, nbytes)
    # the tensors tile the data section: each starts where the one before ends (rounded up to the alignment), and
    # the last ends the file (padding at most), so no byte of the file goes unaccounted for
    spans = sorted((i.offset, i.offset + i.nbytes, i.name) for i in tensors.values())
    expected_start = 0
    for start, end, name in spans:
        if start != expected_start:
            raise InfoptError(f"{path}: tensor {name[:60]!r} starts at {start} of the data section, not at "
                              f"{expected_start} where the one before it ends (overlap or unaccounted bytes)")
        expected_start = end + (-end % alignment)
    data_size = size - data_offset
    if spans and not spans[-1][1] <= data_size <= expected_start:
        raise InfoptError(f"{path}: {data_size} bytes of tensor data, the tensors account for {spans[-1][1]}")
    del cursor, mapped
    return GGUFFile(path, version, metadata, tensors, data_offset)


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == MAGIC
    except OSError:
        return False
