"""Round-to-nearest quantization: the grid (scale, zero point) every integer method starts from.

Codes are signed, q in [-2^(b-1), 2^(b-1)-1]; w ~ (q - z) * s (see infopt.quant.weights). Symmetric: z = 0 and s = absmax / (2^(b-1) - 1/2)
(the GPTQ paper's 2*absmax/(2^b - 1)); asymmetric: s = (max - min) / (2^b - 1) with the range
widened to include 0, and z = round(qmin - min / s).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infopt.quant.methods import INTEGER, IntegerScheme, Method
from infopt.quant.spec import QuantSpec
from infopt.quant.weights import QuantizedWeight, Storage


def _grouped(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    out_f, in_f = weight.shape
    groups = spec.num_groups(in_f)
    return weight.float().reshape(out_f, groups, in_f // groups)


def compute_qparams(
    wmin: torch.Tensor, wmax: torch.Tensor, spec: QuantSpec, dtype: torch.dtype, min_zero_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (rounded to the storage dtype) and zero point from per-group ranges."""
    wmin = torch.minimum(wmin.float(), torch.zeros_like(wmin, dtype=torch.float32))
    wmax = torch.maximum(wmax.float(), torch.zeros_like(wmax, dtype=torch.float32))
    if spec.symmetric:
        absmax = torch.maximum(-wmin, wmax)
        scale = absmax / ((spec.qmax - spec.qmin) / 2)
    else:
        scale = (wmax - wmin) / (spec.qmax - spec.qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(dtype)
    if scale.dtype != torch.float32 and bool((scale == 0).any()):
        scale = torch.where(scale == 0, torch.finfo(dtype).tiny, scale)
    if spec.symmetric:
        return scale, None
    zero = torch.round(spec.qmin - wmin / scale.float()).clamp(spec.qmin, spec.qmax)
    floor = spec.qmin + min_zero_offset
    if min_zero_offset and bool((zero < floor).any()):
        # only groups with min ~ 0 land here: raise the zero and stretch the scale so max still fits
        low = zero < floor
        stretched = (wmax / (spec.qmax - floor)).to(dtype)
        scale = torch.where(low & (stretched > scale), stretched, scale)
        zero = torch.where(low, torch.full_like(zero, floor), zero)
    return scale, zero.to(torch.int8)


def quantize_codes(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """Integer codes for `weight` given per-group scale and zero point."""
    levels = _grouped(weight, spec) / scale.float().unsqueeze(-1)  # a fresh tensor: update it in place
    levels.round_()
    if zero is not None:
        levels += zero.float().unsqueeze(-1)
    return levels.clamp_(spec.qmin, spec.qmax).to(torch.int8).reshape(weight.shape)


def quantize_rtn(weight: torch.Tensor, spec: QuantSpec, storage: Storage = Storage()) -> QuantizedWeight:
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    fast = _in_kernel(weight, spec, storage)
    if fast is not None:
        return fast
    wmin, wmax = torch.aminmax(_grouped(weight, spec), dim=-1)
    scale, zero = compute_qparams(wmin, wmax, spec, storage.scale_dtype or weight.dtype, storage.min_zero_offset)
    codes = quantize_codes(weight, scale, zero, spec)
    return QuantizedWeight(codes, scale, zero, spec)


def _in_kernel(weight: torch.Tensor, spec: QuantSpec, storage: Storage) -> QuantizedWeight | None:
    """quantize_rtn in one C++ pass (runtime/kernels/grid_search.cpp round_to_nearest: these steps, the same bytes)
    for float32 / bfloat16 / float16 CPU weights in groups of multiples of 16 with scales of one of those types,
    outside autograd (the op has no gradient); None elsewhere, and where a value is not finite
    (--allow-non-finite), which the torch form handles as torch does."""
    from infopt.runtime.kernels.ops import KERNEL_INPUT_DTYPES  # noqa: PLC0415 (runtime.kernels imports quant)

    scale_dtype = storage.scale_dtype or weight.dtype
    if (weight.device.type != "cpu" or weight.dtype not in KERNEL_INPUT_DTYPES or weight.requires_grad
            or scale_dtype not in KERNEL_INPUT_DTYPES
            or storage.min_zero_offset or spec.bits > 8 or spec.group_size <= 0 or spec.group_size % 16
            or weight.shape[1] % spec.group_size):
        return None
    from infopt.runtime.kernels import build  # noqa: PLC0415 (builds the extension on first use)

    ops = build.ops()
    if ops is None:
        return None
    result = build.unless_non_finite(ops.round_to_nearest, weight.contiguous(), spec.group_size, spec.qmin,
                                     spec.qmax, spec.symmetric, scale_dtype)
    if result is None:
        return None
    codes, scale, zero = result
    return QuantizedWeight(codes, scale, None if spec.symmetric else zero, spec)


@dataclass(frozen=True, kw_only=True)
class RTNConfig(IntegerScheme):
    """Round to nearest: the scheme's options only."""


class RTNQuantizer:
    def __init__(self, config: RTNConfig, storage: Storage):
        self.storage = storage

    def quantize_weight(self, weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
        return quantize_rtn(weight, spec, self.storage)


METHOD = Method("rtn", "round to nearest on a min/max grid (no calibration)", RTNConfig, INTEGER, "compressed-tensors",
                calibrated=False, factory=lambda config, storage, adapter: RTNQuantizer(config, storage),
                recoverable=True, gguf_rounding=True)
