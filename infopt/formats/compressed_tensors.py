"""compressed-tensors `pack-quantized` checkpoints: writer and reader.

Layout per quantized linear `M` (compressed-tensors v0.19, as llm-compressor writes it):
  M.weight_packed      int32 [out, ceil(in*b/32)]   codes packed along the input dimension
  M.weight_scale       dtype [out, groups]          (groups = 1 for per-channel)
  M.weight_zero_point  int32 [ceil(out*b/32), groups]  asymmetric only, packed along the output dim
  M.weight_shape       int64 [2]                    (out, in)
config.json carries `quantization_config` with quant_method "compressed-tensors", format
"pack-quantized", config_groups (targets + weight args) and the `ignore` list of linears left dense.
"""

from __future__ import annotations

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

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
# The compressed-tensors release whose layout this module writes (see module docstring).
LAYOUT_VERSION = "0.19.0"
_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def weight_args(spec: QuantSpec, actorder: str | None = None) -> dict:
    return {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.symmetric,
        "group_size": None if spec.group_size == -1 else spec.group_size,
        "strategy": "channel" if spec.group_size == -1 else "group",
        "block_structure": None,
        "dynamic": False,
        "actorder": actorder,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def quantization_config(module_specs: dict[str, QuantSpec], ignore: list[str], actorder: str | None = None) -> dict:
    """One config group per distinct spec; a single spec targets every Linear not ignored.

    `actorder` "weight" records GPTQ's activation order with static groups, the only act-order
    compressed-tensors 0.19 keeps (its g_idx "group" ordering was removed); the layout is unchanged.
    """
    by_spec: dict[QuantSpec, list[str]] = {}
    for module, spec in module_specs.items():
        by_spec.setdefault(spec, []).append(module)
    ordered = sorted(by_spec.items(), key=lambda kv: -len(kv[1]))
    groups = {}
    for i, (spec, modules) in enumerate(ordered):
        targets = ["Linear"] if len(ordered) == 1 else [f"re:^{re.escape(m)}$" for m in modules]
        groups[f"group_{i}"] = {
            "targets": targets,
            "weights": weight_args(spec, actorder),
            "input_activations": None,
            "output_activations": None,
            "format": FORMAT,
        }
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "version": LAYOUT_VERSION,
    }


def _module_tensors(module: str, value: QuantizedWeight) -> dict[str, torch.Tensor]:
    if value.g_idx is not None:
        raise InfoptError(f"{module}: compressed-tensors {LAYOUT_VERSION} has no g_idx; use static groups")
    bits = value.spec.bits
    tensors = {f"{module}.weight_packed": pack_int32(value.codes, bits, dim=1), f"{module}.weight_scale": value.scale}
    if value.zero is not None:
        tensors[f"{module}.weight_zero_point"] = pack_int32(value.zero, bits, dim=0)
    tensors[f"{module}.weight_shape"] = torch.tensor(value.shape, dtype=torch.int64)
    return tensors


def write_weights(
    writer: ShardedWriter, items: Iterable[tuple[str, torch.Tensor | QuantizedWeight]]
) -> dict[str, QuantSpec]:
    """Add tensors to the writer; quantized `X.weight` items become the packed tensor set."""
    return write_items(writer, items, QuantizedWeight, _module_tensors, lambda value: value.spec)


def _spec_from_args(args: dict) -> QuantSpec:
    if args.get("type", "int") != "int" or args.get("dynamic"):
        raise InfoptError(f"unsupported compressed-tensors weight scheme: {args}")
    group = args.get("group_size")
    strategy = args.get("strategy")
    if strategy not in ("group", "channel"):
        raise InfoptError(f"unsupported compressed-tensors strategy {strategy!r}")
    return QuantSpec(int(args["num_bits"]), group if strategy == "group" and group else -1, bool(args.get("symmetric", True)))


def _matches(target: str, module: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == "Linear" or module == target or module.endswith("." + target)


def spec_for_module(qconfig: dict, module: str) -> QuantSpec:
    for group in qconfig.get("config_groups", {}).values():
        if any(_matches(t, module) for t in group.get("targets", [])):
            return _spec_from_args(group["weights"])
    raise InfoptError(f"compressed-tensors config has no scheme for packed module {module}")


def read_quantized(files: list[Path], qconfig: dict) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """Split a checkpoint into quantized weights (by `X.weight` name) and dense tensors."""
    if qconfig.get("format", FORMAT) != FORMAT:
        raise InfoptError(f"unsupported compressed-tensors format {qconfig.get('format')!r} (only {FORMAT})")
    tensors = load_tensors(files)
    modules = sorted({n.rsplit(".", 1)[0] for n in tensors if n.endswith(".weight_packed")})
    quantized = {}
    for module in modules:
        spec = spec_for_module(qconfig, module)
        missing = [s for s in ("weight_shape", "weight_scale") if f"{module}.{s}" not in tensors]
        if missing:
            raise InfoptError(f"{module}: packed weight without {', '.join(missing)}")
        out_f, in_f = _shape(module, tensors.pop(f"{module}.weight_shape"))
        packed = tensors.pop(f"{module}.weight_packed")
        scale = tensors.pop(f"{module}.weight_scale")
        zero = tensors.pop(f"{module}.weight_zero_point", None)
        if zero is None and not spec.symmetric:
            raise InfoptError(f"{module}: asymmetric scheme but no weight_zero_point")
        if zero is not None and spec.symmetric:
            raise InfoptError(f"{module}: symmetric scheme but a weight_zero_point (the config and tensors disagree)")
        _check_layout(module, spec, out_f, in_f, packed, scale, zero)
        codes = unpack_int32(packed, spec.bits, in_f, dim=1)
        if zero is not None:
            zero = unpack_int32(zero, spec.bits, out_f, dim=0)
        quantized[f"{module}.weight"] = QuantizedWeight(codes, scale, zero, spec)
    return quantized, tensors


def _shape(module: str, shape: torch.Tensor) -> tuple[int, int]:
    if shape.is_floating_point() or shape.numel() != 2 or int(shape.min()) < 1 or int(shape.max()) > 1 << 24:
        raise InfoptError(f"{module}.weight_shape: expected two positive integers, got {shape.tolist()[:4]}")
    out_f, in_f = (int(v) for v in shape.reshape(-1).tolist())
    return out_f, in_f


def _check_layout(module: str, spec: QuantSpec, out_f: int, in_f: int, packed: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor | None) -> None:
    """Every tensor of a packed module must have the exact shape and dtype the scheme implies."""
    if not spec.fits(in_f):
        raise InfoptError(f"{module}: group size {spec.group_size} does not divide in_features {in_f}")
    groups = spec.num_groups(in_f)
    expected = {"weight_packed": (packed, torch.int32, (out_f, math.ceil(in_f * spec.bits / 32)))}
    if zero is not None:
        expected["weight_zero_point"] = (zero, torch.int32, (math.ceil(out_f * spec.bits / 32), groups))
    for name, (tensor, dtype, shape) in expected.items():
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise InfoptError(f"{module}.{name}: {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}, "
                              f"expected int32 {list(shape)} for {spec.describe()} codes of [{out_f}, {in_f}]")
    if not scale.is_floating_point() or tuple(scale.shape) != (out_f, groups):
        raise InfoptError(f"{module}.weight_scale: {str(scale.dtype).removeprefix('torch.')} {list(scale.shape)}, "
                          f"expected a float [{out_f}, {groups}]")
