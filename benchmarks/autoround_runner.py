"""Quantize one model with Intel's auto-round on given calibration windows, for side-by-side benchmarks.

Run with the python of the auto-round venv (`python benchmarks/peer_env.py autoround` prints it):

    AR=$(python benchmarks/peer_env.py autoround)
    $AR benchmarks/autoround_runner.py --model DIR --calib calib.safetensors --bits 2 --group-size 64 --asym \\
        --iters 200 --batch 8 --out OUT --threads 2

`--calib` holds one int64 tensor `input_ids` [N, L], the windows infopt calibrates on; they reach auto-round as
token tensors (no tokenization, no resampling). auto-round runs with its defaults otherwise (on this CPU its tuned
layers come back in bf16). The result is written as a plain full-precision Hugging Face folder holding exactly the
weights a packed checkpoint would dequantize to, (q - zp) * scale with auto-round's stored fp16 scales and integer
zero points, so infopt's perplexity code scores it like any model and no export path is in between (auto-round
0.16.1's "fake" export writes the original weights back, measured here). CPU only. The last stdout line is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, required=True)
    parser.add_argument("--asym", action="store_true")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from auto_round import AutoRound

    ids = load_file(str(args.calib))["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    batches = [ids[i : i + args.batch] for i in range(0, ids.shape[0], args.batch)]
    rounder = AutoRound(model, tokenizer=tokenizer, bits=args.bits, group_size=args.group_size, sym=not args.asym,
                        dataset=batches, nsamples=ids.shape[0], seqlen=ids.shape[1], batch_size=args.batch,
                        iters=args.iters, device_map="cpu", seed=0)
    rounder.quantize()
    seconds = time.perf_counter() - start
    exact = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    quantized = 0
    for name, module in rounder.model.named_modules():
        scale, zero = getattr(module, "scale", None), getattr(module, "zp", None)
        if not isinstance(scale, torch.Tensor) or not hasattr(module, "weight"):
            continue
        out_f, in_f = module.weight.shape
        scale = scale.float().reshape(out_f, -1, 1)
        zero = torch.zeros_like(scale) if not isinstance(zero, torch.Tensor) else zero.float().reshape(out_f, -1, 1)
        w = module.weight.detach().float().reshape(out_f, scale.shape[1], -1)
        levels = torch.round(w / scale + zero)  # the stored codes: exact, |w - (q - zp) * s| << s/2
        target = exact.get_submodule(name)
        target.weight.data = ((levels - zero) * scale).reshape(out_f, in_f)
        quantized += 1
    exact.save_pretrained(str(args.out))
    tokenizer.save_pretrained(str(args.out))
    print(json.dumps({"seconds": seconds, "windows": list(ids.shape), "quantized_linears": quantized}))


if __name__ == "__main__":
    main()
