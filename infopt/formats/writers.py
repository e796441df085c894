"""The output formats `infopt quantize --format` can write, behind one small interface.

A format knows how to lay out quantized weights and what to put in config.json; it never knows which
algorithm produced the weights. The workflow asks it which shapes it can pack (the planner leaves the
others dense) and which dtype its scales are stored in (methods then compute with those scales).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from infopt.errors import InfoptError
from infopt.formats import compressed_tensors
from infopt.formats.safetensors_io import ShardedWriter
from infopt.quant.rtn import QuantizedWeight
from infopt.quant.spec import QuantSpec

Items = Iterable[tuple[str, "torch.Tensor | QuantizedWeight"]]


@dataclass(frozen=True)
class OutputFormat:
    name: str
    # dtype the format stores scales in; None: the source weights' dtype
    scale_dtype: torch.dtype | None
    packable: Callable[[tuple[int, int], QuantSpec], str | None]
    write_weights: Callable[[ShardedWriter, Items], dict[str, QuantSpec]]
    # (quantized module specs, modules left dense, method settings) -> quantization_config
    config: Callable[[dict[str, QuantSpec], list[str], dict], dict]
    side_files: Callable[[Path, dict], None] = lambda out_dir, qconfig: None
    # whether act-order with a g_idx can be stored (otherwise act-order uses static groups)
    supports_g_idx: bool = False


def _ct_config(specs: dict[str, QuantSpec], dense: list[str], method: dict) -> dict:
    return compressed_tensors.quantization_config(specs, dense, "weight" if method.get("act_order") else None)


FORMATS: dict[str, OutputFormat] = {
    "compressed-tensors": OutputFormat("compressed-tensors", None, lambda shape, spec: None,
                                       compressed_tensors.write_weights, _ct_config),
}


def output_format(name: str) -> OutputFormat:
    if name not in FORMATS:
        raise InfoptError(f"format {name!r} is not available (available: {', '.join(FORMATS)})")
    return FORMATS[name]
