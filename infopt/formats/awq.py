"""AWQ "GEMM" checkpoints (AutoAWQ's WQLinear_GEMM layout, read by transformers via GPTQModel, vLLM and TGI).

Layout per quantized linear `M`, 4-bit only, G = in / group_size groups:
  M.qweight  int32 [in, out/8]   unsigned codes packed along the OUTPUT dimension, 8 per word
  M.qzeros   int32 [G, out/8]    unsigned zero points, packed the same way, stored as is (no "minus one")
  M.scales   fp16  [G, out]
Within word j of a row, nibble i (bits 4i..4i+3) holds output column 8j + ORDER[i] with
ORDER = [0, 2, 4, 6, 1, 3, 5, 7] (AutoAWQ `WQLinear_GEMM.from_linear` order_map; GPTQModel 7.6
`quantization/awq/utils/packing_utils.AWQ_ORDER`). Unsigned code = signed level + 8;
w = (code - zero) * scale. Every AWQ kernel subtracts the stored zeros, also for `zero_point: false`,
so symmetric weights are written with zero 8, as GPTQModel 7.6's AWQ quantizer does.
config.json carries `quantization_config` with quant_method "awq" and version "gemm".
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import torch

from infopt.errors import InfoptError
from infopt.formats.gptq import _block_of, _has_act_order
from infopt.formats.packing import pack_int32, unpack_int32
from infopt.formats.safetensors_io import ShardedWriter, load_tensors, write_items
from infopt.quant.weights import QuantizedWeight
from infopt.quant.spec import QuantSpec

QUANT_METHOD = "awq"
VERSION = "gemm"
BITS = 4
SUFFIXES = ("qweight", "qzeros", "scales")
ORDER = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
REVERSE_ORDER = torch.argsort(ORDER)  # [0, 4, 1, 5, 2, 6, 3, 7]
# GPTQModel 7.6's AWQ kernels take groups of 16..128; AutoAWQ's and vLLM's CUDA GEMM kernel needs
# out % 64 == 0, group % 32 == 0 and out % group == 0 ("OC is not multiple of Group size").
GROUP_SIZES = (32, 64, 128)
_OUT_MULTIPLE = 64


def packable(shape: tuple[int, int], spec: QuantSpec) -> str | None:
    """None if an [out, in] linear with `spec` can be stored as AWQ GEMM, else why not."""
    out_f, in_f = shape
    if spec.bits != BITS:
        return "AWQ GEMM stores 4-bit weights only"
    if spec.group_size not in GROUP_SIZES:
        return f"AWQ GEMM kernels take group sizes {', '.join(map(str, GROUP_SIZES))}"
    if in_f % spec.group_size:
        return f"in_features {in_f} not divisible by group size {spec.group_size}"
    if out_f % _OUT_MULTIPLE or out_f % spec.group_size:
        return f"AWQ GEMM kernels need out_features divisible by {_OUT_MULTIPLE} and by the group size"
    return None


def _interleave(columns: torch.Tensor) -> torch.Tensor:
    """[rows, out] in natural order -> AWQ's nibble order within each block of 8 columns."""
    rows, out_f = columns.shape
    return columns.reshape(rows, out_f // 8, 8)[:, :, ORDER].reshape(rows, out_f)


def _deinterleave(columns: torch.Tensor) -> torch.Tensor:
    rows, out_f = columns.shape
    return columns.reshape(rows, out_f // 8, 8)[:, :, REVERSE_ORDER].reshape(rows, out_f)


def pack_columns(levels: torch.Tensor) -> torch.Tensor:
    """Signed int8 levels [rows, out] -> AWQ-packed int32 words [rows, out/8]."""
    return pack_int32(_interleave(levels), BITS, dim=1)


def unpack_columns(words: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_columns`."""
    return _deinterleave(unpack_int32(words, BITS, words.shape[1] * 8, dim=1))


def _check_module(module: str, value: QuantizedWeight) -> None:
    reason = packable(value.shape, value.spec)
    if reason:
        raise InfoptError(f"{module}: cannot be written as AWQ: {reason}")
    if _block_of(module) is None:
        # transformers' default skips and vLLM's ParallelLMHead leave lm_head dense
        raise InfoptError(f"{module}: AWQ loaders quantize only linears inside the decoder blocks; leave it dense")
    if _has_act_order(value):
        raise InfoptError(f"{module}: AWQ has no g_idx, so act-order group assignments cannot be stored")


def _fp16_scales(module: str, scale: torch.Tensor) -> torch.Tensor:
    half = scale.to(torch.float16)
    if not bool(torch.isfinite(half).all()) or not torch.equal(half.to(scale.dtype), scale):
        raise InfoptError(f"{module}: scales are not exact float16 values, which AWQ stores them in; "
                          "quantize with float16 scales")
    return half.t().contiguous()


def _awq_tensors(module: str, value: QuantizedWeight) -> dict[str, torch.Tensor]:
    zero = value.zero
    if zero is None:
        zero = torch.zeros_like(value.scale, dtype=torch.int8)  # unsigned 8
    return {
        f"{module}.qweight": pack_columns(value.codes.t().contiguous()),
        f"{module}.qzeros": pack_columns(zero.t().contiguous()),
        f"{module}.scales": _fp16_scales(module, value.scale),
    }


def _module_tensors(module: str, value: QuantizedWeight) -> dict[str, torch.Tensor]:
    _check_module(module, value)
    return _awq_tensors(module, value)


def write_weights(
    writer: ShardedWriter, items: Iterable[tuple[str, torch.Tensor | QuantizedWeight]]
) -> dict[str, QuantSpec]:
    """Add tensors to the writer; quantized `X.weight` items become AWQ's tensor set (one spec for all)."""
    specs = write_items(writer, items, QuantizedWeight, _module_tensors, lambda value: value.spec)
    if len(set(specs.values())) > 1:
        _raise_mixed(set(specs.values()))
    return specs


def _raise_mixed(specs: set[QuantSpec]) -> None:
    described = ", ".join(sorted(s.describe() for s in specs))
    raise InfoptError(f"AWQ checkpoints hold one scheme for all layers, got {described}; use compressed-tensors")


def quantization_config(module_specs: dict[str, QuantSpec], dense_modules: list[str]) -> dict:
    """config.json `quantization_config`. AWQ loaders read no algorithm settings.

    `modules_to_not_convert` names every dense linear: transformers converts all other nn.Linear
    (re.match / endswith per entry), vLLM skips prefixes containing an entry. GPTQModel.load reads
    neither, so in-block dense linears also get its `dynamic` "-:" patterns.
    """
    if not module_specs:
        raise InfoptError("no layer was quantized: an AWQ checkpoint needs at least one")
    distinct = set(module_specs.values())
    if len(distinct) > 1:
        _raise_mixed(distinct)
    spec = distinct.pop()
    config = {
        "quant_method": QUANT_METHOD,
        "version": VERSION,
        "format": VERSION,
        "bits": spec.bits,
        "group_size": spec.group_size,
        "zero_point": not spec.symmetric,
        "sym": spec.symmetric,
        "desc_act": False,  # TGI reads config.json only when the key is there
        "modules_to_not_convert": sorted(dense_modules) or None,
    }
    dense_in_blocks = sorted(m for m in dense_modules if _block_of(m) is not None)
    if dense_in_blocks:
        config["dynamic"] = {f"-:^{re.escape(m)}$": {} for m in dense_in_blocks}
    return config


def _spec(qconfig: dict) -> QuantSpec:
    version = str(qconfig.get("version") or qconfig.get("format") or VERSION).lower()
    if version != VERSION:
        raise InfoptError(f"unsupported AWQ version {version!r}: only the GEMM layout is readable")
    bits = int(qconfig.get("bits", qconfig.get("w_bit", BITS)))
    group = int(qconfig.get("group_size", qconfig.get("q_group_size", 128)))
    if bits != BITS:
        raise InfoptError(f"AWQ GEMM checkpoints hold 4-bit weights, config says {bits}")
    return QuantSpec(bits, group, not bool(qconfig.get("zero_point", True)))


def _check_shapes(module: str, spec: QuantSpec, parts: dict[str, torch.Tensor]) -> None:
    in_f, out_f = parts["qweight"].shape[0], parts["scales"].shape[1]
    if out_f % 8 or not spec.fits(in_f):
        raise InfoptError(f"{module}: [{out_f}, {in_f}] cannot hold {spec.describe()} AWQ weights "
                          "(out_features must be a multiple of 8, in_features of the group size)")
    groups = spec.num_groups(in_f)
    expected = {"qweight": (in_f, out_f // 8), "qzeros": (groups, out_f // 8), "scales": (groups, out_f)}
    for suffix, shape in expected.items():
        if tuple(parts[suffix].shape) != shape:
            raise InfoptError(f"{module}.{suffix}: shape {tuple(parts[suffix].shape)} does not fit "
                              f"{spec.describe()} [{out_f}, {in_f}] (expected {shape})")
    if parts["qweight"].dtype != torch.int32 or parts["qzeros"].dtype != torch.int32:
        raise InfoptError(f"{module}: only int32-packed AWQ tensors are readable, got {parts['qweight'].dtype}")


def _read_module(tensors: dict[str, torch.Tensor], module: str, spec: QuantSpec) -> QuantizedWeight:
    parts = {suffix: tensors.pop(f"{module}.{suffix}", None) for suffix in SUFFIXES}
    if parts["qzeros"] is None or parts["scales"] is None:
        raise InfoptError(f"{module}: AWQ checkpoint has qweight but no qzeros or scales")
    _check_shapes(module, spec, parts)
    codes = unpack_columns(parts["qweight"]).t().contiguous()
    zero = unpack_columns(parts["qzeros"]).t().contiguous()
    if spec.symmetric and not bool(zero.any()):
        zero = None
    return QuantizedWeight(codes, parts["scales"].t().contiguous(), zero, spec)


def read_quantized(files: list[Path], qconfig: dict) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """Split an AWQ GEMM checkpoint into quantized weights (by `X.weight` name) and dense tensors."""
    spec = _spec(qconfig)
    tensors = load_tensors(files)
    modules = sorted(n.removesuffix(".qweight") for n in tensors if n.endswith(".qweight"))
    quantized = {f"{module}.weight": _read_module(tensors, module, spec) for module in modules}
    return quantized, tensors
