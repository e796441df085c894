"""bitsandbytes 4-bit (NF4 / FP4) checkpoints: writer and reader.

Layout per quantized linear `M`, as `bitsandbytes.nn.Linear4bit.state_dict()` serializes it (bitsandbytes 0.50,
unchanged since 0.41.3's packed quant state) and transformers' Bnb4BitHfQuantizer loads it:
  M.weight                        quant_storage [ceil(out*in/2) / itemsize, 1]  two codes per byte, even one high
  M.weight.absmax                 float32 [blocks], or uint8 [blocks] with double quantization
  M.weight.quant_map              float32 [16]     the NF4 / FP4 code table
  M.weight.nested_absmax          float32 [ceil(blocks/256)]   double quantization only
  M.weight.nested_quant_map       float32 [256]    the 8-bit dynamic map, double quantization only
  M.weight.quant_state.bitsandbytes__nf4 (or __fp4)  uint8 [len]: the UTF-8 bytes of json.dumps({quant_type,
                                  blocksize, dtype, shape[, nested_blocksize, nested_dtype, nested_offset]})
  M.bias                          dense, when the linear has one
config.json carries `quantization_config` as transformers' BitsAndBytesConfig.to_dict() writes it; linears left dense
are listed in llm_int8_skip_modules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from infopt.errors import InfoptError
from infopt.formats.safetensors_io import ShardedWriter, load_tensors, write_items
from infopt.quant.weights import QUANT_TYPES, FourBitWeight

QUANT_METHOD = "bitsandbytes"
# The bitsandbytes release whose Linear4bit state-dict layout this module writes (see module docstring).
LAYOUT_VERSION = "0.50.2"
_STATE_KEY = "quant_state.bitsandbytes__"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_STORAGE_NAMES = {torch.uint8: "uint8", torch.int8: "int8", **_DTYPE_NAMES}


@dataclass(frozen=True)
class BnbScheme:
    quant_type: str
    blocksize: int
    double_quant: bool
    quant_storage: torch.dtype


def pack_json(data: dict) -> torch.Tensor:
    """A dict as the uint8 tensor of its JSON text (bitsandbytes.utils.pack_dict_to_tensor's encoding)."""
    return torch.tensor(list(json.dumps(data).encode("utf-8")), dtype=torch.uint8)


def unpack_json(tensor: torch.Tensor) -> dict:
    try:
        data = json.loads(bytes(tensor.to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InfoptError("corrupt bitsandbytes quant_state: not JSON") from None
    if not isinstance(data, dict):
        raise InfoptError("corrupt bitsandbytes quant_state: not a JSON object")
    return data


def quant_state_dict(weight: FourBitWeight) -> dict:
    """The non-tensor quant state, keys in QuantState.as_dict() order (the JSON bytes depend on it)."""
    state = {
        "quant_type": weight.quant_type,
        "blocksize": weight.blocksize,
        "dtype": _DTYPE_NAMES[weight.dtype],
        "shape": list(weight.shape),
    }
    if weight.double_quant:
        state.update(nested_blocksize=weight.nested_blocksize, nested_dtype="float32", nested_offset=weight.offset)
    return state


def weight_tensors(module: str, weight: FourBitWeight) -> dict[str, torch.Tensor]:
    """The state-dict entries of one quantized `module.weight`, in Linear4bit's order."""
    prefix = f"{module}.weight"
    tensors = {prefix: weight.packed, f"{prefix}.absmax": weight.absmax, f"{prefix}.quant_map": weight.code}
    if weight.double_quant:
        tensors[f"{prefix}.nested_absmax"] = weight.nested_absmax
        tensors[f"{prefix}.nested_quant_map"] = weight.nested_code
    tensors[f"{prefix}.{_STATE_KEY}{weight.quant_type}"] = pack_json(quant_state_dict(weight))
    return tensors


def _scheme(weight: FourBitWeight) -> BnbScheme:
    return BnbScheme(weight.quant_type, weight.blocksize, weight.double_quant, weight.quant_storage)


def write_weights(
    writer: ShardedWriter, items: Iterable[tuple[str, torch.Tensor | FourBitWeight]]
) -> dict[str, BnbScheme]:
    """Add tensors to the writer; quantized `X.weight` items become Linear4bit's tensor set."""
    return write_items(writer, items, FourBitWeight, weight_tensors, _scheme)


def _dtype_name(dtype: torch.dtype | str, names: dict[torch.dtype, str]) -> str:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if dtype not in names:
        raise InfoptError(f"unsupported bitsandbytes dtype {dtype}: choose one of {', '.join(names.values())}")
    return names[dtype]


def quantization_config(
    quant_type: str,
    double_quant: bool,
    compute_dtype: torch.dtype | str = torch.float32,
    quant_storage: torch.dtype | str = torch.uint8,
    skip_modules: Iterable[str] = (),
) -> dict:
    """`quantization_config` with every key of transformers' BitsAndBytesConfig.to_dict() (transformers 5.x).

    `skip_modules` are the linears left dense; "lm_head" is always added, as transformers itself does when the
    list is absent, since a dense lm_head must not become a Linear4bit on load.
    """
    if quant_type not in QUANT_TYPES:
        raise InfoptError(f"invalid 4-bit quant type {quant_type!r}: choose one of {', '.join(QUANT_TYPES)}")
    return {
        "quant_method": QUANT_METHOD,
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": sorted(set(skip_modules) | {"lm_head"}),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": bool(double_quant),
        "bnb_4bit_compute_dtype": _dtype_name(compute_dtype, _DTYPE_NAMES),
        "bnb_4bit_quant_storage": _dtype_name(quant_storage, _STORAGE_NAMES),
        "load_in_4bit": True,
        "load_in_8bit": False,
    }


def _parse_dtype(name: object, module: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if dtype not in _DTYPE_NAMES:
        raise InfoptError(f"{module}: unsupported bitsandbytes weight dtype {name!r}")
    return dtype


def _pop(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise InfoptError(f"bitsandbytes checkpoint is missing {key}")
    return tensors.pop(key)


def _read_weight(tensors: dict[str, torch.Tensor], module: str, state_key: str) -> FourBitWeight:
    state = unpack_json(tensors.pop(state_key))
    quant_type = state.get("quant_type")
    if quant_type not in QUANT_TYPES or not state_key.endswith("__" + quant_type):
        raise InfoptError(f"{module}: unsupported bitsandbytes quant type {quant_type!r}")
    prefix = f"{module}.weight"
    try:
        shape = tuple(int(d) for d in state["shape"])
        weight = FourBitWeight(
            _pop(tensors, prefix), _pop(tensors, f"{prefix}.absmax"), _pop(tensors, f"{prefix}.quant_map").float(),
            int(state["blocksize"]), quant_type, shape, _parse_dtype(state["dtype"], module),
        )
        if f"{prefix}.nested_absmax" in tensors:
            weight.offset = float(torch.tensor(float(state["nested_offset"]), dtype=torch.float32))
            weight.nested_absmax = tensors.pop(f"{prefix}.nested_absmax").float()
            weight.nested_code = _pop(tensors, f"{prefix}.nested_quant_map").float()
            weight.nested_blocksize = int(state["nested_blocksize"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InfoptError(f"{module}: corrupt bitsandbytes quant_state ({exc.__class__.__name__}: {exc})") from None
    _check_sizes(module, weight)
    return weight


def _check_sizes(module: str, weight: FourBitWeight) -> None:
    numel = 1
    for dim in weight.shape:
        numel *= dim
    blocks = -(-numel // weight.blocksize) if weight.blocksize > 0 else -1
    packed_bytes = weight.packed.numel() * weight.packed.element_size()
    problems = [
        packed_bytes * 2 < numel and f"{packed_bytes} packed bytes for {numel} values",
        weight.absmax.numel() != blocks and f"{weight.absmax.numel()} absmax values for {blocks} blocks",
        weight.code.numel() != 16 and f"a quant_map of {weight.code.numel()} values",
        (weight.absmax.dtype == torch.uint8) != weight.double_quant and "absmax and nested statistics disagree",
    ]
    if weight.double_quant:
        nested = -(-blocks // weight.nested_blocksize) if weight.nested_blocksize > 0 else -1
        problems += [
            weight.nested_absmax.numel() != nested and f"{weight.nested_absmax.numel()} nested absmax values",
            weight.nested_code.numel() != 256 and f"a nested_quant_map of {weight.nested_code.numel()} values",
        ]
    problems = [p for p in problems if p]
    if problems:
        raise InfoptError(f"{module}: corrupt bitsandbytes weight: {'; '.join(problems)}")


def read_quantized(files: list[Path], qconfig: dict) -> tuple[dict[str, FourBitWeight], dict[str, torch.Tensor]]:
    """Split a checkpoint into 4-bit weights (by `X.weight` name) and dense tensors."""
    if qconfig.get("load_in_8bit") or qconfig.get("_load_in_8bit"):
        raise InfoptError("bitsandbytes 8-bit (LLM.int8) checkpoints are not readable; only 4-bit ones are")
    tensors = load_tensors(files)
    marker = f".weight.{_STATE_KEY}"
    quantized = {}
    for key in sorted(k for k in tensors if marker in k):
        module = key.split(marker)[0]
        quantized[f"{module}.weight"] = _read_weight(tensors, module, key)
    return quantized, tensors
