"""Where computation runs: device names and what the CPU can do. Used by quantization and the runtime alike."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
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


MAX_THREADS = 4096


@contextlib.contextmanager
def compute_threads(count: int | None) -> Iterator[int]:
    """Run the block on `count` torch threads (None: the count the process has) and give the count used.

    A checkpoint's last bits depend on the thread count its products ran on (their blocking changes with it), so
    runs record it: a stored recipe and a resumed run compute on the recorded count whatever the machine gives."""
    before = torch.get_num_threads()
    if count is not None:
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_THREADS:
            raise InfoptError(f"threads: {count!r} is not a thread count (1 to {MAX_THREADS})")
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
