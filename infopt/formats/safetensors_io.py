"""Checked reading and sharded, deterministic writing of safetensors files."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import BinaryIO, Iterator

import torch

from infopt.errors import InfoptError

INDEX_NAME = "model.safetensors.index.json"
METADATA = {"format": "pt"}
METADATA_FORMATS = ("pt", "tf", "flax", "mlx", "np")


MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit (safetensors/src/tensor.rs, MAX_HEADER_SIZE)


def _corrupt(path: Path, why: str) -> InfoptError:
    return InfoptError(f"corrupt safetensors file {path}: {why}")


def check_safetensors(path: Path) -> dict:
    """Validate a safetensors file's header without reading the data; return the header.

    Checked, as the format requires: a header length within the file and the format's 100 MiB limit, a JSON object
    of tensors with a known dtype, a shape of non-negative integers, offsets inside the data whose length is
    exactly dtype size x elements, tensors that do not overlap, and a string-to-string __metadata__."""
    try:
        size = path.stat().st_size
        handle = open(path, "rb")
    except OSError as exc:
        raise InfoptError(f"cannot read {path}: {exc.strerror or exc.__class__.__name__}") from None
    with handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _corrupt(path, "too short for a header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise _corrupt(path, "header runs past the end (truncated?)")
        if header_len > MAX_HEADER_BYTES:
            raise _corrupt(path, f"header of {header_len} bytes exceeds the format's {MAX_HEADER_BYTES} limit")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise _corrupt(path, "header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not an object")
    data_len = size - 8 - header_len
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in info.items()):
                raise _corrupt(path, "__metadata__ is not a map of strings")
            if info.get("format") not in METADATA_FORMATS:  # transformers refuses these files too
                raise _corrupt(path, f"__metadata__ format {str(info.get('format'))[:20]!r} is not one of "
                                     f"{', '.join(METADATA_FORMATS)}")
            continue
        spans.append(_check_entry(path, name, info, data_len))
    spans.sort()
    position = 0  # the format indexes the whole byte buffer, without holes or overlaps
    for begin, end, name in spans:
        if begin != position:
            raise _corrupt(path, f"tensor {name[:80]!r} starts at {begin}, expected {position} (overlap or hole)")
        position = end
    if position != data_len:
        raise _corrupt(path, f"the tensors cover {position} of the {data_len} data bytes")
    return header


def _check_entry(path: Path, name: str, info, data_len: int) -> tuple[int, int, str]:
    shown = name if len(name) <= 80 else name[:77] + "..."
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _corrupt(path, f"tensor {shown!r} needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPES:
        raise _corrupt(path, f"tensor {shown!r} has unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_count(d) for d in shape):
        raise _corrupt(path, f"tensor {shown!r} has an invalid shape (a list of up to 8 non-negative integers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise _corrupt(path, f"tensor {shown!r} has invalid data_offsets")
    begin, end = offsets
    if not begin <= end <= data_len:
        raise _corrupt(path, f"tensor {shown!r} lies past the end (truncated?)")
    numel = 1
    for dim in shape:
        numel *= dim
    expected = numel * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise _corrupt(path, f"tensor {shown!r} holds {end - begin} bytes, but {dtype} {shape} needs {expected}")
    return begin, end, name


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a folder: those its index names (each confined to the folder), else all."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise InfoptError(f"corrupt index {index}: expected a JSON object with a weight_map") from None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise InfoptError(f"corrupt index {index}: weight_map must map tensor names to shard file names")
        root = model_dir.resolve()
        files = []
        for name in sorted(set(weight_map.values())):
            if "\x00" in name:
                raise InfoptError(f"{index}: shard name {name[:80]!r} holds a NUL byte")
            shard = (model_dir / name).resolve()
            if Path(name).is_absolute() or not shard.is_relative_to(root) or not name.endswith(".safetensors"):
                raise InfoptError(f"{index}: shard {name[:80]!r} is not a .safetensors file inside {model_dir}; "
                                  "refusing to read outside the model folder")
            files.append(model_dir / name)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InfoptError(f"{model_dir}: shards listed in the index are missing: {', '.join(missing)}")
        return files
    return sorted(model_dir.glob("*.safetensors"))


def tensor_names(files: list[Path]) -> dict[str, Path]:
    names: dict[str, Path] = {}
    for path in files:
        for name in check_safetensors(path):
            if name != "__metadata__":
                names[name] = path
    return names


# safetensors dtype names (https://github.com/huggingface/safetensors, format description)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _data_start(path: Path) -> int:
    with open(path, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


def append_file(source: Path, out: BinaryIO) -> None:
    """Append the whole of `source` to the open file `out`: in the kernel where it can (os.copy_file_range, which
    some filesystems do by sharing blocks: 400 MB in 0.1 s here against 2 s through user space), else by reads."""
    out.flush()
    with open(source, "rb") as data:
        remaining = os.fstat(data.fileno()).st_size
        copy = getattr(os, "copy_file_range", None)
        try:
            while copy is not None and remaining > 0:
                done = copy(data.fileno(), out.fileno(), min(remaining, 1 << 30))
                if done <= 0:
                    break
                remaining -= done
        except OSError:  # another filesystem, or no support: copy what is left by reads
            pass
        if remaining > 0:
            data.seek(os.fstat(data.fileno()).st_size - remaining)
            out.seek(0, os.SEEK_END)
            shutil.copyfileobj(data, out, 16 * 2**20)


def iter_tensors(files: list[Path], reuse_buffer: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor, by name within each file, read with plain file reads.

    No memory map: mapped pages of a large shard would count as resident memory of this process
    for as long as the file stays open, which defeats streaming a checkpoint one tensor at a time.

    reuse_buffer: read every tensor into one buffer, so each yielded tensor is valid only until the next one is
    read; for consumers done with a tensor before they take the next (a writer, a check). A fresh buffer per tensor
    costs its page faults: 2.8 GB read into fresh buffers took 1.5 s, into one 0.55 s (2026-12-02).
    """
    headers = [(path, check_safetensors(path)) for path in files]
    shared = None
    if reuse_buffer:
        largest = max((v["data_offsets"][1] - v["data_offsets"][0] for _, header in headers
                       for k, v in header.items() if k != "__metadata__"), default=0)
        shared = torch.empty(largest, dtype=torch.uint8)
    for path, header in headers:
        start = _data_start(path)
        with open(path, "rb") as handle:
            for name in sorted(k for k in header if k != "__metadata__"):
                info = header[name]
                if info["dtype"] not in DTYPES:
                    raise InfoptError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
                begin, end = info["data_offsets"]
                handle.seek(start + begin)
                # not zero-filled: the read fills it
                buffer = torch.empty(end - begin, dtype=torch.uint8) if shared is None else shared[: end - begin]
                if handle.readinto(buffer.numpy()) != end - begin:
                    raise InfoptError(f"{path}: tensor {name} ends past the end of the file")
                yield name, buffer.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def load_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(files))


class ShardedWriter:
    """Writes tensors in the order given into shards of at most `max_shard_bytes`.

    Tensor data goes straight to a spill file as it arrives; when a shard is complete its header is
    written and the data appended, so memory use is one tensor, whatever the checkpoint size.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = 5 * 10**9):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._entries: dict[str, dict] = {}
        self._spill = None
        self._spill_bytes = 0
        self._shards: list[list[str]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def _spill_path(self) -> Path:
        return self.out_dir / f".part-{len(self._shards)}.data"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        if tensor.dtype not in DTYPE_NAMES:
            raise InfoptError(f"cannot store tensor {name} of dtype {tensor.dtype} in safetensors")
        data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        if self._entries and self._spill_bytes + len(data) > self.max_shard_bytes:
            self._flush()
        if self._spill is None:
            self._spill = open(self._spill_path(), "wb")
        self._spill.write(data)
        self._entries[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [self._spill_bytes, self._spill_bytes + len(data)]}
        self._spill_bytes += len(data)
        self._names.add(name)
        self.total_bytes += len(data)

    def _flush(self) -> None:
        spill = self._spill_path()
        if self._spill is None:
            open(spill, "wb").close()
        else:
            self._spill.close()
        header = {"__metadata__": METADATA, **dict(sorted(self._entries.items()))}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data must start 8-byte aligned
        part = self.out_dir / f".part-{len(self._shards)}.safetensors"
        with open(part, "wb") as out:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            append_file(spill, out)
        spill.unlink()
        self._shards.append(sorted(self._entries))
        self._entries, self._spill, self._spill_bytes = {}, None, 0

    def close(self) -> list[str]:
        """Finish the shards, name them as transformers expects, and write the index if sharded."""
        if self._entries or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            (self.out_dir / ".part-0.safetensors").rename(self.out_dir / "model.safetensors")
            return ["model.safetensors"]
        names, weight_map = [], {}
        for i, shard in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.out_dir / f".part-{i}.safetensors").rename(self.out_dir / name)
            names.append(name)
            weight_map.update({tensor: name for tensor in shard})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names + [INDEX_NAME]


def write_items(writer: ShardedWriter, items, kind: type, module_tensors, scheme_of) -> dict:
    """Write every item: tensors as they are, `X.weight` values of `kind` as the format's tensor set.

    `module_tensors(module, value)` gives the format's tensors for one quantized module and
    `scheme_of(value)` what the format's config records for it; returns module -> scheme.
    """
    schemes = {}
    for name, value in items:
        if not isinstance(value, kind):
            writer.add(name, value)
            continue
        module = name.removesuffix(".weight")
        for tensor_name, tensor in module_tensors(module, value).items():
            writer.add(tensor_name, tensor)
        schemes[module] = scheme_of(value)
    return schemes


def parse_size(text: str) -> int:
    # K/M/G alone as gguf-split reads them (decimal: M = 1000 * 1000 bytes)
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1,
             "K": 10**3, "M": 10**6, "G": 10**9}
    upper = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if upper.endswith(unit):
            number = upper[: -len(unit)]
            break
    else:
        number, factor = upper, 1
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise InfoptError(f"invalid size {text!r}: use e.g. 5GB or 500MB") from None
    if value <= 0:
        raise InfoptError(f"invalid size {text!r}: must be positive")
    return value
