"""GPTQ checkpoints (AutoGPTQ's "v1" layout, read by GPTQModel, transformers+optimum, vLLM and TGI).

Layout per quantized linear `M` with b bits, G groups (G = 1 for per-channel):
  M.qweight  int32 [in*b/32, out]   unsigned codes packed along the input dimension
  M.qzeros   int32 [G, out*b/32]    unsigned zero points packed along the output dimension
  M.scales   fp16  [G, out]
  M.g_idx    int32 [in]             group of each input column (act-order permutes it)
Packing is little-endian and continuous: code k of a column sits at bits [k*b, (k+1)*b) of the
column's word stream, so 3-bit codes straddle words (10 + 2/1 + 1 + 10 + 1/2 + 10 per 3 words), as in
AutoGPTQ's pack and GPTQModel 7.6 `PackableQuantLinear.dequantize_weight`. Unsigned code = signed
level + 2^(b-1); w = (code - zero) * scale. In v1 each qzeros field holds zero - 1 (AutoGPTQ's
"minus one"); checkpoint_format "gptq_v2" (GPTQModel) stores the zero itself.
config.json carries `quantization_config` (quant_method "gptq"); quantize_config.json repeats it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable

import torch

from infopt.errors import InfoptError
from infopt.formats.packing import pack_int32, unpack_int32
from infopt.formats.safetensors_io import ShardedWriter, load_tensors, write_items
from infopt.quant.weights import QuantizedWeight
from infopt.quant.spec import QuantSpec

QUANT_METHOD = "gptq"
CHECKPOINT_FORMAT = "gptq"  # v1
V2_FORMAT = "gptq_v2"
SIDE_FILE = "quantize_config.json"
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
# First numeric path component: `model.layers.3.mlp.up_proj` -> (`model.layers`, `mlp.up_proj`).
_BLOCK = re.compile(r"^(.+?)\.\d+\.(.+)$")
# Codes that fill a whole number of int32 words (3-bit: 32 codes in 3 words).
_WORD_MULTIPLE = {2: 16, 3: 32, 4: 8, 8: 4}


def packable(shape: tuple[int, int], spec: QuantSpec) -> str | None:
    """None if an [out, in] linear with `spec` can be stored as GPTQ, else why not."""
    out_f, in_f = shape
    if spec.bits not in _WORD_MULTIPLE:
        return f"GPTQ stores {', '.join(map(str, _WORD_MULTIPLE))}-bit weights only"
    multiple = _WORD_MULTIPLE[spec.bits]
    if in_f % multiple or out_f % multiple:
        return f"GPTQ {spec.bits}-bit packing needs in and out features divisible by {multiple}"
    if not spec.fits(in_f):
        return f"in_features {in_f} not divisible by group size {spec.group_size}"
    return None


def _block_of(module: str) -> tuple[str, str] | None:
    match = _BLOCK.match(module)
    return (match.group(1), match.group(2)) if match else None


def _check_module(module: str, value: QuantizedWeight) -> None:
    reason = packable(value.shape, value.spec)
    if reason:
        raise InfoptError(f"{module}: cannot be written as GPTQ: {reason}")
    if _block_of(module) is None:
        # optimum/transformers only convert linears inside the repeated decoder blocks
        raise InfoptError(f"{module}: GPTQ loaders quantize only linears inside the decoder blocks; leave it dense")


def _has_act_order(value: QuantizedWeight) -> bool:
    if value.g_idx is None:
        return False
    in_f, groups = value.shape[1], value.scale.shape[1]
    return not torch.equal(value.g_idx.to(torch.int32), _implied_g_idx(in_f, groups))


def _implied_g_idx(in_f: int, groups: int) -> torch.Tensor:
    return (torch.arange(in_f) // (in_f // groups)).to(torch.int32)


def _v1_safe(module: str, value: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes and zeros with no unsigned zero point 0, which v1's zero-1 cannot hold.

    Readers differ on a stored field of 2^b-1 (vLLM reads 2^b, GPTQModel carries into the next
    field), so groups with zero at the lowest level are re-encoded as (code+1, zero+1), exact while
    no code of the group is at the top level; anything else is refused.
    """
    codes, zero, spec = value.codes, value.zero, value.spec
    if zero is None:
        return codes, None
    low = zero == spec.qmin  # [out, groups]
    if not bool(low.any()):
        return codes, zero
    columns = value.column_groups().long()
    shift = low[:, columns]  # [out, in]
    if bool((shift & (codes == spec.qmax)).any()):
        raise InfoptError(
            f"{module}: a group's zero point is at the lowest level and its codes span the full range, "
            "which GPTQ v1 cannot store; quantize symmetrically or keep zero points above the lowest level"
        )
    return codes + shift.to(codes.dtype), zero + low.to(zero.dtype)


def _gptq_tensors(module: str, value: QuantizedWeight) -> dict[str, torch.Tensor]:
    spec = value.spec
    out_f, in_f = value.shape
    codes, zero = _v1_safe(module, value)
    groups = value.scale.shape[1]
    if zero is None:
        zero = torch.zeros(out_f, groups, dtype=torch.int8)
    scales = value.scale.to(torch.float16).t().contiguous()
    if not bool(torch.isfinite(scales).all()):
        raise InfoptError(f"{module}: scales overflow float16, which GPTQ stores them in")
    # qzeros fields hold unsigned zero - 1: pack the signed levels zero - 1
    return {
        f"{module}.qweight": pack_int32(codes, spec.bits, dim=1).t().contiguous(),
        f"{module}.qzeros": pack_int32((zero - 1).t().contiguous(), spec.bits, dim=1),
        f"{module}.scales": scales,
        f"{module}.g_idx": value.column_groups().to(torch.int32).contiguous(),
    }


def write_weights(
    writer: ShardedWriter,
    items: Iterable[tuple[str, torch.Tensor | QuantizedWeight]],
    desc_act: bool | None = None,
) -> dict[str, QuantSpec]:
    """Add tensors to the writer; quantized `X.weight` items become GPTQ's tensor set.

    GPTQ has one spec per checkpoint, so a second distinct spec is an error. With desc_act=False,
    a weight whose g_idx is not the plain j // group_size is an error too: kernels would ignore it.
    """

    def module_tensors(module: str, value: QuantizedWeight) -> dict[str, torch.Tensor]:
        _check_module(module, value)
        if desc_act is False and _has_act_order(value):
            raise InfoptError(f"{module}: has an act-order g_idx but desc_act is false")
        return _gptq_tensors(module, value)

    specs = write_items(writer, items, QuantizedWeight, module_tensors, lambda value: value.spec)
    if len(set(specs.values())) > 1:
        _raise_mixed(set(specs.values()))
    return specs


def _raise_mixed(specs: set[QuantSpec]) -> None:
    described = ", ".join(sorted(s.describe() for s in specs))
    raise InfoptError(f"GPTQ checkpoints hold one scheme for all layers, got {described}; use compressed-tensors")


def _quantized_selection(quantized: list[str], dense: list[str]) -> dict:
    """Keys that make optimum/transformers, vLLM and GPTQModel leave in-block dense linears alone."""
    dense_in_blocks = sorted(m for m in dense if _block_of(m) is not None)
    prefixes = {_block_of(m)[0] for m in quantized}
    keys: dict = {"block_name_to_quantize": prefixes.pop()} if len(prefixes) == 1 else {}
    if not dense_in_blocks:
        return keys
    relative = sorted({_block_of(m)[1] for m in quantized})
    # optimum matches these as suffixes and vLLM as substrings of full module names
    clash = any(r in d for r in relative for d in dense_in_blocks)
    keys["modules_in_block_to_quantize"] = [sorted(quantized) if clash else relative]
    # GPTQModel and vLLM: "-:" marks a module pattern (re.match) as not quantized
    keys["dynamic"] = {f"-:^{re.escape(m)}$": {} for m in dense_in_blocks}
    return keys


def quantization_config(module_specs: dict[str, QuantSpec], dense_modules: list[str], method: dict) -> dict:
    """config.json `quantization_config` for the written modules; `method` carries the settings the method had
    (desc_act, static_groups, and for GPTQ itself damp_percent and true_sequential)."""
    if not module_specs:
        raise InfoptError("no layer was quantized: a GPTQ checkpoint needs at least one")
    distinct = set(module_specs.values())
    if len(distinct) > 1:
        _raise_mixed(distinct)
    spec = distinct.pop()
    desc_act = bool(method.get("desc_act", False))
    damp = method.get("damp_percent")
    if damp is not None and not 0 < damp < 1:
        raise InfoptError(f"damp_percent {damp} is outside (0, 1), which transformers refuses to load")
    config = {
        "quant_method": QUANT_METHOD,
        "checkpoint_format": CHECKPOINT_FORMAT,
        "format": CHECKPOINT_FORMAT,
        "bits": spec.bits,
        "group_size": spec.group_size,
        "sym": spec.symmetric,
        "desc_act": desc_act,
        "static_groups": bool(method.get("static_groups", False)),
        "act_group_aware": False,
        "lm_head": False,
        "pack_dtype": "int32",
    }
    # algorithm settings only when the method had them (an RTN or AWQ checkpoint claims no dampening)
    config.update({key: method[key] for key in ("damp_percent", "true_sequential") if key in method})
    config.update(_quantized_selection(list(module_specs), list(dense_modules)))
    return config


def side_files(out_dir: Path, qconfig: dict) -> list[str]:
    """Write quantize_config.json (AutoGPTQ's and vLLM's fallback copy of the config)."""
    (out_dir / SIDE_FILE).write_text(json.dumps(qconfig, indent=2, sort_keys=True) + "\n")
    return [SIDE_FILE]


def _base_spec(qconfig: dict) -> QuantSpec:
    try:
        return QuantSpec(int(qconfig["bits"]), int(qconfig.get("group_size", -1)), bool(qconfig.get("sym", True)))
    except KeyError:
        raise InfoptError("GPTQ quantization_config has no 'bits'") from None


def _checkpoint_format(qconfig: dict) -> str:
    if qconfig.get("is_marlin_format"):
        raise InfoptError("GPTQ checkpoints in Marlin layout (is_marlin_format) are not readable")
    fmt = str(qconfig.get("checkpoint_format") or qconfig.get("format") or CHECKPOINT_FORMAT).lower()
    if fmt not in (CHECKPOINT_FORMAT, V2_FORMAT):
        raise InfoptError(f"unsupported GPTQ checkpoint format {fmt!r} (readable: gptq, gptq_v2)")
    return fmt


def spec_for_module(qconfig: dict, module: str) -> QuantSpec:
    """The base spec, or GPTQModel's `dynamic` override (first re.match-ing "+:" pattern) for `module`."""
    base = _base_spec(qconfig)
    for pattern, override in (qconfig.get("dynamic") or {}).items():
        if pattern.startswith("-:") or not re.match(pattern.removeprefix("+:"), module):
            continue
        return QuantSpec(int(override.get("bits", base.bits)), int(override.get("group_size", base.group_size)),
                         bool(override.get("sym", base.symmetric)))
    return base


def _v1_zero_words(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """v1 words with 1 added to every field, as GPTQModel 7.6 does when loading.

    2/4/8 bits: one integer add of 0x..0101 per word (a field of 2^b-1 carries into the next one);
    3 bits: per field, wrapping within the field.
    """
    if bits == 3:
        levels = unpack_int32(qzeros, bits, qzeros.shape[1] * 32 // bits, dim=1).to(torch.int16)
        wrapped = (levels + (1 << (bits - 1)) + 1) % (1 << bits) - (1 << (bits - 1))
        return pack_int32(wrapped.to(torch.int8), bits, dim=1)
    ones = sum(1 << shift for shift in range(0, 32, bits))
    words = ((qzeros.to(torch.int64) & 0xFFFFFFFF) + ones) & 0xFFFFFFFF
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _check_shapes(module: str, spec: QuantSpec, in_f: int, tensors: dict[str, torch.Tensor]) -> None:
    out_f = tensors["scales"].shape[1]
    expected = {
        "qweight": (math.ceil(in_f * spec.bits / 32), out_f),
        "qzeros": (spec.num_groups(in_f), math.ceil(out_f * spec.bits / 32)),
        "scales": (spec.num_groups(in_f), out_f),
    }
    for suffix, shape in expected.items():
        if tuple(tensors[suffix].shape) != shape:
            raise InfoptError(f"{module}.{suffix}: shape {tuple(tensors[suffix].shape)} does not fit "
                              f"{spec.describe()} [{out_f}, {in_f}] (expected {shape})")
    if tensors["qweight"].dtype != torch.int32 or tensors["qzeros"].dtype != torch.int32:
        raise InfoptError(f"{module}: only int32-packed GPTQ tensors are readable, got {tensors['qweight'].dtype}")


def _explicit_g_idx(g_idx: torch.Tensor | None, in_f: int, groups: int) -> torch.Tensor | None:
    """g_idx unless it is the plain j // width that QuantizedWeight implies by default."""
    if g_idx is None:
        return None
    g_idx = g_idx.to(torch.int32)
    if in_f % groups == 0 and torch.equal(g_idx, _implied_g_idx(in_f, groups)):
        return None
    return g_idx


def _read_module(tensors: dict[str, torch.Tensor], module: str, spec: QuantSpec, v1: bool) -> QuantizedWeight:
    parts = {suffix: tensors.pop(f"{module}.{suffix}", None) for suffix in SUFFIXES}
    if any(parts[suffix] is None for suffix in ("qzeros", "scales")):
        raise InfoptError(f"{module}: GPTQ checkpoint has qweight but no qzeros or scales")
    g_idx = parts["g_idx"]
    in_f = g_idx.numel() if g_idx is not None else parts["qweight"].shape[0] * 32 // spec.bits
    _check_shapes(module, spec, in_f, parts)
    groups, out_f = parts["scales"].shape
    if g_idx is None and in_f % groups:
        raise InfoptError(f"{module}: no g_idx and in_features {in_f} is not a multiple of {groups} groups")
    if g_idx is not None and not bool(((g_idx >= 0) & (g_idx < groups)).all()):
        raise InfoptError(f"{module}.g_idx: group indices outside [0, {groups})")
    codes = unpack_int32(parts["qweight"].t().contiguous(), spec.bits, in_f, dim=1)
    qzeros = _v1_zero_words(parts["qzeros"], spec.bits) if v1 else parts["qzeros"]
    zero = unpack_int32(qzeros, spec.bits, out_f, dim=1).t().contiguous()
    if spec.symmetric and not bool(zero.any()):
        zero = None
    scale = parts["scales"].t().contiguous()
    return QuantizedWeight(codes, scale, zero, spec, _explicit_g_idx(g_idx, in_f, groups))


def read_quantized(files: list[Path], qconfig: dict) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """Split a GPTQ (v1 or v2) checkpoint into quantized weights (by `X.weight` name) and dense tensors."""
    v1 = _checkpoint_format(qconfig) == CHECKPOINT_FORMAT
    tensors = load_tensors(files)
    modules = sorted(n.removesuffix(".qweight") for n in tensors if n.endswith(".qweight"))
    quantized = {}
    for module in modules:
        spec = spec_for_module(qconfig, module)
        quantized[f"{module}.weight"] = _read_module(tensors, module, spec, v1)
    return quantized, tensors
