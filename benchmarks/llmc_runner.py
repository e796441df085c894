"""Quantize one model with llm-compressor on given calibration windows, for side-by-side benchmarks.

Run with the python of the llm-compressor venv (`python benchmarks/peer_env.py llmc` prints it), never
with infopt's own venv:

    LLMC=$(python benchmarks/peer_env.py llmc)
    $LLMC benchmarks/llmc_runner.py --model DIR --calib calib.safetensors --method gptq \\
        --bits 4 --group-size 128 --sym --actorder none --damp 0.01 --out OUT --threads 2

`--calib` is a safetensors file with one int64 tensor `input_ids` [N, L]: the exact windows infopt
calibrates on. They reach llm-compressor untouched, in file order: no tokenization, no shuffling,
no truncation (see `calibration_loader`). CPU only. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

# --- calibration data -------------------------------------------------------------------------


def load_windows(path: Path) -> torch.Tensor:
    """The [N, L] int64 `input_ids` tensor of a calibration file."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if set(tensors) != {"input_ids"}:
        raise SystemExit(f"{path}: expected one tensor 'input_ids', found {sorted(tensors)}")
    ids = tensors["input_ids"]
    if ids.dtype != torch.int64 or ids.dim() != 2:
        raise SystemExit(f"{path}: input_ids must be int64 [N, L], got {ids.dtype} {list(ids.shape)}")
    return ids


class RecordingCollator:
    """llm-compressor's own truncating collator, recording each batch it builds (to check order)."""

    def __init__(self, max_seq_length: int) -> None:
        from llmcompressor.datasets.utils import DataCollatorWithTruncation

        self.inner = DataCollatorWithTruncation(max_seq_length)
        self.seen: list[torch.Tensor] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(features)
        self.seen.append(batch["input_ids"].clone())
        return batch


def calibration_loader(ids: torch.Tensor) -> tuple[torch.utils.data.DataLoader, RecordingCollator]:
    """A sequential DataLoader over a `datasets.Dataset` of the windows, batch size 1.

    We hand `oneshot` a DataLoader rather than the Dataset: for a Dataset, llm-compressor 0.14
    samples with RandomSampler (shuffle_calibration_samples=True) or with LengthAwareSampler,
    whose unstable `torch.argsort` permutes equal-length rows. A DataLoader is used as given.
    """
    from datasets import Dataset

    rows = ids.tolist()
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    collator = RecordingCollator(ids.shape[1])
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collator)
    return loader, collator


def order_preserved(ids: torch.Tensor, collator: RecordingCollator) -> bool:
    """Did llm-compressor consume every window, whole, in file order (its last full pass)?"""
    seen = collator.seen[-ids.shape[0]:]
    return len(seen) == ids.shape[0] and all(torch.equal(s[0], row) for s, row in zip(seen, ids))


# --- recipes ----------------------------------------------------------------------------------


def weight_scheme(bits: int, group_size: int, symmetric: bool) -> dict[str, Any]:
    """config_groups for integer weight-only quantization of every Linear."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    strategy = "channel" if group_size == -1 else "group"
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                               group_size=None if group_size == -1 else group_size)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def gptq_recipe(args: argparse.Namespace, symmetric: bool) -> list[Any]:
    from llmcompressor.modifiers.gptq import GPTQModifier

    # llm-compressor's default actorder is "static"; None must be passed explicitly
    actorder = None if args.actorder == "none" else args.actorder
    return [GPTQModifier(config_groups=weight_scheme(args.bits, args.group_size, symmetric),
                         ignore=["lm_head"], dampening_frac=args.damp,
                         block_size=args.block_size, actorder=actorder)]


def awq_recipe(args: argparse.Namespace, symmetric: bool) -> list[Any]:
    """AWQ only rescales weights; a QuantizationModifier then applies the weight scheme (RTN)."""
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    duo: bool | str = {"true": True, "false": False, "both": "both"}[args.duo_scaling]
    return [AWQModifier(duo_scaling=duo, n_grid=args.n_grid),
            QuantizationModifier(config_groups=weight_scheme(args.bits, args.group_size, symmetric),
                                 ignore=["lm_head"])]


# --- CPU workarounds --------------------------------------------------------------------------


def patch_for_cpu() -> None:
    """AWQ pins its cached activations for faster host-to-GPU copies; pinning fails without an
    accelerator, and is pointless on CPU, so make it a no-op there."""
    if torch.accelerator.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="Hugging Face model folder")
    p.add_argument("--calib", type=Path, required=True, help="safetensors file, input_ids int64 [N, L]")
    p.add_argument("--method", choices=["gptq", "awq"], required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128, help="-1 for per-channel")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None)
    sym.add_argument("--asym", dest="sym", action="store_false")
    p.add_argument("--actorder", choices=["none", "static", "weight", "group"], default="none",
                   help="gptq only; static is an alias of weight")
    p.add_argument("--damp", type=float, default=0.01, help="gptq dampening_frac")
    p.add_argument("--block-size", type=int, default=128, help="gptq block size")
    p.add_argument("--duo-scaling", choices=["true", "false", "both"], default="true", help="awq")
    p.add_argument("--n-grid", type=int, default=20, help="awq grid points")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    if args.group_size == 0 or args.group_size < -1:
        p.error("--group-size must be positive or -1")
    if args.actorder == "group":
        p.error("actorder 'group' (g_idx) was removed in compressed-tensors 0.19, which "
                "llmcompressor 0.14 needs; use none or static/weight")
    return args


def versions() -> dict[str, str]:
    import compressed_tensors
    import llmcompressor
    import transformers

    return {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # default: sym for GPTQ (llm-compressor's W4A16), asym for AWQ (its W4A16_ASYM)
    symmetric = args.sym if args.sym is not None else args.method == "gptq"

    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    patch_for_cpu()
    ids = load_windows(args.calib)
    loader, collator = calibration_loader(ids)
    recipe = gptq_recipe(args, symmetric) if args.method == "gptq" else awq_recipe(args, symmetric)

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, device_map=None)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    seconds_load = time.perf_counter() - start

    start = time.perf_counter()
    oneshot(model=model, processor=tokenizer, recipe=recipe, dataset=loader,
            num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1],
            shuffle_calibration_samples=False, batch_size=1)
    seconds_total = time.perf_counter() - start

    start = time.perf_counter()
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    seconds_save = time.perf_counter() - start

    result = {"method": args.method, "bits": args.bits, "group_size": args.group_size,
              "symmetric": symmetric, "actorder": args.actorder if args.method == "gptq" else None,
              "damp": args.damp if args.method == "gptq" else None,
              "duo_scaling": args.duo_scaling if args.method == "awq" else None,
              "samples": ids.shape[0], "seq_len": ids.shape[1], "threads": args.threads,
              "dtype": str(next(model.parameters()).dtype), "windows_in_order": order_preserved(ids, collator),
              "seconds_load": round(seconds_load, 3), "seconds_total": round(seconds_total, 3),
              "seconds_save": round(seconds_save, 3), "out": str(args.out), **versions()}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
