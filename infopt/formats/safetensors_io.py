"""Checked reading and sharded, deterministic writing of safetensors files."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Iterator

import torch

from infopt.errors import InfoptError

INDEX_NAME = "model.safetensors.index.json"
METADATA = {"format": "pt"}


def check_safetensors(path: Path) -> dict:
    """Validate a safetensors header without reading the data; return the header."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise InfoptError(f"corrupt safetensors file {path}: too short for a header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise InfoptError(f"corrupt safetensors file {path}: header runs past the end (truncated?)")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InfoptError(f"corrupt safetensors file {path}: header is not valid JSON") from None
    if not isinstance(header, dict):
        raise InfoptError(f"corrupt safetensors file {path}: header is not an object")
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not offsets or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1] <= data_len:
            raise InfoptError(f"corrupt safetensors file {path}: tensor {name!r} lies past the end (truncated?)")
    return header


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise InfoptError(f"corrupt index {index}") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
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


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor, by name within each file, read with plain file reads.

    No memory map: mapped pages of a large shard would count as resident memory of this process
    for as long as the file stays open, which defeats streaming a checkpoint one tensor at a time.
    """
    for path in files:
        header = check_safetensors(path)
        start = _data_start(path)
        with open(path, "rb") as handle:
            for name in sorted(k for k in header if k != "__metadata__"):
                info = header[name]
                if info["dtype"] not in DTYPES:
                    raise InfoptError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
                begin, end = info["data_offsets"]
                handle.seek(start + begin)
                buffer = bytearray(end - begin)
                handle.readinto(buffer)
                dtype = DTYPES[info["dtype"]]
                flat = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
                yield name, flat.reshape(info["shape"])


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
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
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
        with open(part, "wb") as out, open(spill, "rb") as data:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            shutil.copyfileobj(data, out, 16 * 2**20)
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
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
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
