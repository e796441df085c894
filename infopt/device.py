"""Where computation runs: device names and what the CPU can do. Used by quantization and the runtime alike."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from infopt.errors import InfoptError


def resolve_device(name: str) -> str:
    """"auto" -> cuda when available, else cpu; an explicit cuda without a GPU is an error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InfoptError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise InfoptError(f"invalid --device {name!r}: auto, cpu or cuda")
    return name


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return frozenset()
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def fast_bf16(device: str) -> bool:
    """Whether bf16 matrix products run natively here (AVX512-BF16 / AMX on the CPU, bf16 support on CUDA)."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
