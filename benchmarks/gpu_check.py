"""One-shot check of the Triton GPU kernels on a CUDA machine: their tests, then timings against torch fp16.

    python benchmarks/gpu_check.py                        # writes to $OUT, else out/gpu
    python benchmarks/gpu_check.py --out DIR --section-md BENCH_SECTION.md

Runs tests/test_triton_kernels.py in a subprocess (pytest -n 8 when pytest-xdist is there) and records its counts,
then times y = x @ W.T for W (out x in) 4096x4096, 11008x4096 and 4096x11008 at batch 1 and 16: torch fp16 dense,
Triton int4 g128 (symmetric) and int8 per-channel (symmetric), x fp16. Each call is captured in a CUDA graph and
its replay timed (median of triton.testing.do_bench, which clears the L2 cache before every call, so weights come
from HBM): GPU time without Python launch overhead, as a graphed decoder step sees it. The JSON also holds eager
times (launch overhead included). GB/s counts the weight bytes one call reads (packed codes + scales for the
quantized ones, the fp16 matrix for torch) over the time. The int4/int8 columns are what matmul() dispatches to;
the forced gemv/gemm columns say which kernel wins at each batch. --sweep also times launch settings (GEMV_CONFIG,
GEMM_CONFIG) and prints the best. Writes gpu_check.json and gpu_check.md (a BENCHMARKS.md section) to --out;
takes about 1 minute on an H100, under 2 with --sweep.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infopt.quant.weights import QuantizedWeight  # noqa: E402
from infopt.quant.spec import QuantSpec  # noqa: E402
from infopt.runtime.kernels import triton_int4 as ti  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out_features, in_features)
BATCHES = (1, 16)
TEST_TIMEOUT_S = 150


def run_tests() -> dict:
    """pytest counts for tests/test_triton_kernels.py."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_triton_kernels.py"]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "8"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TEST_TIMEOUT_S)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output, rc = f"{exc.stdout or ''}\ntimed out after {TEST_TIMEOUT_S} s", -1
    summary = next((line for line in reversed(output.splitlines())
                    if re.search(r"\d+ (passed|failed|skipped|errors?)\b.* in ", line)), "")
    counts = {k.rstrip("s") if k.startswith("error") else k: int(n)
              for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    failures = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"command": " ".join(cmd), "returncode": rc, "seconds": round(time.perf_counter() - start, 1),
            "counts": counts, "failures": failures[:30], "tail": output[-4000:]}


def random_weight(out_f: int, in_f: int, bits: int, group: int, gen: torch.Generator) -> QuantizedWeight:
    spec = QuantSpec(bits, group, True)
    codes = torch.randint(spec.qmin, spec.qmax + 1, (out_f, in_f), generator=gen, dtype=torch.int8)
    scale = (torch.rand(out_f, spec.num_groups(in_f), generator=gen) * 0.01 + 0.001).half()
    return QuantizedWeight(codes, scale, None, spec)


def graphed(fn):
    """fn captured in a CUDA graph (after a warm-up call that compiles it); returns the replay."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def median_us(fn, graph: bool = True, rep: int = 100) -> float:
    import triton.testing

    run = graphed(fn) if graph else fn
    run()
    torch.cuda.synchronize()
    return triton.testing.do_bench(run, warmup=max(10, rep // 4), rep=rep, return_mode="median") * 1000


def bench_shape(out_f: int, in_f: int, gen: torch.Generator) -> list[dict]:
    int4 = ti.pack(random_weight(out_f, in_f, 4, 128, gen))
    int8 = ti.pack(random_weight(out_f, in_f, 8, -1, gen))
    dense = ti.dequantize(int4).half()
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, in_f, device="cuda").half()
        ref = x.float() @ dense.float().T
        err = ((ti.matmul(x, int4).float() - ref).abs().max() / ref.abs().max()).item()
        row = {"shape": f"{out_f}x{in_f}", "batch": batch, "int4_rel_err": err,
               "fp16_bytes": dense.numel() * 2, "int4_bytes": int4.nbytes, "int8_bytes": int8.nbytes,
               "fp16_us": median_us(lambda: x @ dense.T),
               "int4_us": median_us(lambda: ti.matmul(x, int4)),
               "int4_gemv_us": median_us(lambda: ti.matmul(x, int4, kernel="gemv")),
               "int4_gemm_us": median_us(lambda: ti.matmul(x, int4, kernel="gemm")),
               "int8_us": median_us(lambda: ti.matmul(x, int8)),
               "int8_gemv_us": median_us(lambda: ti.matmul(x, int8, kernel="gemv")),
               "int8_gemm_us": median_us(lambda: ti.matmul(x, int8, kernel="gemm")),
               "fp16_eager_us": median_us(lambda: x @ dense.T, graph=False),
               "int4_eager_us": median_us(lambda: ti.matmul(x, int4), graph=False),
               "int8_eager_us": median_us(lambda: ti.matmul(x, int8), graph=False)}
        for name in ("fp16", "int4", "int8"):
            row[f"{name}_gbs"] = row[f"{name}_bytes"] / row[f"{name}_us"] / 1e3
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _grid(**axes: tuple) -> list[dict]:
    configs = [{}]
    for key, values in axes.items():
        configs = [{**c, key: v} for c in configs for v in values]
    return configs


SWEEPS = {  # (kernel, bits, batch): launch settings to try
    ("gemv", 4, 1): _grid(block_n=(32, 64, 128), block_k4=(128, 256, 512), waves=(1, 2, 4)),
    ("gemv", 8, 1): _grid(block_n=(32, 64, 128), block_k8=(64, 128), waves=(1, 2, 4)),
    ("gemm", 4, 16): _grid(block_n=(32, 64, 128), block_k=(64, 128), stages=(3, 4), waves=(1, 2, 4)),
}


def sweep(gen: torch.Generator) -> dict:
    """Median µs of each launch setting, fastest first, per (kernel, bits, batch, shape); and gemv vs gemm."""
    results = {}
    for out_f, in_f in SHAPES[:2]:
        weights = {bits: ti.pack(random_weight(out_f, in_f, bits, group, gen)) for bits, group in ((4, 128), (8, -1))}
        for (kernel, bits, batch), configs in SWEEPS.items():
            x = torch.randn(batch, in_f, device="cuda").half()
            run = ti.gemv if kernel == "gemv" else ti.gemm
            timed = []
            for config in configs:
                try:
                    timed.append((median_us(lambda c=config: run(x, weights[bits], c), rep=40), config))
                except Exception as exc:  # noqa: BLE001 -- a setting the GPU cannot run: record and go on
                    timed.append((float("inf"), {**config, "error": f"{type(exc).__name__}: {exc}"[:200]}))
            timed.sort(key=lambda t: t[0])
            key = f"{kernel} int{bits} batch {batch} {out_f}x{in_f}"
            results[key] = [{"us": round(us, 2), **config} for us, config in timed]
            print(key, results[key][:4], flush=True)
        for batch in (2, 4, 8, 12):
            x = torch.randn(batch, in_f, device="cuda").half()
            key = f"threshold int4 batch {batch} {out_f}x{in_f}"
            results[key] = {k: round(median_us(lambda k=k: ti.matmul(x, weights[4], kernel=k), rep=40), 2)
                            for k in ("gemv", "gemm")}
            print(key, results[key], flush=True)
    return results


def environment() -> dict:
    import triton

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "gemv_max_tokens": ti.GEMV_MAX_TOKENS,
            "commit": _git("rev-parse", "--short", "HEAD"), "dirty": bool(_git("status", "--porcelain")),
            "date": time.strftime("%Y-%m-%d")}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def section(env: dict, tests: dict, rows: list[dict]) -> str:
    """The BENCHMARKS.md section: one table row per shape and batch."""
    counts = ", ".join(f"{n} {k}" for k, n in tests.get("counts", {}).items()) or "not run"
    lines = [
        "## Triton GPU kernels (int4 / int8 weight-only)", "",
        f"`python benchmarks/gpu_check.py` at commit {env['commit']}{' (dirty)' if env['dirty'] else ''}, "
        f"{env['date']}, on {env['gpu']}, torch {env['torch']}, triton {env['triton']}, Python {env['python']}.", "",
        f"tests/test_triton_kernels.py: {counts}. y = x @ W.T with x fp16; each call replayed from a CUDA graph, "
        "medians of triton.testing.do_bench (L2 cleared before each call); GB/s = weight bytes read "
        "(codes + scales) / time; speedup = fp16 µs / "
        f"quantized µs. int4 is g128 symmetric, int8 per-channel symmetric; matmul() uses the gemv kernel for at most "
        f"{env['gemv_max_tokens']} token(s), the tl.dot gemm beyond.", "",
        "| shape (out x in) | batch | fp16 µs | fp16 GB/s | int4 µs | int4 GB/s | int4 speedup "
        "| int4 gemv / gemm µs | int8 µs | int8 GB/s | int8 speedup | int8 gemv / gemm µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['fp16_us']:.1f} | {r['fp16_gbs']:.0f} | {r['int4_us']:.1f} | "
            f"{r['int4_gbs']:.0f} | {r['fp16_us'] / r['int4_us']:.2f}x | {r['int4_gemv_us']:.1f} / "
            f"{r['int4_gemm_us']:.1f} | {r['int8_us']:.1f} | {r['int8_gbs']:.0f} | {r['fp16_us'] / r['int8_us']:.2f}x"
            f" | {r['int8_gemv_us']:.1f} / {r['int8_gemm_us']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "out" / "gpu"))
    parser.add_argument("--section-md", type=Path, help="also write the BENCHMARKS.md section here")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also time launch settings of both kernels")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not ti.available():
        sys.exit(f"Triton kernels unavailable: {ti.reason()}")
    tests = {} if args.skip_tests else run_tests()
    if tests:
        print(f"tests: {tests['counts']} in {tests['seconds']} s (rc {tests['returncode']})", flush=True)
        print("\n".join(tests["failures"]), flush=True)
    env = environment()
    gen = torch.Generator().manual_seed(0)
    rows = [row for out_f, in_f in SHAPES for row in bench_shape(out_f, in_f, gen)]
    tuned = sweep(gen) if args.sweep else {}
    text = section(env, tests, rows)
    report = {"env": env, "tests": tests, "rows": rows, "sweep": tuned}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (args.out / "gpu_check.md").write_text(text)
    if args.section_md:
        args.section_md.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
