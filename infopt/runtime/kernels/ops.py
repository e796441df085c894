"""Products with packed weights: the C++ kernels, and plain-torch paths that form the same fp32 weights.

Every path computes y = x @ w.T in fp32 with w = (value - zero) * scale (or value * scale + offset, for fp32
"zero" offsets) formed identically, so they differ only in summation order (about 1e-6 relative). x is [tokens, in_features] in fp32, bf16 or fp16; y is fp32.
"""

from __future__ import annotations

import torch

from infopt.runtime.kernels import build
from infopt.runtime.kernels.packing import ROWS, UNIT_BYTES, UNIT_COLS, PackedWeight, unpack_nibbles, untile_params, untile_rows

KERNEL_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TILE_BYTES = 4 << 20  # fp32 weight rows dequantized at a time by the tiled paths (fits L2 + L3 comfortably)


def _ext():
    ops = build.ops()
    if ops is None:
        raise RuntimeError(f"infopt kernels unavailable: {build.reason()}")
    return ops


def kernel_matmul(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """The C++ kernel: fp32 [tokens, out] for x [tokens, in] in fp32, bf16 or fp16 (others are cast to fp32)."""
    ops = _ext()
    if x.dtype not in KERNEL_INPUT_DTYPES:
        x = x.float()
    if w.kind == "lut4":
        return ops.lut4_mm(x, w.data, w.scale, w.zero, w.lut, w.group_size, w.out_features, w.perm)
    return ops.int8_mm(x, w.data, w.scale, w.zero, w.group_size, w.out_features, w.perm)


# Most tokens a dense product sends to the C++ kernel (dense_mm); larger batches (prefill) use torch's GEMM.
# Measured on the development machine (AMD Zen 5, 2 threads; weights of 2048x2048 to 2048x5632): fp32 2.4-8x
# faster than torch up to 16 tokens; bf16 (oneDNN) 1.3-2.7x faster up to 6 and even or slower from 7-8 on.
DENSE_KERNEL_TOKENS = {torch.float32: 16, torch.bfloat16: 6}


def dense_kernel_tokens(weight: torch.Tensor) -> int:
    """How many tokens `weight` [out, in] may take through dense_matmul (0: never, the layout does not fit)."""
    if weight.dim() != 2 or weight.device.type != "cpu" or weight.shape[1] % 16 or not weight.is_contiguous():
        return 0
    return DENSE_KERNEL_TOKENS.get(weight.dtype, 0)


def dense_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 [tokens, out] = x [tokens, in] @ weight.T for an fp32 or bf16 weight, by the C++ kernel."""
    return _ext().dense_mm(x if x.dtype in KERNEL_INPUT_DTYPES else x.float(), weight)


def int8_activation_eligible(w: PackedWeight) -> bool:
    """Whether lut4_mm_a8 takes `w`: linear int codes (not NF4/FP4 tables) in groups of whole 128-column units."""
    return (w.int_codes and w.group_size % UNIT_COLS["lut4"] == 0 and build.has_vnni()
            and (w.zero is None or w.zero.dtype == torch.int8))


def kernel_matmul_a8(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """The W4A8 kernel: x rounded to int8 per token and 128-column unit (scale amax / 127), fp32 [tokens, out]."""
    if not int8_activation_eligible(w):  # the C++ side cannot tell NF4/FP4 tables from integer codes
        raise ValueError("int8 activations need integer codes in groups of whole 128-column units and AVX512-VNNI")
    if x.dtype not in KERNEL_INPUT_DTYPES:
        x = x.float()
    return _ext().lut4_mm_a8(x, w.data, w.scale, w.zero, w.group_size, w.out_features, w.perm)


def quantize_activations_reference(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """What kernel_matmul_a8 multiplies instead of x, in plain torch: fp32 [tokens, in_pad] in packed column order,
    each 128-column unit rounded to int8 steps of amax / 127 (the kernel's numbers, for tests)."""
    xp = prepare_input(x, w)
    units = xp.reshape(xp.shape[0], -1, UNIT_COLS["lut4"])
    amax = units.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(units * inv) * (amax / 127.0)).reshape(xp.shape)


def kernel_dequantize(w: PackedWeight, row0: int, row1: int) -> torch.Tensor:
    """fp32 rows [row0, row1) in packed column order [rows, in_pad], by the C++ decoder."""
    ops = _ext()
    if w.kind == "lut4":
        return ops.lut4_dequant(w.data, w.scale, w.zero, w.lut, w.group_size, w.out_features, row0, row1)
    return ops.int8_dequant(w.data, w.scale, w.zero, w.group_size, w.out_features, row0, row1)


def torch_dequantize(w: PackedWeight, row0: int, row1: int) -> torch.Tensor:
    """The same rows as kernel_dequantize, in plain torch: (value - zero) * scale per group, in fp32 (value * scale +
    offset where the zero points are fp32 offsets)."""
    t0, t1 = row0 // ROWS, -(-row1 // ROWS)  # the whole tiles holding the rows
    rows = untile_rows(w.data[t0:t1], UNIT_BYTES[w.kind])
    values = w.lut[unpack_nibbles(rows).long()] if w.kind == "lut4" else rows.float()
    grouped = values.reshape(values.shape[0], -1, w.group_size)
    offset = w.zero is not None and w.zero.is_floating_point()
    if w.zero is not None and not offset:
        grouped = grouped - untile_params(w.zero[t0:t1]).float().unsqueeze(-1)
    grouped = grouped * untile_params(w.scale[t0:t1]).unsqueeze(-1)
    if offset:
        grouped = grouped + untile_params(w.zero[t0:t1]).unsqueeze(-1)
    weights = grouped.reshape(values.shape[0], -1)
    return weights[row0 - t0 * ROWS: row1 - t0 * ROWS]


def prepare_input(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """x as fp32 [tokens, in_pad] in packed column order (gathered by perm, zero-padded)."""
    x = x.float()
    if w.perm is not None:
        x = x.index_select(1, w.perm)
    extra = w.in_padded - x.shape[1]
    return torch.nn.functional.pad(x, (0, extra)) if extra else x


def _tile_rows(w: PackedWeight) -> int:
    """Rows per dequantized tile: about TILE_BYTES of fp32, whole 4-row tiles."""
    return max(ROWS, TILE_BYTES // (4 * w.in_padded) // ROWS * ROWS)


def tiled_matmul(x: torch.Tensor, w: PackedWeight, use_kernels: bool) -> torch.Tensor:
    """Dequantize TILE_BYTES of weight rows at a time and multiply each tile with a dense GEMM.

    For large token counts (prefill) and as the memory-lean fallback: peak extra memory is one tile.
    """
    xp = prepare_input(x, w)
    out_f = w.out_features
    y_t = torch.empty(out_f, xp.shape[0], dtype=torch.float32)  # y transposed: each tile's rows are contiguous
    step = _tile_rows(w)
    dequantize = kernel_dequantize if use_kernels else torch_dequantize
    for row0 in range(0, out_f, step):
        row1 = min(out_f, row0 + step)
        torch.mm(dequantize(w, row0, row1), xp.t(), out=y_t[row0:row1])
    return y_t.t()


def dense_weight(w: PackedWeight) -> torch.Tensor:
    """The whole fp32 weight [out, in] in the original column order (the dense fallback's one-time copy)."""
    dense = torch.empty(w.out_features, w.in_features, dtype=torch.float32)
    step = _tile_rows(w)
    for row0 in range(0, w.out_features, step):
        row1 = min(w.out_features, row0 + step)
        tile = torch_dequantize(w, row0, row1)[:, : w.in_features]
        if w.perm is None:
            dense[row0:row1] = tile
        else:
            dense[row0:row1, w.perm] = tile
    return dense


# Fused ops of the small steps (decode_ops.cpp). Each takes and returns tensors in the activation dtype (fp32,
# bf16 or fp16, CPU) and matches the plain-torch form in model.py / attention.py up to summation order.
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., n] with weight [n] (x's dtype)."""
    if x.dim() == 2:
        return _ext().rms_norm(x, weight, eps)
    return _ext().rms_norm(x.reshape(-1, x.shape[-1]), weight, eps).reshape(x.shape)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta in place (x [tokens, n], contiguous rows), then RMSNorm of the sum."""
    return _ext().add_rms_norm(x, delta if delta.dim() == 2 else delta.reshape(x.shape), weight, eps)


def rotary_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    key_cache: torch.Tensor, value_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """Rotate q [tokens, heads, dim] and k [tokens, kv_heads, dim] in place by Rotary.tables' cos / signed sin,
    and store k and v at their flat slots of the [blocks, block_size, kv_heads, dim] caches."""
    _ext().rotary_kv_write(q, k, v, cos, sin, key_cache, value_cache, slots)


def paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
                    token_seq: torch.Tensor, token_pos: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """[tokens, heads, dim]: each query token attends to keys 0 .. its position (the last `window` of them) of its
    sequence (row token_seq of block_tables [sequences, blocks]), read from the cache blocks in place."""
    return _ext().paged_attention(q, key_cache, value_cache, block_tables, token_seq, token_pos, scale, window or 0)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for [tokens, n] views with contiguous rows (the halves of a fused gate/up product)."""
    return _ext().silu_mul(gate, up)


# Linear kinds of decode_step's records (decode_ops.cpp): [a, b, c, d, e, bias] tensors and [kind, p1, p2] ints.
LINEAR_DENSE, LINEAR_LUT4, LINEAR_INT8, LINEAR_LUT4_A8, LINEAR_FLOAT, LINEAR_NONE = range(6)
LinearRecord = tuple[list, list[int]]
NO_PRODUCT: LinearRecord = ([None] * 6, [LINEAR_NONE, 0, 0])  # k, v or up's slot beside a fused product


def packed_record(w: PackedWeight, backend: str, bias: torch.Tensor | None) -> LinearRecord | None:
    """decode_step's record of a packed weight on backend "ext" or "ext-a8" (None for others)."""
    kinds = {("ext", "lut4"): LINEAR_LUT4, ("ext", "int8"): LINEAR_INT8, ("ext-a8", "lut4"): LINEAR_LUT4_A8}
    kind = kinds.get((backend, w.kind))
    if kind is None:
        return None
    return [w.data, w.scale, w.zero, w.lut if kind == LINEAR_LUT4 else None, w.perm, bias], [kind, w.group_size,
                                                                                               w.out_features]


def decode_step(x: torch.Tensor, plan: tuple[list, list[int]], key_caches: list[torch.Tensor],
                value_caches: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                block_tables: torch.Tensor, token_seq: torch.Tensor, token_pos: torch.Tensor,
                logit_rows: torch.Tensor | None, num_heads: int, num_kv_heads: int, head_dim: int, eps: float,
                scale: float, window: int | None) -> torch.Tensor:
    """A small step's forward in one C++ call: fp32 logits at logit_rows (None: every row) for the embedded tokens
    x [tokens, hidden] (overwritten: it carries the residual stream).

    plan: EngineModel.decode_plan(): per layer the input, post-attention, q and k norm weights (None without) and
    the records of the fused q/k/v, o_proj, fused gate/up and down_proj products; then the final norm weight and the
    lm_head record. cos / sin: Rotary's fp32 tables [positions, rotary_dim] covering token_pos."""
    tensors, ints = plan
    return _ext().decode_step(x, tensors, ints, key_caches, value_caches, cos, sin, slots, block_tables, token_seq,
                              token_pos, logit_rows, num_heads, num_kv_heads, head_dim, eps, scale, window or 0)
