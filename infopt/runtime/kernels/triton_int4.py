"""Triton GPU kernels for int2/3/4/8 quantized linear layers (optional: needs triton and a CUDA GPU).

    packed = pack(quantized_weight)   # once, at load time; the tensors live on the GPU
    y = matmul(x, packed)             # [tokens, out] in x's dtype, accumulated in fp32

Layout (GpuPackedWeight), chosen so that a warp's loads run along the output dimension and coalesce:
  bits <= 4: qweight int32 [in / 8, out]; bits 4r..4r+3 of word [i, n] hold stored column 8i + r of output row n,
             as the unsigned code (code - qmin). 2- and 3-bit codes use the same nibbles.
  bits == 8: qweight int8 [in, out], the signed codes.
  scales [groups, out] in the source scale dtype; zeros [groups, out] in the same dtype and in the stored codes'
  domain (unsigned zero for <= 4 bits, signed for 8), None when symmetric. The weight is (q - z) * s, with
  z = -qmin for symmetric <= 4-bit weights and z = 0 for symmetric int8.
  Act-order (GPTQ desc_act): columns are stored sorted by group and perm (int32 [in]) says which input column each
  stored column multiplies; the kernels gather x through it.

Kernels (matmul picks by token count; kernel= forces one):
  gemv: tokens <= GEMV_MAX_TOKENS (decoding). One program per (BLOCK_N output rows, K split, token) streams its K
        range of the packed weight, unpacks and dequantizes it in registers and accumulates x * w in an fp32 tile
        that is reduced once at the end; the partial sums of a split K meet through fp32 atomic adds.
  gemm: more tokens; with BLOCK_M = 16 tiles split along K it is also the small-batch path. Tiles of x
        [BLOCK_M, BLOCK_K] meet weight tiles [BLOCK_K, BLOCK_N] dequantized to x's dtype in tl.dot with an fp32
        accumulator (fp32 inputs use input_precision="ieee": no TF32 rounding).
Both form each weight as (q - z) * s in fp32 (the gemm then rounds it to x's dtype for fp16/bf16 x). A K block may
span several groups (then scales and zeros are loaded per row of the block) or lie inside one (one row of them).

CPU interpreter: set INFOPT_TRITON_INTERPRET=1 before importing this module. It turns on Triton's interpreter
(TRITON_INTERPRET=1, which runs kernels with numpy) and lets available() say yes without a GPU; pack(...,
device="cpu") then keeps the tensors on the CPU. The interpreter is slow: small shapes only.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from infopt.quant.weights import QuantizedWeight

INTERPRET = os.environ.get("INFOPT_TRITON_INTERPRET") == "1"
if INTERPRET:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when @triton.jit runs, so before the import below

try:
    import triton
    import triton.language as tl
except Exception as exc:  # noqa: BLE001 -- optional dependency: any import failure means "not available"
    triton = None
    _IMPORT_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"
else:
    _IMPORT_ERROR = ""

# Above this many tokens matmul uses the tl.dot kernel: on the H100 the gemv (which streams the weight once per
# token, later tokens mostly from L2) already lost to it at 2 tokens on 4096x4096 and at 4 on 11008x4096.
GEMV_MAX_TOKENS = 1
PACK = 8  # 4-bit codes per int32 word


def reason() -> str:
    """Why the Triton kernels cannot run here ("" when they can)."""
    if triton is None:
        return _IMPORT_ERROR
    if INTERPRET:
        return ""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return ""


def available() -> bool:
    return reason() == ""


@dataclass
class GpuPackedWeight:
    bits: int
    qweight: torch.Tensor  # int32 [in / 8, out] (bits <= 4) or int8 [in, out] (bits == 8)
    scales: torch.Tensor  # [groups, out], the scale dtype
    zeros: torch.Tensor | None  # [groups, out], scale dtype, in the stored codes' domain; None when symmetric
    group_size: int  # stored columns per group (in_features for one scale per row)
    in_features: int
    out_features: int
    perm: torch.Tensor | None = None  # int32 [in]: stored column j multiplies input column perm[j]

    @property
    def offset(self) -> float:
        """The zero point of symmetric weights, in the stored codes' domain."""
        return 0.0 if self.bits == 8 else float(1 << (self.bits - 1))

    @property
    def nbytes(self) -> int:
        """Bytes one product streams: packed codes, scales and zero points."""
        tensors = [self.qweight, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def _act_order_perm(g_idx: torch.Tensor, groups: int) -> torch.Tensor | None:
    """Stable sort of the columns by group (None when already in order); groups must be equal in size."""
    in_f = g_idx.numel()
    g_idx = g_idx.cpu().to(torch.int64)
    perm = torch.argsort(g_idx, stable=True)
    if in_f % groups or not torch.equal(g_idx[perm], torch.arange(in_f) // (in_f // groups)):
        raise ValueError("act-order g_idx groups are not all the same size")
    return None if torch.equal(perm, torch.arange(in_f)) else perm


def _check_shape(bits: int, in_f: int, group_size: int) -> None:
    if bits <= 4 and in_f % PACK:
        raise ValueError(f"{in_f} input features are not a multiple of {PACK} (int32 words of 4-bit codes)")
    if group_size != in_f and group_size % 16:
        raise ValueError(f"group size {group_size} is not a multiple of 16")


def pack_words(unsigned: torch.Tensor) -> torch.Tensor:
    """int32 [in / 8, out] from unsigned 4-bit codes [out, in]: nibble r of word i holds column 8i + r."""
    out_f, in_f = unsigned.shape
    by_word = unsigned.to(torch.int64).t().reshape(in_f // PACK, PACK, out_f)
    shifts = (torch.arange(PACK, device=unsigned.device) * 4).view(1, PACK, 1)
    words = (by_word << shifts).sum(dim=1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_words(words: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_words: int32 codes [out, in]."""
    shifts = (torch.arange(PACK, device=words.device) * 4).view(1, PACK, 1)
    nibbles = (words.unsqueeze(1) >> shifts) & 0xF
    return nibbles.reshape(-1, words.shape[1]).t()


def pack(weight: QuantizedWeight, device: str | torch.device = "cuda") -> GpuPackedWeight:
    """Repack `weight` into the GPU layout on `device`; raises ValueError for shapes the kernels cannot take."""
    out_f, in_f = weight.shape
    bits, groups = weight.spec.bits, weight.scale.shape[1]
    if in_f % groups:
        raise ValueError(f"{in_f} input features do not split into {groups} equal groups")
    group_size = in_f // groups
    _check_shape(bits, in_f, group_size)
    perm = None if weight.g_idx is None else _act_order_perm(weight.g_idx, groups)
    codes = weight.codes if perm is None else weight.codes[:, perm]
    qmin = weight.spec.qmin
    if bits <= 4:
        qweight = pack_words(codes.to(torch.int32) - qmin)
    else:
        qweight = codes.to(torch.int8).t().contiguous()
    zeros = None
    if weight.zero is not None:
        shift = qmin if bits <= 4 else 0
        zeros = (weight.zero.to(torch.int32) - shift).to(weight.scale.dtype).t().contiguous().to(device)
    return GpuPackedWeight(
        bits=bits, qweight=qweight.to(device), scales=weight.scale.t().contiguous().to(device), zeros=zeros,
        group_size=group_size, in_features=in_f, out_features=out_f,
        perm=None if perm is None else perm.to(torch.int32).to(device))


def dequantize(w: GpuPackedWeight) -> torch.Tensor:
    """Dense fp32 [out, in] in the original column order (plain torch, on w's device)."""
    q = unpack_words(w.qweight) if w.bits <= 4 else w.qweight.t()
    index = torch.arange(w.in_features, device=q.device) // w.group_size
    zero = w.offset if w.zeros is None else w.zeros.float().t()[:, index]
    stored = (q.float() - zero) * w.scales.float().t()[:, index]
    if w.perm is None:
        return stored
    dense = torch.empty_like(stored)
    dense[:, w.perm.long()] = stored
    return dense


# Launch settings from benchmarks/gpu_check.py --sweep on an H100 (torch 2.11, triton 3.6), 4096x4096 and
# 11008x4096 weights; gemv()/gemm() take overrides. waves: target programs per SM (sets the K split).
GEMV_CONFIG = {"block_n": 64, "block_k4": 512, "block_k8": 128, "warps": 4, "waves": 4}
GEMM_CONFIG = {"block_n": 64, "block_k": 64, "block_k_fp32": 32, "warps": 4, "stages": 3, "waves": 4}


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def _splits(chunks: int, tiles: int, device: torch.device, waves: int) -> tuple[int, int]:
    """(K splits, chunks per split) giving about `waves` programs per SM."""
    split = max(1, min(chunks, (waves * _sm_count(device)) // max(1, tiles)))
    per_split = triton.cdiv(chunks, split)
    return triton.cdiv(chunks, per_split), per_split


def _row_scales(w: GpuPackedWeight, block_k: int) -> bool:
    """Whether a K block can span several groups (then scales are loaded per row of the block)."""
    return w.group_size != w.in_features and w.group_size % block_k != 0


def _output(tokens: int, w: GpuPackedWeight, x: torch.Tensor, split: int) -> torch.Tensor:
    if split > 1:
        return torch.zeros(tokens, w.out_features, dtype=torch.float32, device=x.device)
    return torch.empty(tokens, w.out_features, dtype=x.dtype, device=x.device)


def _kernel_bits(w: GpuPackedWeight) -> int:
    return 8 if w.bits == 8 else 4  # 2- and 3-bit codes share the 4-bit layout (one compiled kernel fewer)


def _dummy(w: GpuPackedWeight, t: torch.Tensor | None) -> torch.Tensor:
    return w.scales if t is None else t


def gemv(x: torch.Tensor, w: GpuPackedWeight, config: dict | None = None) -> torch.Tensor:
    """[tokens, out] for a few tokens: the streaming kernel, one program per (row block, K split, token)."""
    cfg = {**GEMV_CONFIG, **(config or {})}
    tokens, block_n = x.shape[0], cfg["block_n"]
    block_k = cfg["block_k4"] if w.bits <= 4 else cfg["block_k8"]
    chunks = triton.cdiv(w.in_features, block_k)
    tiles_n = triton.cdiv(w.out_features, block_n)
    split, per_split = _splits(chunks, tiles_n * tokens, x.device, cfg["waves"])
    out = _output(tokens, w, x, split)
    _gemv_kernel[(tiles_n, split, tokens)](
        x, w.qweight, w.scales, _dummy(w, w.zeros), _dummy(w, w.perm), out,
        w.out_features, w.in_features, w.group_size, per_split,
        BITS=_kernel_bits(w), offset=w.offset, HAS_ZERO=w.zeros is not None, HAS_PERM=w.perm is not None,
        ROW_SCALES=_row_scales(w, block_k), ATOMIC=split > 1, BLOCK_N=block_n, BLOCK_K=block_k,
        ROWS=block_k // PACK if w.bits <= 4 else block_k, num_warps=cfg["warps"])
    return out


def gemm(x: torch.Tensor, w: GpuPackedWeight, config: dict | None = None) -> torch.Tensor:
    """[tokens, out] through tl.dot on dequantized tiles (split along K when the tile grid is small)."""
    cfg = {**GEMM_CONFIG, **(config or {})}
    tokens = x.shape[0]
    block_m = min(128, max(16, triton.next_power_of_2(tokens)))
    block_n = cfg["block_n"] if tokens <= 64 else 128
    warps = cfg["warps"] if tokens <= 64 else 8
    block_k = cfg["block_k"] if x.dtype != torch.float32 else cfg["block_k_fp32"]
    chunks = triton.cdiv(w.in_features, block_k)
    tiles_m, tiles_n = triton.cdiv(tokens, block_m), triton.cdiv(w.out_features, block_n)
    split, per_split = _splits(chunks, tiles_m * tiles_n, x.device, cfg["waves"])
    out = _output(tokens, w, x, split)
    _gemm_kernel[(tiles_m, tiles_n, split)](
        x, w.qweight, w.scales, _dummy(w, w.zeros), _dummy(w, w.perm), out,
        tokens, w.out_features, w.in_features, w.group_size, per_split,
        BITS=_kernel_bits(w), offset=w.offset, HAS_ZERO=w.zeros is not None, HAS_PERM=w.perm is not None,
        ROW_SCALES=_row_scales(w, block_k), ATOMIC=split > 1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else None, num_warps=warps, num_stages=cfg["stages"])
    return out


def matmul(x: torch.Tensor, w: GpuPackedWeight, kernel: str | None = None) -> torch.Tensor:
    """x [..., in] (fp16/bf16/fp32, on w's device) @ w.T -> [..., out] in x's dtype; kernel "gemv", "gemm" or None."""
    if not available():
        raise RuntimeError(f"the Triton kernels are unavailable: {reason()}")
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight takes {w.in_features}")
    lead = x.shape[:-1]
    flat = x.reshape(-1, w.in_features).contiguous()
    if kernel is None:
        kernel = "gemv" if flat.shape[0] <= GEMV_MAX_TOKENS else "gemm"
    if kernel not in ("gemv", "gemm"):
        raise ValueError(f"invalid kernel {kernel!r}: choose gemv or gemm")
    if flat.shape[0] == 0:
        return torch.empty(*lead, w.out_features, dtype=x.dtype, device=x.device)
    y = gemv(flat, w) if kernel == "gemv" else gemm(flat, w)
    return y.to(x.dtype).reshape(*lead, w.out_features)


if triton is not None:

    @triton.jit
    def _load_x(row_ptr, perm_ptr, offs_k, mask_k, HAS_PERM: tl.constexpr):
        if HAS_PERM:
            cols = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        else:
            cols = offs_k
        return tl.load(row_ptr + cols, mask=mask_k, other=0.0).to(tl.float32)

    @triton.jit
    def _group_params(s_ptr, z_ptr, k0, offs_k, mask_k, offs_n, mask_n, N, group_size, offset,
                      HAS_ZERO: tl.constexpr, ROW_SCALES: tl.constexpr):
        """Scales and zero points, [1, BLOCK_N] for the group of the K block starting at k0, or [rows, BLOCK_N]
        per row k of offs_k when a block spans several groups (the zero is `offset` when symmetric)."""
        if ROW_SCALES:
            index = (offs_k // group_size)[:, None] * N + offs_n[None, :]
            mask = mask_k[:, None] & mask_n[None, :]
        else:
            index = (k0 // group_size) * N + offs_n[None, :]
            mask = mask_n[None, :]
        s = tl.load(s_ptr + index, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + index, mask=mask, other=0.0).to(tl.float32)
        else:
            z = offset
        return s, z

    @triton.jit
    def _gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, N, K, group_size, per_split,
                     BITS: tl.constexpr, offset, HAS_ZERO: tl.constexpr, HAS_PERM: tl.constexpr,
                     ROW_SCALES: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     ROWS: tl.constexpr):
        pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        rows = tl.arange(0, ROWS)
        x_row = x_ptr + m * K
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        first = pid_k * per_split
        last = tl.minimum(first + per_split, tl.cdiv(K, BLOCK_K))
        for c in range(first, last):
            k0 = c * BLOCK_K
            if BITS == 8:
                offs_k = k0 + rows
                mask_k = offs_k < K
                s, z = _group_params(s_ptr, z_ptr, k0, offs_k, mask_k, offs_n, mask_n, N, group_size, offset,
                                     HAS_ZERO, ROW_SCALES)
                q = tl.load(qw_ptr + offs_k[:, None] * N + offs_n[None, :],
                            mask=mask_k[:, None] & mask_n[None, :], other=0)
                xk = _load_x(x_row, perm_ptr, offs_k, mask_k, HAS_PERM)
                part = xk[:, None] * (q.to(tl.float32) - z)
            else:
                offs_w = c * ROWS + rows
                mask_w = offs_w < K // 8
                # a word's 8 columns share a group (group sizes are multiples of 16)
                s, z = _group_params(s_ptr, z_ptr, k0, offs_w * 8, mask_w, offs_n, mask_n, N, group_size, offset,
                                     HAS_ZERO, ROW_SCALES)
                words = tl.load(qw_ptr + offs_w[:, None] * N + offs_n[None, :],
                                mask=mask_w[:, None] & mask_n[None, :], other=0)
                part = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
                for r in tl.static_range(8):
                    q = (words >> (4 * r)) & 0xF
                    xk = _load_x(x_row, perm_ptr, offs_w * 8 + r, mask_w, HAS_PERM)
                    part += xk[:, None] * (q.to(tl.float32) - z)
            acc += part * s
        total = tl.sum(acc, axis=0)
        if ATOMIC:
            tl.atomic_add(out_ptr + m * N + offs_n, total, mask=mask_n)
        else:
            tl.store(out_ptr + m * N + offs_n, total.to(out_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, M, N, K, group_size, per_split,
                     BITS: tl.constexpr, offset, HAS_ZERO: tl.constexpr, HAS_PERM: tl.constexpr,
                     ROW_SCALES: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = offs_m < M, offs_n < N
        kk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        first = pid_k * per_split
        last = tl.minimum(first + per_split, tl.cdiv(K, BLOCK_K))
        for c in range(first, last):
            offs_k = c * BLOCK_K + kk
            mask_k = offs_k < K
            if HAS_PERM:
                cols = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
            else:
                cols = offs_k
            a = tl.load(x_ptr + offs_m[:, None] * K + cols[None, :], mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0)
            mask_w = mask_k[:, None] & mask_n[None, :]
            if BITS == 8:
                q = tl.load(qw_ptr + offs_k[:, None] * N + offs_n[None, :], mask=mask_w, other=0)
            else:
                words = tl.load(qw_ptr + (offs_k[:, None] // 8) * N + offs_n[None, :], mask=mask_w, other=0)
                q = (words >> ((offs_k[:, None] % 8) * 4)) & 0xF
            s, z = _group_params(s_ptr, z_ptr, c * BLOCK_K, offs_k, mask_k, offs_n, mask_n, N, group_size, offset,
                                 HAS_ZERO, ROW_SCALES)
            b = ((q.to(tl.float32) - z) * s).to(a.dtype)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        out = out_ptr + offs_m[:, None] * N + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        if ATOMIC:
            tl.atomic_add(out, acc, mask=mask)
        else:
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
