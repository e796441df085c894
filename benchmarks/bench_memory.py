"""Peak memory of the calibrated methods: GPTQ and AWQ on synthetic Llamas of 4 and 32 layers (same width), and
AWQ on one 7B-shaped layer, each through `infopt quantize` under benchmarks/peak_rss.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from synthetic import llama_config, make_synthetic_llama

ROOT = Path(__file__).resolve().parents[1]


def _peak(cmd: list[str], threads: int) -> tuple[float, int]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peak_rss.py"), sys.executable, "-m",
                             "infopt.cli.main", *cmd], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - start, int(result.stdout.strip().splitlines()[-1].split("=")[1])


def _quantize(model: Path, out: Path, method: str, samples: int, seq_len: int, extra: tuple[str, ...] = ()) -> list[str]:
    return ["quantize", str(model), "--method", method, "--calib", "wikitext2", "--calib-samples", str(samples),
            "--calib-seq-len", str(seq_len), "--bits", "4", "--group-size", "128", "--out", str(out), "--force",
            "--json", *extra]


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def section(work: Path, threads: int = 2) -> list[str]:
    rows = ["| method | layers | checkpoint bytes | peak RSS | wall s |", "| --- | ---: | ---: | ---: | ---: |"]
    ratios = {}
    for method in ("gptq", "awq"):
        peaks = {}
        for layers in (4, 32):
            model = make_synthetic_llama(work / f"synthetic-{layers}", llama_config(layers, 1024, 2816, 8, 8))
            seconds, peak = _peak(_quantize(model, work / f"q-{method}-{layers}", method, 4, 256), threads)
            peaks[layers] = peak
            rows.append(f"| {method} | {layers} | {_size(model):,} | {peak / 2**20:,.0f} MiB | {seconds:.0f} |")
        ratios[method] = peaks[32] / peaks[4]
    big = make_synthetic_llama(work / "synthetic-7b-layer", llama_config(1, 4096, 11008, 32, 32, context=4096))
    samples, seq_len = 8, 2048
    seconds, peak = _peak(_quantize(big, work / "q-awq-7b", "awq", samples, seq_len, ("--awq-grid", "4")), threads)
    tokens = samples * seq_len
    return [
        "Synthetic Llamas (random weights on disk), hidden 1024, intermediate 2816, 8 heads, 4 and 32 decoder",
        "layers; `infopt quantize --method gptq|awq --calib wikitext2 --calib-samples 4 --calib-seq-len 256",
        "--group-size 128`. Layers are loaded one at a time from the shards, and AWQ streams its statistics (the",
        "per-channel mean |x| is accumulated batch by batch; only the scale search's windows, the clip search's",
        "sampled tokens and the error check's first tokens are kept), so the peak does not grow with depth.",
        "",
        *rows,
        "",
        f"Peak RSS ratio, 32 layers / 4 layers: GPTQ **{ratios['gptq']:.2f}**, AWQ **{ratios['awq']:.2f}** "
        "(target <= 1.3).",
        "",
        f"One 7B-shaped layer (hidden 4096, intermediate 11008, 32 heads; {_size(big) / 1e9:.2f} GB fp32), AWQ on "
        f"{samples} windows x {seq_len} tokens (`--awq-grid 4`, which changes the time, not the memory): peak RSS "
        f"**{peak / 2**30:.2f} GiB** in {seconds:.0f} s. That is {tokens} tokens, the scale search's default budget "
        "(`--awq-search-tokens 16384`), so here the search keeps every window: the peak is the layer's fp32 weights, "
        "the stored layer inputs and the MLP forwards of the search tokens "
        f"({16384 * 11008 * 4 / 2**30:.2f} GiB per [16384, 11008] fp32 activation). More windows add only the stored "
        "layer inputs (bounded by `--offload-activations`), since the statistics are streamed and only the budgeted "
        "tokens are kept; before it streamed, AWQ held every window's inputs of each linear group plus a copy, about "
        f"{128 * 2048 * 11008 * 4 / 1e9:.1f} GB for down_proj alone at the defaults (128 x 2048 tokens).",
    ]
