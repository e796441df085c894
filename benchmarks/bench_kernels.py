"""Quantized-linear CPU kernels next to torch's dense and int4 matmuls: a BENCHMARKS.md section.

    python benchmarks/bench_kernels.py                 # 1 and 2 threads, prints the markdown
    python benchmarks/bench_kernels.py --threads 1     # one thread only

Every method computes y = x @ w.T for x [tokens, in] (fp32; bf16 for the bf16 matmul) against a weight that is
read from memory, not cache: each method cycles through enough copies of its weight to exceed twice the L3
cache, as a model's layers do during decoding. Timings are medians of repeated runs that alternate between the
methods; GB/s is the weight bytes one call reads (packed values, scales, zero points) over its median time.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infopt.quant.rtn import quantize_rtn  # noqa: E402
from infopt.quant.weights import QuantizedWeight  # noqa: E402
from infopt.quant.spec import QuantSpec  # noqa: E402
from infopt.runtime import kernels  # noqa: E402
from infopt.runtime.kernels import build, ops  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out_features, in_features)
TOKENS = (1, 8)
THREADS = (1, 2)
SAMPLE_SECONDS = 0.004  # calls per timed sample: enough for about this long


@dataclass
class Method:
    name: str
    weight_bytes: int  # bytes of one copy of the weight, as read by one call
    call: Callable[[], object]  # runs one product on the next copy of the weight


def l3_bytes() -> int:
    path = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    text = path.read_text().strip() if path.exists() else "32M"
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def _rotating(copies: list, run: Callable[[object], object]) -> Callable[[], object]:
    state = {"i": 0}

    def call() -> object:
        state["i"] = (state["i"] + 1) % len(copies)
        return run(copies[state["i"]])

    return call


def _copies(make: Callable[[], object], nbytes: int, working_set: int) -> list:
    return [make() for _ in range(max(1, math.ceil(working_set / nbytes)))]


def _int4pack(q) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU int4 layout for a symmetric g128 weight: indices q + 8, scales with zero offsets 0."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.codes.to(torch.int32) + 8), 2)
    scale = q.scale.float().t()
    return packed, torch.stack([scale, torch.zeros_like(scale)], dim=-1).contiguous()


@functools.cache
def _weights(out_f: int, in_f: int) -> tuple[torch.Tensor, QuantizedWeight, QuantizedWeight]:
    """A random weight and its int4-g128 (symmetric) and int8 per-channel quantizations, made once per shape."""
    weight = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)) * 0.02
    return weight, quantize_rtn(weight, QuantSpec(4, 128, True)), quantize_rtn(weight, QuantSpec(8, -1, True))


def methods(out_f: int, in_f: int, tokens: int, working_set: int) -> list[Method]:
    """The compared products for one shape, each checked once against the fp32 product of its weight."""
    weight, q4, q8 = _weights(out_f, in_f)
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(1))
    xb = x.bfloat16()
    found = []

    def add(name: str, make: Callable[[], object], run: Callable[[object], torch.Tensor], nbytes: int,
            reference: torch.Tensor) -> None:
        copies = _copies(make, nbytes, working_set)
        y = run(copies[0]).float()
        error = float((y - reference).norm() / reference.norm())
        if error > 2e-2:  # bf16 rounding at most; anything larger means the call is wrong
            raise RuntimeError(f"{name}: relative error {error:.2e}")
        found.append(Method(name, nbytes, _rotating(copies, run)))

    dense_ref = x @ weight.T
    add("fp32 matmul", weight.clone, lambda w: torch.nn.functional.linear(x, w), weight.numel() * 4, dense_ref)
    add("bf16 matmul", lambda: weight.bfloat16(), lambda w: torch.nn.functional.linear(xb, w),
        weight.numel() * 2, dense_ref)
    ref4, ref8 = x @ q4.dequantize().T, x @ q8.dequantize().T
    try:
        packed, scales = _int4pack(q4)
        packed_bytes = packed.numel() * packed.element_size()
        add("torch int4pack g128", lambda: _int4pack(q4),
            lambda p: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p[0], 128, p[1]),
            packed_bytes + scales.numel() * 4, ref4)
        # its fast path takes bf16 activations (and bf16 scales), rounding the output to bf16
        add("torch int4pack g128, bf16 x", lambda: (packed.clone(), scales.bfloat16()),
            lambda p: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, p[0], 128, p[1]),
            packed_bytes + scales.numel() * 2, ref4)
    except (RuntimeError, AttributeError) as exc:  # not built into this torch
        print(f"torch int4pack skipped: {exc}", file=sys.stderr)
    p4, p8 = kernels.pack(q4), kernels.pack(q8)
    if kernels.available():
        add("ext int4 g128", lambda: kernels.pack(q4), lambda p: ops.kernel_matmul(x, p), p4.nbytes, ref4)
        if kernels.has_vnni():  # int8-rounded activations (--kernels ext-a8)
            add("ext int4 g128, int8 x", lambda: kernels.pack(q4), lambda p: ops.kernel_matmul_a8(x, p), p4.nbytes,
                ref4)
        add("ext int8", lambda: kernels.pack(q8), lambda p: ops.kernel_matmul(x, p), p8.nbytes, ref8)
    add("torch fallback int4 (lean)", lambda: kernels.pack(q4),
        lambda p: ops.tiled_matmul(x, p, use_kernels=False), p4.nbytes, ref4)
    return found


def time_methods(found: list[Method], repeats: int) -> dict[str, float]:
    """Median seconds per call; the methods alternate within every repeat."""
    inner = {}
    for m in found:  # warm up, and size each sample to about SAMPLE_SECONDS
        start = time.perf_counter()
        m.call()
        inner[m.name] = max(1, min(50, int(SAMPLE_SECONDS / max(time.perf_counter() - start, 1e-6))))
    samples: dict[str, list[float]] = {m.name: [] for m in found}
    for _ in range(repeats):
        for m in found:
            start = time.perf_counter()
            for _ in range(inner[m.name]):
                m.call()
            samples[m.name].append((time.perf_counter() - start) / inner[m.name])
    return {name: statistics.median(values) for name, values in samples.items()}


def memory_bandwidth(repeats: int = 7) -> tuple[float, float]:
    """(GB/s copied by a 256 MiB tensor copy, GB/s read by a sum over 256 MiB), medians."""
    src = torch.ones(64 << 20)
    dst = torch.empty_like(src)
    copy, read = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        copy.append(time.perf_counter() - start)
        start = time.perf_counter()
        src.sum()
        read.append(time.perf_counter() - start)
    nbytes = src.numel() * 4
    return nbytes / statistics.median(copy) / 1e9, nbytes / statistics.median(read) / 1e9


def _cell(seconds: float, nbytes: int) -> str:
    return f"{seconds * 1e3:.2f} ms ({nbytes / seconds / 1e9:.1f} GB/s)"


def section(threads: tuple[int, ...] = THREADS, repeats: int = 15, hot: bool = False) -> list[str]:
    """Markdown lines: one row per thread count, shape and token count; a cell per method.

    hot=True reuses one copy of each weight (cache-resident where it fits) instead of reading from memory.
    """
    previous = torch.get_num_threads()
    working_set = 0 if hot else 2 * l3_bytes()
    load = "not used: " + str(build.reason()) if not kernels.available() else f"loaded in {build.load_seconds():.1f} s"
    where = ("One copy of each weight, reused (cache-resident where it fits)." if hot else
             f"Weights rotate through copies exceeding {working_set >> 20} MiB (2x L3), so every call reads them "
             "from memory.")
    lines = [f"{where} Extension: {load}. Cells: median ms per call (weight GB/s).", ""]
    names: list[str] | None = None
    rows = []
    try:
        for n in threads:
            torch.set_num_threads(n)
            copy_bw, read_bw = memory_bandwidth()
            lines.append(f"- {n} thread(s): memory bandwidth {copy_bw:.1f} GB/s copied (256 MiB tensor copy), "
                         f"{read_bw:.1f} GB/s read (sum over 256 MiB)")
            for out_f, in_f in SHAPES:
                for tokens in TOKENS:
                    found = methods(out_f, in_f, tokens, working_set)
                    medians = time_methods(found, repeats)
                    names = names or [m.name for m in found]
                    cells = [_cell(medians[m.name], m.weight_bytes) for m in found]
                    rows.append(f"| {n} | {out_f}x{in_f} | {tokens} | " + " | ".join(cells) + " |")
                    print(rows[-1], file=sys.stderr, flush=True)
                    del found
    finally:
        torch.set_num_threads(previous)
    header = "| threads | out x in | tokens | " + " | ".join(names or []) + " |"
    return lines + ["", header, "|" + "---|" * (3 + len(names or []))] + rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=list(THREADS))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--hot", action="store_true", help="reuse one copy of each weight (cache-resident)")
    args = parser.parse_args()
    print("\n".join(section(tuple(args.threads), args.repeats, args.hot)))


if __name__ == "__main__":
    main()
