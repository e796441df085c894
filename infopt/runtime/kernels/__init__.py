"""CPU kernels for quantized linear layers: packed layouts, a C++ AVX-512 extension and a plain-torch fallback.

    packed = pack(quantized_weight)          # once, at load time
    y = matmul(x, packed)                    # fp32 [tokens, out]; the extension when it loads, else torch

The extension is compiled on first use (see build.py); `available()` and `reason()` say whether it is in use.
Both paths form each weight as (value - zero) * scale in fp32, so results agree to fp32 summation order.
"""

from __future__ import annotations

import torch

from infopt.runtime.kernels.build import available, has_vnni, reason
from infopt.runtime.kernels.ops import (LINEAR_DENSE, LINEAR_FLOAT, NO_PRODUCT, LinearRecord, add_rms_norm,
                                        decode_step, dense_kernel_tokens, dense_matmul, dense_weight,
                                        int8_activation_eligible, kernel_matmul, kernel_matmul_a8, packed_record,
                                        paged_attention, rms_norm, rotary_kv_write, silu_mul, tiled_matmul)
from infopt.runtime.kernels.packing import PackedWeight, Unpackable, concat_rows, dequantize_fp32, pack

__all__ = ["LINEAR_DENSE", "LINEAR_FLOAT", "NO_PRODUCT", "LinearRecord", "PackedWeight", "Unpackable",
           "add_rms_norm", "available", "concat_rows", "decode_step", "dense_kernel_tokens", "dense_matmul",
           "dense_weight", "dequantize_fp32", "has_vnni", "int8_activation_eligible", "kernel_matmul",
           "kernel_matmul_a8", "matmul", "pack", "packed_record", "paged_attention", "reason", "rms_norm",
           "rotary_kv_write", "silu_mul", "tiled_matmul"]

# Above this many tokens the kernel hands over to dequantize-a-tile + dense GEMM. On the development machine
# (AMD Zen 5, one thread) the kernel was still faster at 512 tokens: it runs near the FMA peak, while torch's
# fp32 GEMM (MKL, whose MKL_VERBOSE banner there names no AVX2/AVX-512 code path) reached about 2/3 of it. The
# tiled path is for longer prefills, where the activations no longer fit in cache.
MAX_KERNEL_TOKENS = 512


def matmul(x: torch.Tensor, w: PackedWeight, backend: str | None = None) -> torch.Tensor:
    """fp32 [tokens, out] = x [tokens, in] @ w.T; backend "ext", "ext-a8", "torch" or None (ext when available).

    "ext-a8" rounds x to int8 (faster, not exact) at every token count, so prefill and decode round alike (it
    also outruns the tiled GEMM on long inputs: ~2x the exact kernel, measured to 8192 tokens); only for weights
    int8_activation_eligible() accepts.
    """
    if backend == "ext-a8":
        return kernel_matmul_a8(x, w)
    use_ext = available() if backend is None else backend == "ext"
    if use_ext and x.shape[0] <= MAX_KERNEL_TOKENS:
        return kernel_matmul(x, w)
    return tiled_matmul(x, w, use_kernels=use_ext)
