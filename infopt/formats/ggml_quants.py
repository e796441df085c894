"""ggml's tensor types: block layouts, packing of exact grids, float quantizers, and dequantization.

Layouts are those of ggml's `ggml-common.h` (llama.cpp, vendored in llama-cpp-python 0.3.36), as facts:
- Q8_0: 32 values, fp16 d + 32 int8; x = d * q.
- Q4_0: 32 values, fp16 d + 16 bytes; byte j holds value j (low nibble) and value j + 16 (high); x = d * (q - 8).
- Q4_1: fp16 d, fp16 m + 16 bytes as Q4_0; x = d * q + m.
- Q5_0 / Q5_1: as Q4_0 / Q4_1 with a 4-byte mask of fifth bits (bit j for value j) after d (and m); Q5_0 is
  x = d * (q - 16).
- Q4_K (144 bytes per 256 values): fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32,
  128 bytes of nibbles (per 64 values: byte l holds value l low and value l + 32 high);
  x = (d * sc) * q - (dmin * m).
- Q5_K (176 bytes): Q4_K plus 32 bytes of fifth bits (bit s of byte l is value l of sub-block s).
- Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales (sub-blocks of 16), fp16
  d; x = (d * sc) * (q - 32).
Dequantization computes in float32 with the operations in the order gguf-py's `gguf.quants` uses, so the two agree
bit for bit (tested).

The float quantizers are infopt's own: round-to-nearest with a scale search weighted by importance (|x| plus an
optional importance matrix, the mean of x^2 per input column over calibration text, as llama.cpp's imatrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infopt.errors import InfoptError
from infopt.quant.weights import BlockWeight
from infopt.quant.kgrid import (BETTER, affine_search, grid_codes, importance_weights, round_half_away,
                                 search_kernels, super_scales)
from infopt.runtime.kernels.build import unless_non_finite

QK = 32  # values per block of the legacy types
QK_K = 256  # values per super-block of the K-quants


@dataclass(frozen=True)
class GGMLType:
    name: str
    id: int  # enum ggml_type
    block: int  # values per block
    nbytes: int  # bytes per block


TYPES = {t.name: t for t in (
    GGMLType("F32", 0, 1, 4), GGMLType("F16", 1, 1, 2), GGMLType("Q4_0", 2, QK, 18), GGMLType("Q4_1", 3, QK, 20),
    GGMLType("Q5_0", 6, QK, 22), GGMLType("Q5_1", 7, QK, 24), GGMLType("Q8_0", 8, QK, 34),
    GGMLType("Q4_K", 12, QK_K, 144), GGMLType("Q5_K", 13, QK_K, 176), GGMLType("Q6_K", 14, QK_K, 210),
    GGMLType("BF16", 30, 1, 2),
)}
BY_ID = {t.id: t for t in TYPES.values()}
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
CODE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}


def row_bytes(type_name: str, columns: int) -> int:
    t = TYPES[type_name]
    if columns % t.block:
        raise InfoptError(f"{type_name} needs rows of a multiple of {t.block} values, not {columns}")
    return columns // t.block * t.nbytes


# --- small helpers -------------------------------------------------------------------------------------------


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[..., 1] float -> [..., 2] uint8 (little-endian fp16)."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def _f16(data: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 -> [..., 1] float32."""
    return data.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] codes 0..15 -> [n, 16] bytes: value j low, value j + 16 high."""
    return (q[:, :16] | (q[:, 16:] << 4)).to(torch.uint8)


def _unnibble(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] codes (inverse of _nibbles)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _fifth_bits(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] codes 0..31 -> [n, 4] bytes, bit j = bit 4 of value j (little-endian uint32)."""
    bits = ((q >> 4) & 1).to(torch.int64)
    return _u32_bytes((bits << torch.arange(32)).sum(dim=1))


def _u32_bytes(values: torch.Tensor) -> torch.Tensor:
    shifts = torch.tensor([0, 8, 16, 24])
    return ((values.unsqueeze(1) >> shifts) & 0xFF).to(torch.uint8)


def _u32(data: torch.Tensor) -> torch.Tensor:
    d = data.to(torch.int64)
    return d[:, 0] | (d[:, 1] << 8) | (d[:, 2] << 16) | (d[:, 3] << 24)


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    rows, cols = x.shape
    if cols % size:
        raise InfoptError(f"rows of {cols} values do not split into blocks of {size}")
    return x.reshape(rows * cols // size, size)


# --- exact grids (a method's result stored without a second rounding) ----------------------------------------


def pack_q8_0(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """codes int [rows, cols] in -128..127, d [rows, cols/32] (fp16-exact) -> [rows, cols/32 * 34] bytes."""
    rows = codes.shape[0]
    q = _blocks(codes.to(torch.int8), QK).view(torch.uint8)
    out = torch.cat([_f16_bytes(d.reshape(-1, 1)), q], dim=1)
    return out.reshape(rows, -1)


def pack_q4_0(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """codes in -8..7 (x = d * codes), d [rows, cols/32]."""
    rows = codes.shape[0]
    q = _blocks((codes.to(torch.int16) + 8), QK)
    return torch.cat([_f16_bytes(d.reshape(-1, 1)), _nibbles(q)], dim=1).reshape(rows, -1)


def pack_q4_1(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """codes in 0..15 (x = d * codes + m), d and m [rows, cols/32]."""
    rows = codes.shape[0]
    q = _blocks(codes.to(torch.int16), QK)
    return torch.cat([_f16_bytes(d.reshape(-1, 1)), _f16_bytes(m.reshape(-1, 1)), _nibbles(q)], dim=1).reshape(rows, -1)


def pack_q5_0(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """codes in -16..15 (x = d * codes)."""
    rows = codes.shape[0]
    q = _blocks(codes.to(torch.int16) + 16, QK)
    return torch.cat([_f16_bytes(d.reshape(-1, 1)), _fifth_bits(q), _nibbles(q & 0x0F)], dim=1).reshape(rows, -1)


def pack_q5_1(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """codes in 0..31 (x = d * codes + m)."""
    rows = codes.shape[0]
    q = _blocks(codes.to(torch.int16), QK)
    return torch.cat([_f16_bytes(d.reshape(-1, 1)), _f16_bytes(m.reshape(-1, 1)), _fifth_bits(q),
                      _nibbles(q & 0x0F)], dim=1).reshape(rows, -1)


def _pack_k_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """[n, 8] 6-bit scales and mins -> [n, 12] bytes (ggml's get_scale_min_k4 order)."""
    sc, mn = sc.to(torch.int16), mn.to(torch.int16)
    low = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    mid = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    high = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return torch.cat([low, mid, high], dim=1).to(torch.uint8)


def _unpack_k_scales(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = data.to(torch.int16)
    low, mid, high = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([low & 63, (high & 15) | ((low >> 6) << 4)], dim=1)
    mn = torch.cat([mid & 63, (high >> 4) | ((mid >> 6) << 4)], dim=1)
    return sc, mn


def _k_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[n, 256] codes -> [n, 128] bytes: per 64 values, byte l = value l (low) | value l + 32 (high)."""
    q = q.reshape(-1, 4, 2, 32)
    return ((q[:, :, 0] & 15) | ((q[:, :, 1] & 15) << 4)).reshape(-1, 128).to(torch.uint8)


def _k_unnibble(qs: torch.Tensor) -> torch.Tensor:
    q = qs.to(torch.int16).reshape(-1, 4, 1, 32)
    return torch.cat([q & 15, q >> 4], dim=2).reshape(-1, 256)


def pack_q4_k(codes: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor,
              mn: torch.Tensor) -> torch.Tensor:
    """codes 0..15 [rows, cols]; per super-block d, dmin (fp16-exact) [rows, cols/256]; 6-bit sc, mn
    [rows, cols/256, 8]. x = (d * sc) * q - (dmin * mn)."""
    rows = codes.shape[0]
    q = _blocks(codes.to(torch.int16), QK_K)
    return torch.cat([_f16_bytes(d.reshape(-1, 1)), _f16_bytes(dmin.reshape(-1, 1)),
                      _pack_k_scales(sc.reshape(-1, 8), mn.reshape(-1, 8)), _k_nibbles(q)], dim=1).reshape(rows, -1)


def pack_q5_k(codes, d, dmin, sc, mn) -> torch.Tensor:
    """As pack_q4_k with codes 0..31."""
    rows = codes.shape[0]
    q = _blocks(codes.to(torch.int16), QK_K)
    bits = ((q >> 4) & 1).reshape(-1, 8, 32)  # sub-block s, value l
    qh = (bits << torch.arange(8).reshape(1, 8, 1)).sum(dim=1).to(torch.uint8)  # byte l, bit s
    return torch.cat([_f16_bytes(d.reshape(-1, 1)), _f16_bytes(dmin.reshape(-1, 1)),
                      _pack_k_scales(sc.reshape(-1, 8), mn.reshape(-1, 8)), qh, _k_nibbles(q & 15)],
                     dim=1).reshape(rows, -1)


def pack_q6_k(codes: torch.Tensor, d: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
    """codes -32..31 [rows, cols]; d [rows, cols/256]; int8 sc [rows, cols/256, 16]. x = (d * sc) * codes."""
    rows = codes.shape[0]
    q = (_blocks(codes.to(torch.int16), QK_K) + 32).reshape(-1, 2, 4, 32)  # half h, quarter k, value l
    low, high = q & 15, q >> 4
    # ql: per half, 64 bytes; byte e (e < 32) = quarter 0 value e | quarter 2 value e << 4; byte 32 + e likewise
    # for quarters 1 and 3
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2).reshape(-1, 128)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
    scales = sc.reshape(-1, 16).to(torch.int8).view(torch.uint8)
    return torch.cat([ql.to(torch.uint8), qh.to(torch.uint8), scales, _f16_bytes(d.reshape(-1, 1))],
                     dim=1).reshape(rows, -1)


# --- dequantization ------------------------------------------------------------------------------------------


def dequantize(type_name: str, data: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Raw bytes (uint8, row-major blocks) of a [rows, cols] tensor -> float32 values."""
    if type_name == "F32":
        return data.contiguous().view(torch.float32).reshape(rows, cols).clone()
    if type_name == "F16":
        return data.contiguous().view(torch.float16).reshape(rows, cols).to(torch.float32)
    if type_name == "BF16":
        return data.contiguous().view(torch.bfloat16).reshape(rows, cols).to(torch.float32)
    return unpack_blocks(type_name, data, rows, cols).dequantize()


def unpack_blocks(type_name: str, data: torch.Tensor, rows: int, cols: int) -> BlockWeight:
    """Raw bytes of a [rows, cols] tensor of a block type -> its codes and per-block steps and offsets, which
    multiply and add to the values ggml's dequantize_row_* computes."""
    t = TYPES[type_name]
    b = data.reshape(-1, t.nbytes)
    offset = None
    if type_name == "Q8_0":
        codes, scale, low = b[:, 2:].contiguous().view(torch.int8), _f16(b[:, :2]), -128
    elif type_name == "Q4_0":
        codes, scale, low = _unnibble(b[:, 2:]).to(torch.int16) - 8, _f16(b[:, :2]), -8
    elif type_name == "Q4_1":
        codes, scale, offset, low = _unnibble(b[:, 4:]), _f16(b[:, :2]), _f16(b[:, 2:4]), 0
    elif type_name in ("Q5_0", "Q5_1"):
        start = 2 if type_name == "Q5_0" else 4
        mask = _u32(b[:, start : start + 4])
        high = ((mask.unsqueeze(1) >> torch.arange(32)) & 1).to(torch.int16)
        codes, scale = _unnibble(b[:, start + 4 :]).to(torch.int16) | (high << 4), _f16(b[:, :2])
        if type_name == "Q5_0":
            codes, low = codes - 16, -16
        else:
            offset, low = _f16(b[:, 2:4]), 0
    elif type_name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = _unpack_k_scales(b[:, 4:16])
        scale = (d * sc.to(torch.float32)).reshape(-1, 1)
        offset = (dmin * mn.to(torch.float32)).neg_().reshape(-1, 1)  # x = (d * sc) * q - dmin * mn
        if type_name == "Q4_K":
            codes = _k_unnibble(b[:, 16:])
        else:
            qh = b[:, 16:48].to(torch.int16)
            high = (qh.unsqueeze(1) >> torch.arange(8).reshape(1, 8, 1)) & 1  # [n, sub-block, value]
            codes = _k_unnibble(b[:, 48:]) | (high.reshape(-1, 256) << 4)
        low = 0
    elif type_name == "Q6_K":
        ql, qh = b[:, :128].to(torch.int16), b[:, 128:192].to(torch.int16)
        sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
        scale = (_f16(b[:, 208:210]) * sc).reshape(-1, 1)
        low_bits = (ql.reshape(-1, 2, 1, 64) >> torch.tensor([0, 4]).reshape(1, 1, 2, 1)) & 15  # [n, h, shift, 64]
        high = (qh.reshape(-1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6]).reshape(1, 1, 4, 1)) & 3  # [n, h, k, 32]
        codes, low = (low_bits.reshape(-1, 8, 32) | (high.reshape(-1, 8, 32) << 4)) - 32, -32
    else:
        raise InfoptError(f"cannot dequantize {type_name}")
    steps = cols // (16 if type_name == "Q6_K" else QK)  # one step per 32 values; Q6_K's per 16
    return BlockWeight(codes=codes.to(torch.int8).reshape(rows, cols), scale=scale.reshape(rows, steps),
                       offset=None if offset is None else offset.reshape(rows, steps), bits=CODE_BITS[type_name],
                       low=low)


# --- float quantizers ----------------------------------------------------------------------------------------


def _symmetric_search(x: torch.Tensor, w: torch.Tensor, nmax: int, steps: int = 9) -> torch.Tensor:
    """Best scale per block for x = s * q, q in [-nmax, nmax - 1] (q = -nmax carries the signed maximum), among
    candidate roundings around amax / nmax, each with its least-squares s: the one maximising (sum w x q)^2 / sum w q^2,
    which is minimising the weighted error sum w x^2 minus that (ggml's make_qx_quants picks by the same measure).
    Sums in float64; the C++ form (symmetric_scale_search) computes the same, step for step, where it is built."""
    kernels = search_kernels(x)
    if kernels is not None:
        return kernels.symmetric_scale_search(x.contiguous(), w.to(torch.float32).contiguous(), nmax, steps)
    amax_index = x.abs().argmax(dim=1, keepdim=True)
    peak = x.gather(1, amax_index)  # signed value of largest magnitude
    inverse = peak.reciprocal()
    wx, w64 = w.double() * x.double(), w.double()
    best = torch.zeros(peak.shape, dtype=torch.float64, device=x.device)
    best_scale = torch.zeros_like(best)
    for step in range(-steps, steps + 1):
        iscale = torch.where(peak == 0, torch.zeros_like(peak), inverse * -(nmax + 0.1 * step))
        q = torch.clamp(round_half_away(x * iscale), -nmax, nmax - 1).double()
        sumlx = (wx * q).sum(dim=1, keepdim=True)
        suml2 = (w64 * q * q).sum(dim=1, keepdim=True)
        value = torch.where(suml2 > 0, sumlx * sumlx / suml2.clamp_min(1e-300), torch.zeros_like(suml2))
        better = value > best * BETTER  # see kgrid.BETTER
        best = torch.where(better, value, best)
        best_scale = torch.where(better, sumlx / suml2.clamp_min(1e-300), best_scale)
    return best_scale.float()


# Rows quantized per pass: the scale searches run ~20 candidates of ~10 elementwise passes each, and on chunks of
# about 2^18 values their temporaries stay in cache (a 5632 x 2048 tensor to Q4_0: 0.64 s against 4.1 s in one pass,
# 2026-12-02). Blocks never span rows, so the bytes do not depend on the chunking.
CHUNK_VALUES = 1 << 18


def quantize(type_name: str, weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """A float [rows, cols] tensor -> [rows, bytes per row] uint8 in `type_name` (round to nearest on a searched
    grid). imatrix: float [cols], the mean of x^2 per input column over calibration text."""
    if type_name in FLOAT_TYPES:
        x = weight.to(torch.float32)
        return x.to(FLOAT_TYPES[type_name]).contiguous().view(torch.uint8).reshape(*x.shape[:-1], -1)
    rows, cols = weight.shape
    row_bytes(type_name, cols)
    if imatrix is not None and imatrix.numel() != cols:
        raise InfoptError(f"the importance matrix has {imatrix.numel()} columns, the tensor {cols}")
    step = max(1, CHUNK_VALUES // cols)
    if rows <= step:
        return _quantize_rows(type_name, weight.to(torch.float32), imatrix)
    out = torch.empty(rows, row_bytes(type_name, cols), dtype=torch.uint8)
    for start in range(0, rows, step):
        out[start : start + step] = _quantize_rows(type_name, weight[start : start + step].to(torch.float32), imatrix)
    return out


def _quantize_rows(type_name: str, x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    rows, cols = x.shape
    t = TYPES[type_name]
    if type_name in ("Q4_0", "Q5_0", "Q8_0"):
        blocks = _blocks(x, QK)
        kernels = search_kernels(blocks)
        if type_name == "Q8_0" and kernels is not None and (packed := unless_non_finite(kernels.round_q8_0, blocks)) is not None:
            return packed.reshape(rows, -1)
        nmax = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 128}[type_name]
        if type_name == "Q8_0":  # the symmetric 8-bit grid needs no search: amax / 127, as ggml does
            d = (blocks.abs().amax(dim=1, keepdim=True) / 127).to(torch.float16).to(torch.float32)
        else:
            w = importance_weights(blocks, imatrix, QK)
            d = _symmetric_search(blocks, w, nmax).to(torch.float16).to(torch.float32)
            if type_name == "Q4_0" and kernels is not None and (
                    packed := unless_non_finite(kernels.round_q4_0, blocks, d.reshape(-1))) is not None:
                return packed.reshape(rows, -1)
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        hi = 127 if type_name == "Q8_0" else nmax - 1
        q = torch.clamp(round_half_away(blocks * inv), -nmax if type_name != "Q8_0" else -127, hi)
        pack = {"Q4_0": pack_q4_0, "Q5_0": pack_q5_0, "Q8_0": pack_q8_0}[type_name]
        return pack(q.reshape(rows, cols), d.reshape(rows, -1))
    if type_name in ("Q4_1", "Q5_1"):
        blocks = _blocks(x, QK)
        nmax = 15 if type_name == "Q4_1" else 31
        scale, minimum = affine_search(blocks, importance_weights(blocks, imatrix, QK), nmax, nonnegative_min=False)
        d = scale.to(torch.float16).to(torch.float32)
        lo = (-minimum).to(torch.float16).to(torch.float32)
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.clamp(round_half_away((blocks - lo) * inv), 0, nmax)
        pack = pack_q4_1 if type_name == "Q4_1" else pack_q5_1
        return pack(q.reshape(rows, cols), d.reshape(rows, -1), lo.reshape(rows, -1))
    if type_name in ("Q4_K", "Q5_K"):
        nmax = 15 if type_name == "Q4_K" else 31
        sub = _blocks(x, 32)
        scale, minimum = affine_search(sub, importance_weights(sub, imatrix, 32), nmax)
        sc, mn, d, dmin = super_scales(scale.reshape(-1, 8), minimum.reshape(-1, 8))
        q = grid_codes(x, d, dmin, sc, mn, nmax)
        pack = pack_q4_k if type_name == "Q4_K" else pack_q5_k
        return pack(q, d.reshape(rows, -1), dmin.reshape(rows, -1), sc.reshape(rows, -1, 8), mn.reshape(rows, -1, 8))
    if type_name == "Q6_K":
        sub = _blocks(x, 16)
        scale = _symmetric_search(sub, importance_weights(sub, imatrix, 16), 32).reshape(-1, 16)
        peak_index = scale.abs().argmax(dim=1, keepdim=True)
        peak = scale.gather(1, peak_index)
        iscale = torch.where(peak == 0, torch.zeros_like(peak), -128 / peak)
        d = torch.where(iscale == 0, torch.zeros_like(peak), 1 / iscale).to(torch.float16).to(torch.float32)
        sc = torch.clamp(round_half_away(iscale * scale), -128, 127)
        step = (d * sc).reshape(-1, 1)
        inv = torch.where(step == 0, torch.zeros_like(step), 1 / step)
        q = torch.clamp(round_half_away(sub * inv), -32, 31).reshape(rows, cols)
        return pack_q6_k(q, d.reshape(rows, -1), sc.reshape(rows, -1, 16))
    raise InfoptError(f"cannot quantize to {t.name}")  # pragma: no cover
