"""One GPU session's checks beyond the kernel micro-benchmarks (gpu_check.py): `--device cuda` quantization against
the CPU result, and the runtime's decode speed on CUDA (Triton int4/int8 against dense fp16/fp32).

    python benchmarks/gpu_session.py --bench-model DIR --out DIR

Writes gpu_session.json and gpu_session.md to --out. Needs a CUDA device; the data folder ($INFOPT_DATA_DIR) must
hold the stories260K tokenizer and the WikiText-2 test text.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def quantize_on(device: str, model: Path, method: str, out: Path) -> float:
    from infopt.quant.spec import QuantSpec
    from infopt.workflows import CalibrationData, make_request, quantize

    start = time.perf_counter()
    quantize(make_request(model=str(model), spec=QuantSpec(4, 128, method != "gptq"), out=out, method=method,
                          calibration=CalibrationData(dataset="wikitext2", samples=64, seq_len=512), device=device,
                          force=True))
    return time.perf_counter() - start


def quantization_rows(bench_model: Path, work: Path) -> tuple[list[str], dict]:
    from infopt.formats.registry import read_quantized
    from infopt.models.loading import open_model
    from infopt.workflows import evaluate_checkpoint

    rows, data = [], {}
    for method in ("gptq", "awq"):
        result = {}
        for device in ("cuda", "cpu"):
            out = work / f"{method}-{device}"
            seconds = quantize_on(device, bench_model, method, out)
            ppl = evaluate_checkpoint(str(out), "wikitext2", max_windows=40)["ppl"]
            result[device] = {"seconds": seconds, "ppl": ppl, "path": out}
        a = read_quantized(open_model(str(result["cuda"]["path"])).files, open_model(str(result["cuda"]["path"])).config)[0]
        b = read_quantized(open_model(str(result["cpu"]["path"])).files, open_model(str(result["cpu"]["path"])).config)[0]
        same = sum(int((a[k].codes == b[k].codes).sum()) for k in a) / sum(a[k].codes.numel() for k in a)
        data[method] = {d: {k: v for k, v in r.items() if k != "path"} for d, r in result.items()} | {"same_codes": same}
        rows.append(f"| {method} int4 g128 | {result['cuda']['seconds']:.1f} | {result['cpu']['seconds']:.1f} | "
                    f"{result['cuda']['ppl']:.4f} | {result['cpu']['ppl']:.4f} | {same:.2%} |")
    lines = ["Bench model, 64 x 512 WikiText-2 calibration windows, perplexity on 40 windows of wiki.test.raw; "
             "CPU = the GPU machine's 16 cores.", "",
             "| method | cuda seconds | cpu seconds | cuda ppl | cpu ppl | identical codes |", "|---|---|---|---|---|---|"]
    return lines + rows, data


def decode_rate(model, tokens: int = 64, sequences: int = 1) -> float:
    from infopt.runtime.engine import Engine, SamplingParams
    from infopt.runtime.kv_cache import KVCache

    engine = Engine(model, KVCache.for_model(model, 1024), max_batch=64)
    for i in range(sequences):
        engine.submit([1] + list(range(100, 115)) + [200 + i], SamplingParams(max_new_tokens=tokens + 1))
    torch.cuda.synchronize()
    engine.run()
    return engine.timings.decode_tokens / engine.timings.decode_seconds


def runtime_rows(work: Path) -> tuple[list[str], dict]:
    from synthetic import llama_config, make_synthetic_llama

    from infopt.models.loading import open_model
    from infopt.quant.spec import QuantSpec
    from infopt.runtime.model import load_engine_model
    from infopt.workflows import make_request, quantize

    source = make_synthetic_llama(work / "synthetic-541m", llama_config(12, 2048, 5632, 16, 4, context=4096))
    variants = {"fp32": (source, torch.float32), "fp16": (source, torch.float16)}
    for name, spec in {"int8": QuantSpec(8, -1, True), "int4-g128": QuantSpec(4, 128, True)}.items():
        out = work / f"synthetic-{name}"
        quantize(make_request(model=str(source), spec=spec, out=out, force=True))
        variants[name] = (out, torch.float16)
    lines = ["Synthetic Llama, 541M parameters (12 x 2048, random weights), greedy decode of 64 tokens after a "
             "17-token prompt; quantized linears through the Triton kernels, activations fp16.", "",
             "| weights | weight bytes | tok/s batch 1 | tok/s batch 16 (summed) |", "|---|---|---|---|"]
    data = {}
    for name, (path, dtype) in variants.items():
        model = load_engine_model(open_model(str(path)), dtype, device="cuda")
        decode_rate(model, 4)
        rate = statistics.median(decode_rate(model) for _ in range(3))
        batch = decode_rate(model, sequences=16)
        data[name] = {"weight_bytes": model.weight_bytes, "tok_s": rate, "tok_s_batch16": batch}
        lines.append(f"| {name} | {model.weight_bytes / 1e6:.0f} MB | {rate:.1f} | {batch:.1f} |")
        del model
        torch.cuda.empty_cache()
    return lines, data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bench-model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/infopt-gpu"))
    parser.add_argument("--skip", action="append", default=[], choices=["quant", "runtime"])
    args = parser.parse_args()
    torch.set_num_threads(16)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    md = [f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}.", ""]
    report = {}
    for name, run in (("runtime", lambda: runtime_rows(args.work)), ("quant", lambda: quantization_rows(args.bench_model, args.work))):
        if name in args.skip:
            continue
        start = time.perf_counter()
        try:
            lines, data = run()
            report[name] = data
            md += lines + [""]
        except Exception as exc:  # one failing part must not hide the others' results
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
            md += [f"{name}: failed: {type(exc).__name__}: {exc}", ""]
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
        (args.out / "gpu_session.json").write_text(json.dumps(report, indent=2, default=str))
        (args.out / "gpu_session.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
