"""Which on-disk formats infopt reads and writes, keyed by `quantization_config.quant_method`."""

from __future__ import annotations

from pathlib import Path

import torch

from infopt.errors import InfoptError
from infopt.formats import awq, bnb, compressed_tensors, gguf, gptq
from infopt.quant.weights import QuantizedWeight

_READERS = {
    compressed_tensors.QUANT_METHOD: compressed_tensors.read_quantized,
    gptq.QUANT_METHOD: gptq.read_quantized,
    bnb.QUANT_METHOD: bnb.read_quantized,
    awq.QUANT_METHOD: awq.read_quantized,
    gguf.QUANT_METHOD: gguf.read_quantized,
}


def read_quantized(files: list[Path], config: dict) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    qconfig = config["quantization_config"]
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else None
    reader = _READERS.get(method)
    if reader is None:
        raise InfoptError(f"quantization format {str(method)[:40]!r} is not readable yet; readable: "
                          f"{', '.join(_READERS)}")
    try:
        return reader(files, qconfig)
    except InfoptError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, OverflowError) as exc:
        # each reader checks the fields it knows; this names what slipped past those checks instead of a traceback
        detail = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise InfoptError(f"{files[0].parent}: the {method} quantization_config or its tensors do not fit together "
                          f"({exc.__class__.__name__}{': ' + detail if detail else ''})") from None


def read_dense_state_dict(files: list[Path], config: dict) -> dict[str, torch.Tensor]:
    """Every weight as a plain tensor, quantized ones dequantized."""
    quantized, dense = read_quantized(files, config)
    dense.update({name: q.dequantize() for name, q in quantized.items()})
    return dense
