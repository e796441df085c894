"""Runtime benchmarks: decode speed against the bandwidth roofline and transformers, batched throughput, KV waste
of the paged cache, and prefill memory of SDPA against explicit attention.

    python benchmarks/run.py --only runtime

Models: a synthetic Llama of 541M parameters (random weights on disk, 12 layers x 2048, intermediate 5632, 16 heads,
4 KV heads; reused from the cache) quantized by `infopt quantize --method rtn`; stories260K for the KV workload.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "infopt" / "bench"
DECODE_TOKENS = 32
PROMPT = [1] + list(range(100, 115))
A8_ROW = "int4-g128, int8 activations (`--kernels ext-a8`)"


def decode_model_dirs() -> dict[str, Path]:
    """The 541M synthetic Llama and its int8 / int4-g128 RTN checkpoints (built once, cached)."""
    from synthetic import llama_config, make_synthetic_llama

    from infopt.quant.spec import QuantSpec
    from infopt.workflows import make_request, quantize

    source = make_synthetic_llama(CACHE / "synthetic-541m", llama_config(12, 2048, 5632, 16, 4, context=4096))
    dirs = {"fp32": source, "bf16": source}
    for name, spec in {"int8": QuantSpec(8, -1, True), "int4-g128": QuantSpec(4, 128, True)}.items():
        out = CACHE / f"synthetic-541m-{name}"
        if not (out / "config.json").is_file():
            quantize(make_request(model=str(source), spec=spec, out=out))
        dirs[name] = out
    return dirs


def _engine(model, blocks: int = 512):
    from infopt.runtime.engine import Engine
    from infopt.runtime.kv_cache import KVCache

    return Engine(model, KVCache.for_model(model, blocks), max_batch=64)


def engine_decode(model, sequences: int = 1, tokens: int = DECODE_TOKENS) -> float:
    """Decode tokens per second (all sequences together), prefill excluded."""
    from infopt.runtime.engine import SamplingParams

    engine = _engine(model)
    for i in range(sequences):
        engine.submit(PROMPT + [200 + i], SamplingParams(max_new_tokens=tokens + 1))
    engine.run()
    return engine.timings.decode_tokens / engine.timings.decode_seconds


@torch.no_grad()
def transformers_decode(model, tokens: int = DECODE_TOKENS, prompt: list[int] = PROMPT) -> float:
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    cache, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
    start = time.perf_counter()
    for _ in range(tokens):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
    return tokens / (time.perf_counter() - start)


def streamed_bytes(model) -> int:
    """Weight bytes one decode step reads: every linear and lm_head (packed where packed), norms; not embeddings."""
    return model.weight_bytes - model.embed.numel() * model.embed.element_size()


def decode_rows(repeats: int) -> tuple[list[str], dict]:
    from bench_kernels import memory_bandwidth

    from infopt.models.loading import load_causal_lm, open_model
    from infopt.runtime.model import load_engine_model

    dirs = decode_model_dirs()
    # (row label, checkpoint, activation dtype, quantized-linear backend); all loaded at once, runs alternate
    variants = [("fp32", "fp32", torch.float32, None), ("bf16", "bf16", torch.bfloat16, None),
                ("int8", "int8", torch.float32, None), ("int4-g128", "int4-g128", torch.float32, None),
                (A8_ROW, "int4-g128", torch.float32, "ext-a8")]
    models = {label: load_engine_model(open_model(str(dirs[d])), dtype, backend) for label, d, dtype, backend in variants}
    hf_models = {d: load_causal_lm(open_model(str(dirs[d])), dtype) for d, dtype in
                 (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    for model in models.values():
        engine_decode(model, tokens=4)  # warm-up (extension load, allocator)
    for hf in hf_models.values():
        transformers_decode(hf, 4)
    runs: dict[str, list[float]] = {}
    bandwidths = []  # measured in every round too: the shared machine's bandwidth drifts
    for _ in range(repeats):
        bandwidths.append(memory_bandwidth(3))
        for label, model in models.items():
            runs.setdefault(label, []).append(engine_decode(model))
        for name, hf in hf_models.items():
            runs.setdefault(f"hf-{name}", []).append(transformers_decode(hf))
    copy_bw, read_bw = (statistics.median(b[i] for b in bandwidths) for i in (0, 1))
    rows, rates = [], {}
    for label, model in models.items():
        rate = rates[label] = statistics.median(runs[label])
        nbytes = streamed_bytes(model)
        throughput = {n: engine_decode(model, n) for n in (1, 4, 16)}
        hf_rate = statistics.median(runs[f"hf-{label}"]) if f"hf-{label}" in runs else None
        rows.append((label, nbytes, rate, copy_bw * 1e9 / nbytes, read_bw * 1e9 / nbytes, hf_rate, throughput))
    del models, hf_models
    lines = [f"Decode at batch 1 after a {len(PROMPT)}-token prompt, median of {repeats} runs of {DECODE_TOKENS} "
             f"tokens. Roofline: weight bytes read per token / the memcpy bandwidth, {copy_bw:.1f} GB/s (a 256 MiB "
             f"tensor copy, bytes copied per second); the stricter read roofline uses {read_bw:.1f} GB/s (a sum over "
             "256 MiB). Both bandwidths are medians of measurements taken between the rounds of decode runs; they vary "
             "a lot between runs on this shared machine. "
             "transformers runs its own model with its sdpa attention. All models are loaded together and their runs "
             "alternate, so a change in the machine's speed hits every row alike.", "",
             "| weights | bytes read / token | infopt tok/s | memcpy roofline tok/s | % of roofline | % of read roofline "
             "| transformers tok/s | infopt / transformers | batch 4 tok/s | batch 16 tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, nbytes, rate, roof, read_roof, hf_rate, throughput in rows:
        hf = f"{hf_rate:.2f}" if hf_rate else "-"
        ratio = f"{rate / hf_rate:.2f}x" if hf_rate else "-"
        lines.append(f"| {name} | {nbytes / 1e6:.0f} MB | {rate:.2f} | {roof:.2f} | {rate / roof:.0%} | "
                     f"{rate / read_roof:.0%} | {hf} | {ratio} | {throughput[4]:.1f} | {throughput[16]:.1f} |")
    int4, a8, bf16 = rates["int4-g128"], rates[A8_ROW], rates["bf16"]
    int4_roof = next(r for r in rows if r[0] == "int4-g128")[3]
    lines += ["", f"int4-g128 decodes **{int4 / bf16:.2f}x** as fast as bf16 with the exact kernels and "
              f"**{a8 / bf16:.2f}x** with int8 activations (target >= 3x), at **{int4 / int4_roof:.0%}** / "
              f"**{a8 / int4_roof:.0%}** of the memcpy roofline (target >= 50%). Batch 4 / 16: tokens per second "
              "summed over concurrent sequences (each 32 new tokens). q/k/v and gate/up run as one product each "
              "(fused at load)."]
    return lines, rates


class WasteEngine:
    """Step-weighted KV waste of the paged cache against contiguous per-sequence buffers, on one workload."""

    def __init__(self, model, requests: list[tuple[list[int], int]], block_size: int = 16) -> None:
        from infopt.runtime.engine import Engine, SamplingParams
        from infopt.runtime.kv_cache import KVCache

        cache = KVCache.for_model(model, 4096, block_size)
        self.engine = Engine(model, cache, eos_ids={2}, max_batch=32)
        self.limit = {}
        for prompt, new in requests:
            request = self.engine.submit(prompt, SamplingParams(max_new_tokens=new))
            self.limit[request] = len(prompt) + new
        self.context = model.shape.max_positions
        self.totals = {"filled": 0, "paged": 0, "contiguous_request": 0, "contiguous_context": 0}

    def run(self) -> dict:
        while self.engine.waiting or self.engine.running:
            self.engine.step()
            pm = self.engine.page_map()
            self.totals["filled"] += pm.filled_slots
            self.totals["paged"] += pm.used_blocks * pm.block_size
            for seq in self.engine.running:
                self.totals["contiguous_request"] += self.limit[seq.request_id]
                self.totals["contiguous_context"] += self.context
        filled = self.totals["filled"]
        return {k: 1 - filled / v for k, v in self.totals.items() if k != "filled"}


def waste_lines(stories: Path) -> list[str]:
    from infopt.models.loading import open_model
    from infopt.runtime.model import load_engine_model

    model = load_engine_model(open_model(str(stories)))
    rng = random.Random(0)
    requests = []
    for _ in range(64):
        prompt = [1] + [rng.randrange(3, 512) for _ in range(rng.randrange(4, 200))]
        requests.append((prompt, rng.randrange(8, 512 - len(prompt))))
    waste = WasteEngine(model, requests).run()
    return ["KV memory waste (share of reserved slots holding no token, weighted by decode steps) on 64 requests to "
            "stories260K with prompts of 5-200 tokens and 8 to (512 - prompt) new tokens (greedy, stopping at EOS), "
            "32 sequences at a time, blocks of 16:", "",
            "| KV layout | waste |", "|---|---|",
            f"| paged (blocks of 16) | **{waste['paged']:.2%}** |",
            f"| contiguous, prompt + max_new_tokens per sequence | {waste['contiguous_request']:.2%} |",
            f"| contiguous, the model's context (512) per sequence | {waste['contiguous_context']:.2%} |",
            "", "Target: paged < 4% (the PagedAttention paper's figure)."]


PREFILL_SCRIPT = """
import json, sys, time, torch
torch.set_num_threads(2)
from infopt.models.loading import open_model
from infopt.runtime import attention
from infopt.runtime.model import load_engine_model
from infopt.runtime.kv_cache import KVCache, BlockTable
from infopt.runtime.attention import BatchLayout
path, tokens, impl = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if impl == "explicit":
    attention.sdpa = attention.explicit_attention
model = load_engine_model(open_model(path))
cache = KVCache.for_model(model, tokens // 16 + 1)
ids = torch.randint(3, 512, (tokens,), generator=torch.Generator().manual_seed(0))
table = BlockTable()
slots = cache.reserve(table, tokens)
layout = BatchLayout.build([0], [tokens], [table.blocks], [slots], 16)
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS (Linux >= 4.0)
before = status("VmRSS")
start = time.perf_counter()
model(ids, layout, cache)
seconds = time.perf_counter() - start
print(json.dumps({"extra": status("VmHWM") - before, "seconds": seconds}))
"""


def prefill_lines() -> list[str]:
    from synthetic import llama_config, make_synthetic_llama

    path = make_synthetic_llama(CACHE / "synthetic-prefill-2x1024", llama_config(2, 1024, 2816, 16, 4, context=8192))
    lines = ["Prefill of one prompt on a synthetic Llama (2 layers x 1024, 16 heads of 64, 4 KV heads): growth of peak "
             "RSS during the prefill over the RSS before it (model and KV cache already allocated; the peak is reset "
             "through /proc/self/clear_refs), each in a fresh process.", "",
             "| prompt tokens | SDPA extra memory | SDPA seconds | explicit softmax(QK^T)V extra memory | explicit seconds "
             "| score matrix (16 heads, fp32) |", "|---|---|---|---|---|---|"]
    for tokens in (1024, 4096, 8192):
        cells = []
        for impl in ("sdpa", "explicit"):
            out = subprocess.run([sys.executable, "-c", PREFILL_SCRIPT, str(path), str(tokens), impl],
                                 capture_output=True, text=True, cwd=ROOT, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            cells += [f"{result['extra'] / 1e6:.0f} MB", f"{result['seconds']:.2f}"]
        lines.append(f"| {tokens} | {' | '.join(cells)} | {16 * tokens * tokens * 4 / 1e6:.0f} MB |")
    lines += ["", "SDPA's memory grows linearly with the prompt (activations and the MLP), the explicit form's with "
              "its square (the score and probability matrices)."]
    return lines


ACTIVATION_WINDOWS = 200  # evaluation windows per row of the int8-activation quality table


def activation_quality_lines(bench_model: Path, stories: Path) -> list[str]:
    """What int8 activations (--kernels ext-a8) cost in quality: int4 RTN checkpoints scored by transformers
    (dequantized) and by the engine with the exact and the int8-activation kernels, against the fp32 model."""
    from infopt.quant.spec import QuantSpec
    from infopt.workflows import make_request, evaluate_checkpoint, quantize

    cases = [(f"bench model ({bench_model.name}), int4 g128 RTN", bench_model, QuantSpec(4, 128, True), "wikitext2", 512),
             ("stories260K, int4 per-channel asym RTN", stories, QuantSpec(4, -1, False), "tinystories", 256)]
    lines = [f"Quality of the int8-activation kernels: int4 RTN checkpoints scored three ways against their fp32 "
             f"source (first {ACTIVATION_WINDOWS} non-overlapping windows; `infopt eval Q --dataset D --baseline "
             "SOURCE --seq-len L --max-windows N [--engine infopt --kernels ext|ext-a8]`).", "",
             "| checkpoint | dataset, window | scored by | perplexity | fp32 perplexity | KL(fp32 \\|\\| int4) | top-1 "
             "agreement |", "|---|---|---|---|---|---|---|"]
    for label, source, spec, dataset, seq_len in cases:
        out = CACHE / f"{source.name}-rtn-{spec.bits}-{spec.group_size}-{'sym' if spec.symmetric else 'asym'}"
        if not (out / "config.json").is_file():
            quantize(make_request(model=str(source), spec=spec, out=out))
        for scorer, engine, kernel in (("transformers (dequantized)", "transformers", None),
                                       ("infopt, exact kernels", "infopt", "ext"),
                                       ("infopt, int8 activations (`ext-a8`)", "infopt", "ext-a8")):
            r = evaluate_checkpoint(str(out), dataset, str(source), seq_len, max_windows=ACTIVATION_WINDOWS,
                                    engine=engine, kernels=kernel)
            lines.append(f"| {label} | {dataset}, {seq_len} | {scorer} | {r['ppl']:.4f} | {r['baseline_ppl']:.4f} | "
                         f"{r['kl_mean']:.5f} | {r['top1_agreement']:.2%} |")
    return lines


def section(stories: Path, bench_model: Path, repeats: int = 7) -> list[str]:
    lines, _ = decode_rows(repeats)
    return (lines + [""] + activation_quality_lines(bench_model, stories) + [""] + waste_lines(stories) + [""]
            + prefill_lines())


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    torch.set_num_threads(2)
    print("\n".join(section(Path(sys.argv[1]), Path(sys.argv[2]))))
