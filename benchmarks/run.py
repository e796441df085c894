"""Run the benchmarks and rewrite their sections of BENCHMARKS.md (`make bench` runs them all).

    python benchmarks/run.py                 # every section
    python benchmarks/run.py --only gptq     # one section; the others stay as they are

Each section records the command, commit, date and machine that produced it. Threads are fixed at 2.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
THREADS = 2
TITLES = {"foundation": "RTN and packing (foundation)", "gptq": "GPTQ, AWQ, NF4/FP4 and RTN next to llm-compressor",
          "kernels": "Quantized matrix-vector kernels (runtime groundwork)",
          "runtime": "Runtime: decode speed, batching, paged KV cache, prefill memory",
          "speculative": "Speculative decoding",
          "gpu": "GPU (Triton kernels, CUDA runtime, `--device cuda` quantization)",
          "memory": "Peak memory of the calibrated methods",
          "reliability": "Reliability: malformed inputs and faults",
          "gguf": "GGUF next to llama.cpp's own quantizer",
          "imatrix": "GGUF with an importance matrix on both sides: llama-imatrix + llama-quantize next to infopt",
          "recovery": "Block-wise recovery (--recover) next to GPTQ, AWQ and auto-round",
          "qat": "End-to-end QAT (infopt qat) on top of block-wise recovery",
          "engines": "Engines side by side: infopt, llama.cpp, vLLM CPU and transformers on a 706M Llama",
          "overhead": "Per-token overhead of small models: the fused C++ decode step",
          "write": "Time to write a quantized 706M model: infopt next to llama.cpp's quantizer"}
BY_HAND = {"gpu": "written by hand from benchmarks/gpu_check.py and benchmarks/gpu_session.py on a CUDA machine"}


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    cores = len([line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("processor")])
    from infopt.quant.precision import bf16_attention_kernel_is_faster, bf16_fpmath_stays_fp32_accurate

    fpmath = "used" if bf16_fpmath_stays_fp32_accurate() else "not used (not fp32-accurate here, or no bf16)"
    attention = "bf16 (AMX)" if bf16_attention_kernel_is_faster() else "fp32"
    return (f"{cpu} ({cores} cores), {THREADS} torch threads, Python {platform.python_version()}, "
            f"torch {torch.__version__}, oneDNN bf16 fpmath for GPTQ's fp32 products: {fpmath}, attention of the "
            f"calibration forwards: {attention}")


def _stories(work: Path) -> Path:
    from infopt.paths import require_data_file
    from infopt.workflows import convert_llama2c

    folder = require_data_file("tinyllamas-stories260K/stories260K.bin").parent
    out = work / "stories260K"
    if not out.exists():
        convert_llama2c(folder / "stories260K.bin", folder / "tok512.model", out)
    return out


def run_section(name: str, work: Path, repeats: int) -> list[str]:
    if name == "foundation":
        import bench_foundation

        return bench_foundation.section(work, repeats)
    if name == "gptq":
        import bench_gptq
        from train_bench_model import ensure_bench_model

        return bench_gptq.section(ensure_bench_model(THREADS), _stories(work), work, THREADS)
    if name == "gguf":
        import bench_gguf
        from train_bench_model import ensure_bench_model

        return bench_gguf.section(_stories(work), ensure_bench_model(THREADS), work, THREADS)
    if name == "imatrix":
        import bench_gguf
        from train_bench_model import ensure_bench_model

        return bench_gguf.imatrix_section(_stories(work), ensure_bench_model(THREADS), work / "imatrix", THREADS)
    if name == "recovery":
        import bench_recovery
        from train_bench_model import ensure_bench_model

        return bench_recovery.section(ensure_bench_model(THREADS), _stories(work), work, THREADS)
    if name == "qat":
        import bench_recovery
        from train_bench_model import ensure_bench_model

        return bench_recovery.qat_section(ensure_bench_model(THREADS), work, THREADS)
    if name == "engines":
        import bench_engines

        return bench_engines.section()
    if name == "write":
        import bench_write

        return bench_write.section(work, THREADS)
    if name == "kernels":
        import bench_kernels

        return bench_kernels.section()
    if name == "runtime":
        import bench_runtime

        from train_bench_model import ensure_bench_model

        return bench_runtime.section(_stories(work), ensure_bench_model(THREADS))
    if name == "overhead":
        import bench_overhead
        from train_bench_model import ensure_bench_model

        return bench_overhead.section(ensure_bench_model(THREADS), _stories(work), THREADS)
    if name == "speculative":
        import bench_speculative
        from synthetic import widen_llama
        from train_bench_model import ensure_bench_model

        bench = ensure_bench_model(THREADS)
        widened = widen_llama(bench, bench.parent / f"widened-{bench_speculative.WIDEN}x-{bench.name}",
                              bench_speculative.WIDEN)
        return bench_speculative.section(bench, _stories(work), widened)
    if name == "memory":
        import bench_memory

        return bench_memory.section(work, THREADS)
    if name == "reliability":
        import bench_reliability

        return bench_reliability.section(int(os.environ.get("INFOPT_FUZZ_SCALE", "10")))
    if name in BY_HAND:
        raise SystemExit(f"the {name} section is {BY_HAND[name]}")
    raise SystemExit(f"unknown section {name!r}: {', '.join(TITLES)}")


def _block(name: str, lines: list[str], command: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    today = datetime.date.today().isoformat()
    header = [f"<!-- section: {name} -->", f"## {TITLES[name]}", "",
              f"`{command}` at commit {commit}, {today}, on {machine()}.", ""]
    return "\n".join(header + lines + [f"<!-- end: {name} -->"])


def merge(existing: str, blocks: dict[str, str]) -> str:
    found = {m.group(1): m.group(0) for m in re.finditer(r"<!-- section: (\w+) -->.*?<!-- end: \1 -->", existing, re.S)}
    found.update(blocks)
    intro = ["# Benchmarks", "",
             "Every number below was produced by the command named in its section (`make bench` runs them all).",
             "Timings are medians of alternating repeated runs; quality figures are single deterministic runs.", ""]
    return "\n".join(intro) + "\n" + "\n\n".join(found[n] for n in TITLES if n in found) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", action="append", choices=list(TITLES), help="run just these sections")
    parser.add_argument("--repeats", type=int, default=7, help="timing repeats for the foundation section")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    from infopt.cli.main import _quiet_optional_peers

    _quiet_optional_peers()
    names = args.only or [name for name in TITLES if name not in BY_HAND]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:  # each section is written as soon as it is done
            command = "python benchmarks/run.py --only " + name
            block = _block(name, run_section(name, Path(tmp), args.repeats), command)
            print(block, flush=True)
            existing = args.output.read_text() if args.output.exists() else ""
            args.output.write_text(merge(existing, {name: block}))


if __name__ == "__main__":
    main()
