"""Checked reading and sharded, deterministic writing of safetensors files."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def load_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(files))


class ShardedWriter:
    """Collects tensors in the order given and writes shards of at most `max_shard_bytes`."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = 5 * 10**9):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in shard for shard in self._shards):
            raise ValueError(f"tensor {name} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        part = self.out_dir / f".part-{len(self._shards)}.safetensors"
        save_file(self._pending, str(part), metadata=METADATA)
        self._shards.append(sorted(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Finish the shards, name them as transformers expects, and write the index if sharded."""
        if self._pending or not self._shards:
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
