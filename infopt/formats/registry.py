"""Which on-disk formats infopt reads and writes, keyed by `quantization_config.quant_method`."""

from __future__ import annotations

from pathlib import Path

import torch

from infopt.errors import InfoptError
from infopt.formats import awq, bnb, compressed_tensors, gptq
from infopt.quant.weights import QuantizedWeight

_READERS = {
    compressed_tensors.QUANT_METHOD: compressed_tensors.read_quantized,
    gptq.QUANT_METHOD: gptq.read_quantized,
    bnb.QUANT_METHOD: bnb.read_quantized,
    awq.QUANT_METHOD: awq.read_quantized,
}


def read_quantized(files: list[Path], config: dict) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    qconfig = config["quantization_config"]
    method = qconfig.get("quant_method")
    reader = _READERS.get(method)
    if reader is None:
        raise InfoptError(f"quantization format {method!r} is not readable yet; readable: {', '.join(_READERS)}")
    return reader(files, qconfig)


def read_dense_state_dict(files: list[Path], config: dict) -> dict[str, torch.Tensor]:
    """Every weight as a plain tensor, quantized ones dequantized."""
    quantized, dense = read_quantized(files, config)
    dense.update({name: q.dequantize() for name, q in quantized.items()})
    return dense
