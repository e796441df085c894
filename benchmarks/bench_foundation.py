"""Foundation benchmarks: RTN + packing speed next to compressed-tensors, and RTN quality on stories260K.

A section of BENCHMARKS.md, run by benchmarks/run.py (`make bench`).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from infopt.formats.packing import pack_int32
from infopt.paths import require_data_file
from infopt.quant.rtn import quantize_rtn
from infopt.quant.spec import QuantSpec
from infopt.workflows import make_request, convert_llama2c, evaluate_checkpoint, quantize



def _theirs(weight: torch.Tensor, spec: QuantSpec):
    """compressed-tensors' own path: minmax qparams, quantize, pack_to_int32."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    strategy = "channel" if spec.group_size == -1 else "group"
    args = QuantizationArgs(num_bits=spec.bits, symmetric=spec.symmetric, strategy=strategy,
                            group_size=None if spec.group_size == -1 else spec.group_size)
    out_f, in_f = weight.shape
    grouped = weight.reshape(out_f, spec.num_groups(in_f), -1)
    scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    codes = ct_quantize(weight, scale, zero, args, dtype=torch.int8)
    return pack_to_int32(codes, spec.bits)


def _ours(weight: torch.Tensor, spec: QuantSpec):
    q = quantize_rtn(weight, spec)
    return pack_int32(q.codes, spec.bits)


def speed_table(repeats: int) -> list[str]:
    rows = ["| weight | scheme | infopt ms (median) | compressed-tensors ms (median) | ratio | identical packed bytes |",
            "| --- | --- | ---: | ---: | ---: | --- |"]
    gen = torch.Generator().manual_seed(0)
    for shape in [(4096, 4096), (11008, 4096)]:
        weight = torch.randn(*shape, generator=gen) * 0.02
        for spec in [QuantSpec(4, 128, True), QuantSpec(8, -1, True)]:
            ours, theirs = [], []
            for _ in range(repeats):  # alternate so drift hits both alike
                for fn, bucket in ((_ours, ours), (_theirs, theirs)):
                    start = time.perf_counter()
                    fn(weight, spec)
                    bucket.append((time.perf_counter() - start) * 1000)
            same = torch.equal(_ours(weight, spec), _theirs(weight, spec))
            o, t = statistics.median(ours), statistics.median(theirs)
            rows.append(f"| {shape[0]}x{shape[1]} fp32 | {spec.describe()} | {o:.1f} | {t:.1f} | {o / t:.2f}x | {'yes' if same else 'no'} |")
    return rows


QUALITY_SPECS = [QuantSpec(8, -1, True), QuantSpec(8, -1, False), QuantSpec(4, -1, True), QuantSpec(4, -1, False),
                 QuantSpec(4, 4, False), QuantSpec(3, -1, False), QuantSpec(2, 4, False)]


def quality_table(work: Path) -> list[str]:
    folder = require_data_file("tinyllamas-stories260K/stories260K.bin").parent
    work.mkdir(parents=True, exist_ok=True)
    fp = work / "fp32"
    convert_llama2c(folder / "stories260K.bin", folder / "tok512.model", fp)
    base = evaluate_checkpoint(str(fp), "tinystories")
    rows = [f"Text: TinyStories validation file, {base['windows']} windows x {base['seq_len']} tokens "
            f"({base['tokens']} scored tokens).", "",
            "| model | weight bytes | perplexity | vs fp32 | KL(fp32 ‖ q) | top-1 agreement |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            f"| fp32 | {(fp / 'model.safetensors').stat().st_size:,} | {base['ppl']:.4f} | | | |"]
    for spec in QUALITY_SPECS:
        out = work / spec.describe().replace(" ", "-")
        quantize(make_request(model=str(fp), spec=spec, out=out))
        r = evaluate_checkpoint(str(out), "tinystories", baseline=str(fp))
        size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        rows.append(f"| RTN {spec.describe()} | {size:,} | {r['ppl']:.4f} | {r['ppl_delta_rel']:+.2%} | "
                    f"{r['kl_mean']:.5f} | {r['top1_agreement']:.2%} |")
    return rows


def section(work: Path, repeats: int = 7) -> list[str]:
    speed = speed_table(repeats)
    quality = quality_table(work / "foundation")
    return [
        "### RTN quantize + pack, side by side with compressed-tensors",
        "",
        "Time to turn one fp32 weight into packed int32 codes plus scales (compressed-tensors: its minmax",
        "`calculate_qparams`, `quantize` and `pack_to_int32`). Ratio < 1 means infopt is faster. The last",
        f"column checks that both produce the same packed tensor. Medians of {repeats} alternating runs.",
        "",
        *speed,
        "",
        "### RTN quality on stories260K",
        "",
        "stories260K (Karpathy's 260K-parameter Llama) has 64 inputs on every linear but `down_proj` (172),",
        "so only group sizes dividing both (4, or per-channel) quantize every linear. Tiny models are",
        "fragile under quantization; the ordering, not the magnitude, carries over to large models.",
        "",
        *quality,
    ]
