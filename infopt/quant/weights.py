"""The typed weight containers every method produces and every format reads, with their dequantization.

Integer weights (QuantizedWeight) follow the conventions of GPTQ's reference code and of compressed-tensors:
signed codes q in [-2^(b-1), 2^(b-1)-1], w ~ (q - z) * s per group. 4-bit table weights (FourBitWeight) are
bitsandbytes' NF4/FP4: w ~ code[q] * absmax[block] over the flattened weight, two codes per byte, the even
element in the high nibble. Block weights (BlockWeight) are llama.cpp's small-block grids, w = q * s (+ m) with a
float offset m. None knows which algorithm produced it or which file will hold it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infopt.errors import InfoptError
from infopt.quant.spec import QuantSpec


@dataclass(frozen=True)
class Storage:
    """What the output format can store, which the quantization grid must respect."""

    scale_dtype: torch.dtype | None = None  # None: the source weight's dtype
    # lowest storable zero point, counted from qmin (GPTQ v1 stores zero - 1, so it cannot hold qmin)
    min_zero_offset: int = 0
    g_idx: bool = False  # a per-column group index (act-order without static groups)
    grid: str | None = None  # a fixed grid the format stores (GGUF's "Q4_K": infopt.quant.kgrid); None: integer groups


@dataclass(frozen=True, kw_only=True)
class MethodRecord:
    """How the weights were made, as far as an output format records it. Fields a method has no notion of stay None,
    and formats write only what is set (an RTN checkpoint in GPTQ format claims no dampening)."""

    method: str
    act_order: bool = False  # columns quantized in decreasing activation order
    static_groups: bool = False  # act-order with group parameters fixed up front (no g_idx needed)
    damp: float | None = None  # GPTQ's Hessian dampening fraction
    true_sequential: bool | None = None  # each linear calibrated on inputs from the already-quantized ones
    quant_type: str | None = None  # 4-bit table: nf4 or fp4
    double_quant: bool | None = None  # 4-bit: absmax quantized again
    compute_dtype: torch.dtype = torch.float32  # the dtype loaders should compute in (the source's)


def relative_error(weight, reference: torch.Tensor) -> float:
    """||dequantized - reference||^2 / ||reference||^2 of any quantized weight (a command's reported error): one C++
    pass for grouped integer grids of float32 / bfloat16 / float16 weights and scales (runtime/kernels/grid_search.cpp
    grid_error: the weights formed as dequantize() forms them, sums in float64), else through dequantize()."""
    from infopt.runtime.kernels.ops import KERNEL_INPUT_DTYPES as FLOATS  # noqa: PLC0415 (it imports this module)

    if (isinstance(weight, QuantizedWeight) and weight.g_idx is None and reference.device.type == "cpu"
            and reference.dtype in FLOATS and weight.scale.dtype in FLOATS and weight.shape[1] > 0):
        group = weight.shape[1] // weight.scale.shape[1]
        if group % 16 == 0:
            from infopt.runtime.kernels import build  # noqa: PLC0415 (builds the extension on first use)

            ops = build.ops()
            if ops is not None:
                zero = weight.zero if weight.zero is not None else torch.empty(0, dtype=torch.int8)
                err, energy = ops.grid_error(reference.contiguous(), weight.codes.contiguous(),
                                             weight.scale.contiguous(), zero.contiguous(), group).tolist()
                return err / max(energy, 1e-30)
    residual = weight.dequantize().float() - reference.float()
    return float(torch.linalg.vector_norm(residual) ** 2
                 / (torch.linalg.vector_norm(reference.float()) ** 2).clamp_min(1e-30))


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # int8 [out, in], signed levels
    scale: torch.Tensor  # [out, groups], storage dtype (the source weight's dtype)
    zero: torch.Tensor | None  # int8 [out, groups], None when symmetric
    spec: QuantSpec
    # int32 [in]: the group of each input column. None means column j is in group j // width;
    # GPTQ's act-order (desc_act) assigns groups in activation order instead.
    g_idx: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """Weights in the scale's dtype, computed the way compressed-tensors computes them."""
        out_f, in_f = self.codes.shape
        # levels is a fresh copy of the codes: updated in place, one weight-sized allocation
        if self.g_idx is not None:
            levels = self.codes.to(self.scale.dtype, copy=True)
            index = self.g_idx.long()
            if self.zero is not None:
                levels.sub_(self.zero.to(self.scale.dtype)[:, index])
            return levels.mul_(self.scale[:, index])
        groups = self.scale.shape[1]
        width = in_f // groups
        levels = self.codes.reshape(out_f, groups, width).to(self.scale.dtype, copy=True)
        if self.zero is not None:
            levels.sub_(self.zero.to(self.scale.dtype).unsqueeze(-1))
        return levels.mul_(self.scale.unsqueeze(-1)).reshape(out_f, in_f)

    def column_groups(self) -> torch.Tensor:
        """int32 [in]: the group index of every input column (g_idx, explicit or implied)."""
        if self.g_idx is not None:
            return self.g_idx.to(torch.int32)
        in_f = self.codes.shape[1]
        width = in_f // self.scale.shape[1]
        return (torch.arange(in_f) // width).to(torch.int32)


# The NF4 table of the QLoRA paper (Dettmers et al. 2023, appendix E), as the fp32 values of bitsandbytes'
# functional.get_4bit_type("nf4"): quantiles of N(0, 1) normalized to [-1, 1], with an exact zero.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2), in bit-pattern order (index 8+k is the
# negative of k), divided by the largest magnitude 12 (functional.get_4bit_type("fp4")). The table stores +0.0 at
# index 8, the "negative zero" pattern, and checkpoints carry that table byte for byte.
FP4_VALUES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256  # double quantization's block (functional.quantize_4bit, compress_statistics=True)


def code_table(quant_type: str) -> torch.Tensor:
    """The 16 fp32 code values of `quant_type`, indexed by the 4-bit code."""
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        return torch.tensor(FP4_VALUES, dtype=torch.float32) / 12.0
    raise InfoptError(f"invalid 4-bit quant type {quant_type!r}: choose one of {', '.join(QUANT_TYPES)}")


@dataclass
class FourBitWeight:
    packed: torch.Tensor  # [ceil(n/2) / storage itemsize, 1], dtype quant_storage: two codes per byte, even code high
    absmax: torch.Tensor  # fp32 [blocks]; uint8 [blocks] when double-quantized
    code: torch.Tensor  # fp32 [16], the table indexed by the 4-bit codes
    blocksize: int
    quant_type: str
    orig_shape: tuple[int, ...]
    dtype: torch.dtype  # the source weight's dtype, which dequantize() returns
    offset: float | None = None  # double quant: the fp32 mean subtracted from absmax before its quantization
    nested_absmax: torch.Tensor | None = None  # fp32 [ceil(blocks / 256)]
    nested_code: torch.Tensor | None = None  # fp32 [256], the dynamic map
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.orig_shape)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def quant_storage(self) -> torch.dtype:
        return self.packed.dtype

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block scales, decoded from the nested quantization when there is one."""
        if not self.double_quant:
            return self.absmax.float()
        scales = dequantize_blockwise(self.absmax, self.nested_absmax, self.nested_code, self.nested_blocksize)
        return scales + torch.tensor(self.offset, dtype=torch.float32)

    def codes(self) -> torch.Tensor:
        """uint8 [numel]: the 4-bit code of every weight element, in flattened order."""
        return unpack_codes(self.packed, _numel(self.orig_shape))

    def dequantize(self) -> torch.Tensor:
        """The weight in its original dtype, as bitsandbytes.functional.dequantize_4bit computes it."""
        values = self.code.float()[self.codes().int()]
        return _scale_blocks(values, self.absmax_fp32(), self.blocksize).to(self.dtype).reshape(self.orig_shape)


@dataclass(frozen=True, kw_only=True)
class BlockWeight:
    """Integer codes on a grid of small blocks, each with its own fp32 step and, for affine grids, an additive
    offset: w = code * scale (+ offset), computed in fp32 as a multiply then an add. This is how llama.cpp's GGUF
    block types dequantize (ggml-quants.c, dequantize_row_*): Q5_0 and Q6_K symmetric; Q4_1, Q5_1, Q4_K and Q5_K
    affine, whose offset (a float min, not an integer zero point) no QuantizedWeight can hold."""

    codes: torch.Tensor  # int8 [out, in]: the block's integer level (Q4_1 / Q4_K: 0..15; Q6_K: -32..31)
    scale: torch.Tensor  # fp32 [out, in / block]
    offset: torch.Tensor | None  # fp32 [out, in / block]; None: w = code * scale
    bits: int  # code width: codes lie in [low, low + 2^bits)
    low: int  # the smallest code

    def __post_init__(self) -> None:
        rows, cols = self.codes.shape
        blocks = self.scale.shape[1] if self.scale.dim() == 2 else 0
        if (self.codes.dtype != torch.int8 or self.scale.dtype != torch.float32 or self.scale.shape[0] != rows
                or blocks == 0 or cols % blocks
                or (self.offset is not None and self.offset.shape != self.scale.shape)):
            raise InfoptError(f"a block weight needs int8 codes [out, in] and fp32 scales [out, blocks] dividing in; "
                              f"got {tuple(self.codes.shape)} codes and {tuple(self.scale.shape)} scales")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def block(self) -> int:
        return self.codes.shape[1] // self.scale.shape[1]

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.codes.shape
        values = self.codes.reshape(rows, -1, self.block).to(torch.float32).mul_(self.scale.unsqueeze(-1))
        if self.offset is not None:
            values.add_(self.offset.unsqueeze(-1))
        return values.reshape(rows, cols)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= int(dim)
    return n


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] * scales[i // blocksize] in fp32, the last block possibly short."""
    n = values.numel()
    full = n - n % blocksize
    scales = scales.float()
    head = (values[:full].reshape(-1, blocksize) * scales[: full // blocksize].unsqueeze(1)).reshape(-1)
    if full == n:
        return head
    return torch.cat([head, values[full:] * scales[full // blocksize]])


def unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 [numel] 4-bit codes from packed storage of any dtype (high nibble first)."""
    data = packed.contiguous().reshape(-1).view(torch.uint8)
    if data.numel() * 2 < numel:
        raise InfoptError(f"packed 4-bit data holds {data.numel() * 2} codes, expected {numel}")
    return torch.stack([data >> 4, data & 0x0F], dim=1).reshape(-1)[:numel]


def pack_codes(codes: torch.Tensor, quant_storage: torch.dtype = torch.uint8) -> torch.Tensor:
    """Two codes per byte, even element in the high nibble, viewed as `quant_storage`; shape [elements, 1]."""
    if codes.numel() % 2:
        raise ValueError("pack_codes needs an even number of codes")
    pairs = codes.to(torch.uint8).reshape(-1, 2)
    packed = (pairs[:, 0] << 4) | pairs[:, 1]
    if quant_storage != torch.uint8:
        packed = packed.view(quant_storage)  # bitsandbytes reinterprets the bytes, no conversion
    return packed.unsqueeze(1)


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    return _scale_blocks(code.float()[q.reshape(-1).long()], absmax, blocksize)
