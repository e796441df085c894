"""The output formats `infopt quantize --format` can write, behind one small interface.

A format knows how to lay out quantized weights and what to put in config.json; it never knows which
algorithm produced the weights. The workflow asks it which kind of weights it stores (integer codes or
4-bit tables), which shapes it can pack (the planner leaves the others dense) and what its storage can
represent (scale dtype, lowest zero point, a g_idx), which the methods then quantize against. What it
records about the method comes as a typed MethodRecord.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from infopt.errors import InfoptError
from infopt.formats import awq, bnb, compressed_tensors, gptq
from infopt.formats.safetensors_io import ShardedWriter
from infopt.quant.methods import FOUR_BIT, INTEGER, Method
from infopt.quant.spec import QuantSpec
from infopt.quant.weights import MethodRecord, Storage

Items = Iterable[tuple[str, object]]


@dataclass(frozen=True)
class OutputFormat:
    name: str
    weights: str  # the kind of weights it stores: INTEGER or FOUR_BIT
    storage: Storage
    packable: Callable[[tuple[int, int], QuantSpec], str | None]
    write_weights: Callable[[ShardedWriter, Items], dict]
    # (quantized module specs, modules left dense, how the weights were made) -> quantization_config
    config: Callable[[dict, list[str], MethodRecord], dict]
    side_files: Callable[[Path, dict], object] = lambda out_dir, qconfig: None
    uniform_spec: bool = False  # one bits/group/sym for the whole model
    decoder_layers_only: bool = False  # cannot store a quantized lm_head
    single_file: bool = False  # one file, not a folder (GGUF: the workflow hands it to gguf.write_model)


def _ct_config(specs: dict, dense: list[str], record: MethodRecord) -> dict:
    return compressed_tensors.quantization_config(specs, dense, "weight" if record.act_order else None)


def _gptq_config(specs: dict, dense: list[str], record: MethodRecord) -> dict:
    settings = {"desc_act": record.act_order and not record.static_groups, "static_groups": record.static_groups}
    if record.damp is not None:
        settings["damp_percent"] = record.damp
    if record.true_sequential is not None:
        settings["true_sequential"] = record.true_sequential
    return gptq.quantization_config(specs, dense, settings)


def _gptq_write(writer: ShardedWriter, items: Items) -> dict:
    return gptq.write_weights(writer, items, desc_act=None)


def _awq_config(specs: dict, dense: list[str], record: MethodRecord) -> dict:
    return awq.quantization_config(specs, dense)


def _bnb_config(specs: dict, dense: list[str], record: MethodRecord) -> dict:
    return bnb.quantization_config(record.quant_type, record.double_quant, record.compute_dtype, torch.uint8, dense)


def _gguf_packable(shape: tuple[int, int], spec: QuantSpec) -> str | None:
    return None if shape[1] % 32 == 0 else f"{shape[1]} input columns do not split into GGUF blocks of 32"


def _single_file(*args):  # pragma: no cover - single-file formats never reach the folder writer
    raise InfoptError("a single-file format has no folder writer")


FORMATS: dict[str, OutputFormat] = {
    "compressed-tensors": OutputFormat("compressed-tensors", INTEGER, Storage(), lambda shape, spec: None,
                                       compressed_tensors.write_weights, _ct_config),
    # GPTQ v1 (AutoGPTQ layout): fp16 scales, zero points stored minus one, a g_idx per column
    "gptq": OutputFormat("gptq", INTEGER, Storage(torch.float16, 1, g_idx=True), gptq.packable, _gptq_write,
                         _gptq_config, gptq.side_files, uniform_spec=True, decoder_layers_only=True),
    # AutoAWQ GEMM: fp16 scales, zero points stored as they are
    "awq": OutputFormat("awq", INTEGER, Storage(torch.float16), awq.packable, awq.write_weights, _awq_config,
                        uniform_spec=True, decoder_layers_only=True),
    "bnb": OutputFormat("bnb", FOUR_BIT, Storage(), lambda shape, spec: None, bnb.write_weights, _bnb_config),
    # llama.cpp: fp16 block scales; a row must split into blocks of 32
    "gguf": OutputFormat("gguf", INTEGER, Storage(torch.float16), _gguf_packable, _single_file, _single_file,
                         decoder_layers_only=True, single_file=True),
}


def output_format(name: str, method: Method) -> OutputFormat:
    if name not in FORMATS:
        raise InfoptError(f"format {name!r} is not available (available: {', '.join(FORMATS)})")
    fmt = FORMATS[name]
    if method.weights != fmt.weights:
        stores = [n for n, f in FORMATS.items() if f.weights == method.weights]
        raise InfoptError(f"--format {name} stores {fmt.weights} weights, not those of --method {method.name} "
                          f"(formats for it: {', '.join(stores)})")
    return fmt
