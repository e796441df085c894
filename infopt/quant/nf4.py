"""NF4 / FP4 blockwise 4-bit quantization, bit-exact with bitsandbytes 0.50's CPU path.

w ~ code[q] * absmax[block]. The weight is flattened and cut into blocks of `blocksize` values (the last one may be
shorter); each block is divided by its absolute maximum and every value becomes the index of the nearest of the 16
code values. Two indices share a byte, the even (first) element in the high nibble.

Double quantization (QLoRA's "nested" statistics) quantizes the fp32 absmax vector again: its mean is subtracted
(the offset) and the rest is quantized 8-bit blockwise (block 256) on bitsandbytes' signed dynamic code map.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from infopt.errors import InfoptError

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
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # functional.quantize_4bit's accepted sizes
NESTED_BLOCKSIZE = 256  # double quantization's block (functional.quantize_4bit, compress_statistics=True)
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LUT_SIZE = 65536  # bitsandbytes' CPU 8-bit quantizer rounds through a 65536-bin lookup table


def code_table(quant_type: str) -> torch.Tensor:
    """The 16 fp32 code values of `quant_type`, indexed by the 4-bit code."""
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        return torch.tensor(FP4_VALUES, dtype=torch.float32) / 12.0
    raise InfoptError(f"invalid 4-bit quant type {quant_type!r}: choose one of {', '.join(QUANT_TYPES)}")


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(), after Dettmers 2015, arXiv:1511.04561).

    For exponent e = 0..6 it holds the 2^e midpoints of a linear split of [0.1, 1] scaled by 10^(e-6), with both
    signs, plus 0 and 1: 256 sorted fp32 values. The arithmetic below is fp32 like bitsandbytes' own.
    """
    values = [0.0, 1.0]
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (10 ** (e - 6)) * ((bounds[:-1] + bounds[1:]) / 2.0)
        values += means.tolist() + (-means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def _sorted_code(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between neighbouring code values in ascending order, and the code index of each sorted slot.

    bitsandbytes orders the table with torch.argsort, so for FP4's two zeros (codes 0 and 8) the slot order is
    argsort's: then values in (0, 0.0026] get code 8 and 0 or tiny negatives get code 0.
    """
    code = code_table(quant_type)
    order = torch.argsort(code)
    return (code[order[:-1]] + code[order[1:]]) / 2, order


@functools.cache
def _dynamic_lut(code_key: tuple[float, ...]) -> torch.Tensor:
    """For bin i of [-1, 1] split into 65536 points, the first code index whose midpoint is >= the point."""
    code = torch.tensor(code_key, dtype=torch.float32)
    midpoints = 0.5 * (code[:-1] + code[1:])
    points = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / float(_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, points, right=False).to(torch.uint8)


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
        scales = _dequantize_blockwise(self.absmax, self.nested_absmax, self.nested_code, self.nested_blocksize)
        return scales + torch.tensor(self.offset, dtype=torch.float32)

    def codes(self) -> torch.Tensor:
        """uint8 [numel]: the 4-bit code of every weight element, in flattened order."""
        return unpack_codes(self.packed, _numel(self.orig_shape))

    def dequantize(self) -> torch.Tensor:
        """The weight in its original dtype, as bitsandbytes.functional.dequantize_4bit computes it."""
        values = self.code.float()[self.codes().int()]
        return _scale_blocks(values, self.absmax_fp32(), self.blocksize).to(self.dtype).reshape(self.orig_shape)


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


def _blockwise_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax [blocks], flat / absmax clamped to [-1, 1]) the way bitsandbytes' default 4-bit kernel does it.

    Full blocks multiply by the reciprocal of absmax (floored at 1e-38 for the division only, so an all-zero
    block keeps absmax 0); a short last block divides by its absmax, which is stored floored at 1e-38.
    """
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if full == n:
        return absmax, scaled
    tail_max = flat[full:].abs().amax().clamp(min=1e-38)
    tail = (flat[full:] / tail_max).clamp(-1, 1)
    return torch.cat([absmax, tail_max.reshape(1)]), torch.cat([scaled, tail])


def _nearest_codes(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Index of the nearest code value; a value exactly halfway goes to the lower (sorted) neighbour."""
    midpoints, order = _sorted_code(quant_type)
    slots = torch.bucketize(scaled, midpoints, out_int32=True, right=False)
    return order.to(torch.uint8)[slots]


def _quantize_blockwise_8bit(
    values: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU 8-bit blockwise quantizer (libbitsandbytes_cpu, quantize_blockwise fp32).

    Not exactly nearest: x * (1/absmax), clamped, is rounded onto 65536 evenly spaced points of [-1, 1] as
    trunc(((x + 1) * 0.5) * 65535 + 0.5) in fp32, and that point's nearest code (ties low) is taken. An all-zero
    block stores absmax 0 and codes 0.
    """
    flat = values.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.zeros(blocks * blocksize, dtype=torch.float32)
    padded[:n] = flat
    grid = padded.reshape(blocks, blocksize)
    absmax = grid.abs().amax(dim=1)
    scaled = (grid * (1.0 / absmax).unsqueeze(1)).clamp(-1, 1)
    points = (((scaled + 1.0) * 0.5) * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)
    lut = _dynamic_lut(tuple(code.float().tolist()))
    q = lut[points.clamp(0, _LUT_SIZE - 1)]
    q[absmax == 0] = 0
    return q.reshape(-1)[:n], absmax


def _dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    return _scale_blocks(code.float()[q.reshape(-1).long()], absmax, blocksize)


def quantize_4bit(
    weight: torch.Tensor,
    quant_type: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> FourBitWeight:
    """Blockwise NF4/FP4 quantization, identical to bitsandbytes.functional.quantize_4bit on CPU."""
    if weight.dtype not in INPUT_DTYPES:
        raise InfoptError(f"4-bit quantization needs a float32/float16/bfloat16 weight, got {weight.dtype}")
    if block_size not in BLOCK_SIZES:
        raise InfoptError(f"invalid 4-bit block size {block_size}: choose one of {BLOCK_SIZES}")
    code = code_table(quant_type)
    itemsize = torch.empty(0, dtype=quant_storage).element_size()
    if -(-weight.numel() // 2) % itemsize:
        raise InfoptError(f"{weight.numel()} values do not fill whole {quant_storage} storage elements")
    flat = weight.detach().cpu().reshape(-1).float()
    absmax, scaled = _blockwise_scale(flat, block_size)
    codes = _nearest_codes(scaled, quant_type)
    if codes.numel() % 2:  # bitsandbytes pads an odd count with a quantized 0 in the last low nibble
        codes = torch.cat([codes, _nearest_codes(torch.zeros(1), quant_type)])
    packed = pack_codes(codes, quant_storage)
    result = FourBitWeight(packed, absmax, code, block_size, quant_type, tuple(weight.shape), weight.dtype)
    if double_quant:
        _nest(result)
    return result


def _nest(weight: FourBitWeight) -> None:
    """Replace fp32 absmax by its double quantization, in place."""
    offset = weight.absmax.mean()
    nested_code = dynamic_code()
    q, nested_absmax = _quantize_blockwise_8bit(weight.absmax - offset, nested_code, NESTED_BLOCKSIZE)
    weight.absmax, weight.offset = q, offset.item()
    weight.nested_absmax, weight.nested_code = nested_absmax, nested_code
