"""The output formats `infopt quantize --format` can write, behind one small interface.

A format knows how to lay out quantized weights and what to put in config.json; it never knows which
algorithm produced the weights. The workflow asks it which methods' weights it stores, which shapes
it can pack (the planner leaves the others dense) and what its storage can represent (scale dtype,
lowest zero point), which the methods then quantize against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from infopt.errors import InfoptError
from infopt.formats import awq, bnb, compressed_tensors, gptq
from infopt.formats.safetensors_io import ShardedWriter
from infopt.quant.rtn import Storage
from infopt.quant.spec import QuantSpec

Items = Iterable[tuple[str, object]]
INTEGER_METHODS = ("rtn", "gptq", "awq")
FOUR_BIT_METHODS = ("nf4", "fp4")


@dataclass(frozen=True)
class OutputFormat:
    name: str
    methods: tuple[str, ...]  # which methods' weights it stores
    storage: Storage
    packable: Callable[[tuple[int, int], QuantSpec], str | None]
    write_weights: Callable[[ShardedWriter, Items], dict]
    # (quantized module specs, modules left dense, method settings) -> quantization_config
    config: Callable[[dict, list[str], dict], dict]
    side_files: Callable[[Path, dict], object] = lambda out_dir, qconfig: None
    supports_g_idx: bool = False  # act-order with a g_idx; otherwise act-order uses static groups
    uniform_spec: bool = False  # one bits/group/sym for the whole model
    decoder_layers_only: bool = False  # cannot store a quantized lm_head


def _ct_config(specs: dict, dense: list[str], method: dict) -> dict:
    return compressed_tensors.quantization_config(specs, dense, "weight" if method.get("act_order") else None)


def _gptq_config(specs: dict, dense: list[str], method: dict) -> dict:
    settings = {"desc_act": bool(method.get("act_order")) and not method.get("static_groups"),
                "static_groups": bool(method.get("static_groups")), "damp_percent": method.get("damp", 0.01),
                "true_sequential": True}
    return gptq.quantization_config(specs, dense, settings)


def _gptq_write(writer: ShardedWriter, items: Items) -> dict:
    return gptq.write_weights(writer, items, desc_act=None)


def _bnb_config(specs: dict, dense: list[str], method: dict) -> dict:
    return bnb.quantization_config(method["quant_type"], method["double_quant"], method["compute_dtype"],
                                   torch.uint8, dense)


FORMATS: dict[str, OutputFormat] = {
    "compressed-tensors": OutputFormat("compressed-tensors", INTEGER_METHODS, Storage(), lambda shape, spec: None,
                                       compressed_tensors.write_weights, _ct_config),
    # GPTQ v1 (AutoGPTQ layout): fp16 scales, zero points stored minus one
    "gptq": OutputFormat("gptq", INTEGER_METHODS, Storage(torch.float16, 1), gptq.packable, _gptq_write,
                         _gptq_config, gptq.side_files, supports_g_idx=True, uniform_spec=True,
                         decoder_layers_only=True),
    # AutoAWQ GEMM: fp16 scales, zero points stored as they are
    "awq": OutputFormat("awq", INTEGER_METHODS, Storage(torch.float16), awq.packable, awq.write_weights,
                        awq.quantization_config, uniform_spec=True, decoder_layers_only=True),
    "bnb": OutputFormat("bnb", FOUR_BIT_METHODS, Storage(), lambda shape, spec: None, bnb.write_weights,
                        _bnb_config),
}
DEFAULT_FORMAT = {"rtn": "compressed-tensors", "gptq": "compressed-tensors", "awq": "compressed-tensors", "nf4": "bnb", "fp4": "bnb"}


def output_format(name: str, method: str) -> OutputFormat:
    if name not in FORMATS:
        raise InfoptError(f"format {name!r} is not available (available: {', '.join(FORMATS)})")
    fmt = FORMATS[name]
    if method not in fmt.methods:
        raise InfoptError(f"--format {name} stores {'/'.join(fmt.methods)} weights, not --method {method}")
    return fmt
