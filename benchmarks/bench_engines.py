"""Engines side by side on one model: infopt run, llama.cpp (llama-cpp-python 0.3.36), vLLM CPU 0.32.0 and
transformers, at 16-bit, 8-bit and 4-bit weights.

    python benchmarks/run.py --only engines

Model: a synthetic Llama of 706M parameters (random weights: 16 layers x 2048, intermediate 5632, 32 heads, 4 KV
heads, vocab 512; every shape a multiple of 256 so the K-quants apply), cached. infopt writes every checkpoint from
it: compressed-tensors int8 / int4 g128 (RTN) and the GGUF files (F16, Q8_0, Q4_0, Q4_K_M) llama.cpp runs. Every
engine gets the same token ids, 2 threads, and is timed on: decode at batch 1 after a 16-token prompt, prompt
processing of 512 tokens, and tokens per second summed over 4 and 16 concurrent sequences. Each figure is the
median of REPEATS runs inside one process per engine (vLLM's start costs a minute, so engines cannot alternate run
by run); the read bandwidth is measured before and after each engine to show the machine's drift.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "infopt" / "bench"
NAME = "synthetic-706m"
PROMPT = list(range(100, 116))
NEW = 64
PP = 512
REPEATS = 3
THREADS = 2


def checkpoints() -> dict[str, Path]:
    from synthetic import llama_config, make_synthetic_llama

    from infopt.quant.spec import QuantSpec
    from infopt.workflows import make_request, quantize

    source = make_synthetic_llama(CACHE / NAME, llama_config(16, 2048, 5632, 32, 4, context=2048))
    paths = {"source": source}
    for name, spec in {"int8": QuantSpec(8, -1, True), "int4-g128": QuantSpec(4, 128, True)}.items():
        out = CACHE / f"{NAME}-{name}"
        if not (out / "config.json").is_file():
            quantize(make_request(model=str(source), spec=spec, out=out))
        paths[name] = out
    for gguf_type in ("F16", "Q8_0", "Q4_0", "Q4_K_M"):
        out = CACHE / f"{NAME}-{gguf_type}.gguf"
        if not out.is_file():
            quantize(make_request(model=str(source), fmt="gguf", gguf_type=gguf_type, out=out))
        paths[gguf_type] = out
    return paths


def _read_bandwidth() -> float:
    from bench_kernels import memory_bandwidth

    return memory_bandwidth(3)[1]


def _median(runs: list[float]) -> float:
    return statistics.median(runs)


# --- infopt ------------------------------------------------------------------------------------------------------

def _infopt_rates(model) -> dict[str, float]:
    from infopt.runtime.engine import Engine, SamplingParams
    from infopt.runtime.kv_cache import KVCache

    def engine():
        return Engine(model, KVCache.for_model(model, 1024), max_batch=64)

    def decode(sequences: int) -> float:
        e = engine()
        for i in range(sequences):
            e.submit(PROMPT + [200 + i], SamplingParams(max_new_tokens=NEW + 1))
        e.run()
        return e.timings.decode_tokens / e.timings.decode_seconds

    def prompt() -> float:
        e = engine()
        e.submit([100 + i % 400 for i in range(PP)], SamplingParams(max_new_tokens=1))
        e.run()
        return e.timings.prefill_tokens / e.timings.prefill_seconds

    decode(1)  # warm-up: kernel load, allocator
    runs: dict[str, list[float]] = {}
    for _ in range(REPEATS):
        for key, run in (("decode", lambda: decode(1)), ("pp", prompt), ("x4", lambda: decode(4)),
                         ("x16", lambda: decode(16))):
            runs.setdefault(key, []).append(run())
    return {k: _median(v) for k, v in runs.items()}


def infopt_rows(paths: dict[str, Path]) -> dict[str, dict[str, float]]:
    from infopt.models.loading import open_model
    from infopt.runtime.model import load_engine_model

    variants = {"bf16": ("source", torch.bfloat16, None), "int8": ("int8", torch.float32, None),
                "int4 g128 (exact)": ("int4-g128", torch.float32, None),
                "int4 g128 (ext-a8)": ("int4-g128", torch.float32, "ext-a8")}
    out = {}
    for label, (name, dtype, backend) in variants.items():
        model = load_engine_model(open_model(str(paths[name])), dtype, backend)
        out[label] = _infopt_rates(model)
        del model
    return out


# --- llama.cpp ---------------------------------------------------------------------------------------------------

def llama_cpp_rows(paths: dict[str, Path]) -> dict[str, dict[str, float]]:
    """llama-cpp-python's Llama.eval: decode one token at a time after the prompt, and a 512-token prompt in one
    batch. It gives one sequence per context, so there are no batched figures (llama-batched-bench is not built).
    Without weight repacking (bench_gguf.load_llama: with it, llama.cpp crashes on these files here)."""
    from bench_gguf import load_llama

    def decode(llm) -> float:
        llm.reset()
        llm.eval(PROMPT)
        start = time.perf_counter()
        for i in range(NEW):
            llm.eval([200 + i % 300])
        return NEW / (time.perf_counter() - start)

    def prompt(llm) -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval([100 + i % 400 for i in range(PP)])
        return PP / (time.perf_counter() - start)

    out = {}
    for gguf_type in ("F16", "Q8_0", "Q4_0", "Q4_K_M"):
        llm = load_llama(paths[gguf_type], THREADS, PP)
        decode(llm)
        runs = {"decode": [decode(llm) for _ in range(REPEATS)], "pp": [prompt(llm) for _ in range(REPEATS)]}
        out[gguf_type] = {k: _median(v) for k, v in runs.items()}
        llm.close()
    return out


# --- vLLM --------------------------------------------------------------------------------------------------------

def vllm_rows(paths: dict[str, Path]) -> tuple[dict[str, dict[str, float]], str]:
    """One vLLM process loads the bf16 source and the int4 checkpoint in turn; each timing is a generate call
    (ignore_eos: every sequence makes all its tokens). Decode = (NEW - 1) tokens / (time of NEW tokens - time of
    1), so the prompt's prefill cancels out."""
    from infopt.runtime import vllm_engine

    def task(prompts, tokens):
        return {"kind": "generate", "prompts": prompts, "max_tokens": tokens, "temperature": 0.0, "ignore_eos": True}

    long_prompt = [100 + i % 400 for i in range(PP)]
    plan = [("one", task([PROMPT], 1)), ("decode", task([PROMPT], NEW)), ("pp", task([long_prompt], 1)),
            ("x4", task([PROMPT + [200 + i] for i in range(4)], NEW)),
            ("x16", task([PROMPT + [200 + i] for i in range(16)], NEW))]
    tasks = [t for _ in range(REPEATS + 1) for _, t in plan]  # the first round warms up
    options = vllm_engine.VLLMOptions(engine_args={"max_model_len": 1024, "gpu_memory_utilization": 0.3,
                                                   "max_num_seqs": 16})
    names = {"bf16": "source", "int4 g128 (CPUWNA16)": "int4-g128"}
    result = vllm_engine.run_job([{"model": str(paths[n]), "tasks": tasks} for n in names.values()], options)
    out = {}
    for label, outcome in zip(names, result["models"]):
        done = vllm_engine.checked(outcome, label, len(tasks))["tasks"][len(plan):]
        seconds: dict[str, list[float]] = {}
        for i, t in enumerate(done):
            seconds.setdefault(plan[i % len(plan)][0], []).append(t["seconds"])
        one = _median(seconds["one"])
        out[label] = {"decode": (NEW - 1) / (_median(seconds["decode"]) - one), "pp": PP / _median(seconds["pp"]),
                      "x4": 4 * NEW / _median(seconds["x4"]), "x16": 16 * NEW / _median(seconds["x16"]),
                      "load_seconds": outcome["load_seconds"]}
    return out, f"vLLM {result['vllm_version']} on {result['platform']}"


# --- transformers ------------------------------------------------------------------------------------------------

@torch.no_grad()
def transformers_rows(paths: dict[str, Path]) -> dict[str, dict[str, float]]:
    from bench_runtime import transformers_decode

    from infopt.models.loading import load_causal_lm, open_model

    model = load_causal_lm(open_model(str(paths["source"])), torch.bfloat16)

    def decode() -> float:
        return transformers_decode(model, NEW, PROMPT)

    def prompt() -> float:
        ids = torch.tensor([[100 + i % 400 for i in range(PP)]])
        start = time.perf_counter()
        model(input_ids=ids)
        return PP / (time.perf_counter() - start)

    decode()
    return {"bf16": {"decode": _median([decode() for _ in range(REPEATS)]),
                     "pp": _median([prompt() for _ in range(REPEATS)])}}


# --- the section -------------------------------------------------------------------------------------------------

def _cell(rates: dict | None, key: str) -> str:
    value = (rates or {}).get(key)
    return f"{value:.1f}" if value else "-"


# llama-bench on this machine, with llama.cpp's CPU repacking, as issue 18 reports it (batch-1 Q4_0 decode range
# over runs, and pp512): llama.cpp's speed when its repacking works, which it does not in this benchmark's process.
ISSUE_Q4_0, ISSUE_PP512 = (47, 67), 174


def section() -> list[str]:
    torch.set_num_threads(THREADS)
    paths = checkpoints()
    bandwidth, results = [_read_bandwidth()], {}
    for engine, run in (("infopt", infopt_rows), ("llama.cpp", llama_cpp_rows), ("transformers", transformers_rows)):
        results[engine] = run(paths)
        bandwidth.append(_read_bandwidth())
    vllm, vllm_name = vllm_rows(paths)
    results["vLLM"] = vllm
    bandwidth.append(_read_bandwidth())
    rows = [("16-bit", [("infopt", "bf16"), ("llama.cpp", "F16"), ("vLLM", "bf16"), ("transformers", "bf16")]),
            ("8-bit", [("infopt", "int8"), ("llama.cpp", "Q8_0")]),
            ("4-bit", [("infopt", "int4 g128 (exact)"), ("infopt", "int4 g128 (ext-a8)"), ("llama.cpp", "Q4_0"),
                       ("llama.cpp", "Q4_K_M"), ("vLLM", "int4 g128 (CPUWNA16)")])]
    # bytes one decode step reads, for the roofline: the file's weights (16-bit rows: the F16 file, since the
    # source is fp32 on disk and every engine computes it in 16 bits)
    size = {name: sum(p.stat().st_size for p in paths[name].glob("*.safetensors")) for name in ("int8", "int4-g128")}
    size.update({t: paths[t].stat().st_size for t in ("F16", "Q8_0", "Q4_0", "Q4_K_M")})
    nbytes = {"bf16": size["F16"], "F16": size["F16"], "int8": size["int8"], "Q8_0": size["Q8_0"],
              "int4 g128 (exact)": size["int4-g128"], "int4 g128 (ext-a8)": size["int4-g128"],
              "int4 g128 (CPUWNA16)": size["int4-g128"], "Q4_0": size["Q4_0"], "Q4_K_M": size["Q4_K_M"]}
    read = max(bandwidth)
    lines = [f"706M synthetic Llama (16 x 2048, 32 heads / 4 KV heads, vocab 512), {THREADS} threads for every "
             f"engine; {vllm_name} (eager, bf16: infopt's CPU defaults for it), llama-cpp-python 0.3.36, transformers "
             "with its sdpa attention. Decode: batch 1, "
             f"{NEW} tokens after a {len(PROMPT)}-token prompt; pp{PP}: one {PP}-token prompt; x4 / x16: tokens per "
             f"second summed over 4 / 16 sequences of {NEW} new tokens. Medians of {REPEATS} runs; read bandwidth "
             f"during the section {min(bandwidth):.1f}-{max(bandwidth):.1f} GB/s (a sum over 256 MiB, measured "
             "between engines). '-': the engine has no such figure here (llama-cpp-python runs one sequence per "
             "context; vLLM's CPU int kernel takes 4-bit weights only).", "",
             "| weights | engine | format | MB read / token | decode tok/s | % of read roofline | pp512 tok/s "
             "| x4 tok/s | x16 tok/s |", "|---|---|---|---|---|---|---|---|---|"]
    for width, cells in rows:
        for engine, key in cells:
            rates = results[engine].get(key)
            roofline = read * 1e9 / nbytes[key]
            lines.append(f"| {width} | {engine} | {key} | {nbytes[key] / 1e6:.0f} | {_cell(rates, 'decode')} | "
                         f"{rates['decode'] / roofline:.0%} | {_cell(rates, 'pp')} | {_cell(rates, 'x4')} | "
                         f"{_cell(rates, 'x16')} |")
    inf, cpp = results["infopt"], results["llama.cpp"]
    starts = ", ".join(f"{v['load_seconds']:.0f} s" for v in vllm.values())
    best4 = max(inf["int4 g128 (exact)"]["decode"], inf["int4 g128 (ext-a8)"]["decode"])
    best_pp = max(inf["int4 g128 (exact)"]["pp"], inf["int4 g128 (ext-a8)"]["pp"])
    x16 = max(inf["int4 g128 (exact)"]["x16"], inf["int4 g128 (ext-a8)"]["x16"])
    lines += ["", "Against the targets (issue 18), with llama.cpp as it runs here (without repacking, see below): "
              f"infopt int4 decode at batch 1 is **{best4 / cpp['Q4_0']['decode']:.2f}x** llama.cpp Q4_0 (target >= 1.1x; "
              f"{best4 / cpp['Q4_K_M']['decode']:.2f}x Q4_K_M); int4 prompt processing "
              f"**{best_pp / cpp['Q4_0']['pp']:.2f}x** llama.cpp Q4_0's (target >= 1.0x); throughput at 16 sequences "
              f"**{x16 / vllm['int4 g128 (CPUWNA16)']['x16']:.2f}x** vLLM CPU's on the same int4 checkpoint "
              f"(target >= 1.0x). 16-bit decode: infopt bf16 {inf['bf16']['decode'] / cpp['F16']['decode']:.2f}x "
              f"llama.cpp F16. vLLM's start: {starts}."]
    lines += ["", f"Read roofline: bytes read per token / {read:.1f} GB/s, the highest read bandwidth measured in the "
              "section (so the percentages are the least flattering). **llama.cpp here runs without its CPU weight "
              "repacking** (bench_gguf.load_llama): with it, its decode crashes on this machine for the Q4_0, Q8_0 and "
              "Q4_K_M files, its own converter's and quantizer's Q4_0 too, while F16 runs. The issue's figures from "
              f"`llama-bench` on this machine with repacking (Q4_0 {ISSUE_Q4_0[0]}-{ISSUE_Q4_0[1]} tok/s, Q4_K_M 78, "
              "Q8_0 35 at batch 1; pp512 174) are what llama.cpp reaches when it works: against those, infopt's int4 "
              f"decode is {best4 / ISSUE_Q4_0[1]:.2f}-{best4 / ISSUE_Q4_0[0]:.2f}x, so the batch-1 target (>= 1.1x) is "
              f"{'met' if best4 >= 1.1 * ISSUE_Q4_0[1] else '**not** shown met'} against them, and int4 prompt "
              f"processing {best_pp / ISSUE_PP512:.2f}x their pp512. vLLM's prompt processing (oneDNN bf16 GEMMs) is "
              "several times infopt's at every width: infopt's int4 prefill loses to it by far."]
    return lines


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    print("\n".join(section()))
