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
from infopt.quant.methods import FOUR_BIT, Method, MethodConfig, option
from infopt.quant.spec import QuantSpec
from infopt.quant.weights import NESTED_BLOCKSIZE, FourBitWeight, MethodRecord, Storage, code_table, pack_codes

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # functional.quantize_4bit's accepted sizes
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LUT_SIZE = 65536  # bitsandbytes' CPU 8-bit quantizer rounds through a 65536-bin lookup table


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


@dataclass(frozen=True, kw_only=True)
class FourBitConfig(MethodConfig):
    block_size: int = option(64, "--block-size", "Weights per absmax block (32 to 4096).", choices=BLOCK_SIZES)
    double_quant: bool = option(False, "--double-quant", "Quantize the absmax values to 8 bits too.")

    def spec(self) -> QuantSpec:
        return QuantSpec(4, -1, True)  # for the planner: blockwise over the whole weight, so every shape fits

    def describe(self) -> str:
        return f"block {self.block_size}" + (" double-quant" if self.double_quant else "")

    def weight_bytes(self, spec: QuantSpec, shape: tuple[int, int], dense_element_bytes: int) -> int:
        numel = shape[0] * shape[1]
        blocks = -(-numel // self.block_size)
        scales = blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4 * 256 if self.double_quant else 4 * blocks
        return -(-numel // 2) + scales + 4 * 16

    def record(self, method: str, storage: Storage) -> MethodRecord:
        return MethodRecord(method=method, quant_type=method, double_quant=self.double_quant)


class FourBitQuantizer:
    def __init__(self, quant_type: str, config: FourBitConfig):
        self.quant_type, self.config = quant_type, config

    def quantize_weight(self, weight: torch.Tensor, spec: QuantSpec) -> FourBitWeight:
        return quantize_4bit(weight, self.quant_type, self.config.block_size, self.config.double_quant)


NF4 = Method("nf4", "bitsandbytes NF4 (QLoRA's normal-float table), blockwise absmax", FourBitConfig, FOUR_BIT, "bnb",
             calibrated=False, factory=lambda config, storage, adapter: FourBitQuantizer("nf4", config))
FP4 = Method("fp4", "bitsandbytes FP4 (e2m1 table), blockwise absmax", FourBitConfig, FOUR_BIT, "bnb",
             calibrated=False, factory=lambda config, storage, adapter: FourBitQuantizer("fp4", config))
