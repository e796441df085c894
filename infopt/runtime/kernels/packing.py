"""Repacking quantized weights into the layouts the kernels read (done once, at load time).

Two layouts (qmatmul.cpp's header gives the byte order):
  lut4: int2/3/4 codes and NF4/FP4 indices, 4 bits each, in 128-column units of 64 bytes, plus a 16-entry table;
  int8: int8 codes, one per byte, in 32-column units.
Rows are interleaved in tiles of 4 (a tile is one contiguous stream: unit 0 of its 4 rows, unit 1, ...), with fp32
scales and optional int8 zero points [tiles, groups, 4]; the weight is (value - zero) * scale in fp32. GGUF's affine
blocks (BlockWeight with an offset) carry fp32 offsets in the zero points' place instead: value * scale + offset.
Act-order weights (GPTQ desc_act) are stored with their columns sorted by group, and `perm` says which input
column each stored column reads, so the input is gathered once per call (cheap and exact).
Columns are padded to a whole unit (only per-channel weights, or lut4 groups of 32/64, can need it; padding
columns meet zero inputs, padding groups have scale 0) and rows to a multiple of 4 (scale 0, outputs dropped).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from infopt.quant.weights import BlockWeight, FourBitWeight, QuantizedWeight

ROWS = 4  # rows per interleaved tile
UNIT_COLS = {"lut4": 128, "int8": 32}
UNIT_BYTES = {"lut4": 64, "int8": 32}
SMALL_GROUPS = {"lut4": (32, 64), "int8": (16,)}  # groups narrower than a unit that the kernels handle
INT4_LUT = torch.arange(16, dtype=torch.float32) - 8  # stored index u holds the signed code u - 8


class Unpackable(ValueError):
    """The weight has a shape or grouping the packed layouts cannot hold (the caller keeps a dense copy)."""


@dataclass
class PackedWeight:
    kind: str  # "lut4" or "int8"
    data: torch.Tensor  # [tiles, bytes per tile]: uint8 (lut4, in_pad / 2 bytes a row) or int8 (in_pad a row)
    scale: torch.Tensor  # fp32 [tiles, groups, 4]
    zero: torch.Tensor | None  # int8 zero points or fp32 offsets [tiles, groups, 4]; None when symmetric
    lut: torch.Tensor | None  # fp32 [16] value of each 4-bit index (lut4 only)
    group_size: int  # packed columns per group; in_pad for one scale per row
    in_features: int
    out_features: int
    perm: torch.Tensor | None = None  # int64 [in]: stored column j multiplies input column perm[j]

    @functools.cached_property
    def int_codes(self) -> bool:
        """Whether values are the signed integer codes (lut4 table index - 8; not NF4/FP4 values)."""
        return self.kind == "lut4" and self.lut is not None and torch.equal(self.lut, INT4_LUT)

    @property
    def in_padded(self) -> int:
        return self.data.shape[1] // (ROWS * UNIT_BYTES[self.kind]) * UNIT_COLS[self.kind]

    @property
    def nbytes(self) -> int:
        """Bytes a matrix-vector product streams: packed values, scales and zero points or offsets."""
        tensors = [self.data, self.scale] + ([self.zero] if self.zero is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def _round_up(n: int, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple


def group_size_for(kind: str, in_features: int, groups: int) -> int:
    """Packed columns per group; raises Unpackable for group widths the kernel does not handle."""
    unit = UNIT_COLS[kind]
    if groups == 1:
        return _round_up(in_features, unit)
    width = in_features // groups
    if width * groups != in_features:
        raise Unpackable(f"{in_features} columns do not split into {groups} equal groups")
    if width % unit and width not in SMALL_GROUPS[kind]:
        raise Unpackable(f"no {kind} kernel for groups of {width} columns")
    return width


def act_order_perm(g_idx: torch.Tensor, groups: int) -> torch.Tensor | None:
    """Column order that makes each group contiguous (None when g_idx is already j // width).

    The packed layout needs every group to hold the same number of columns after sorting, as GPTQ's act-order
    produces (a group is `width` consecutive columns in activation order); raises Unpackable otherwise.
    """
    in_f = g_idx.numel()
    if in_f % groups:
        raise Unpackable(f"{in_f} columns do not split into {groups} equal groups")
    g_idx = g_idx.to(torch.int64)
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], torch.arange(in_f) // (in_f // groups)):
        raise Unpackable("g_idx groups are not all the same size")
    return None if torch.equal(perm, torch.arange(in_f)) else perm


def _pad(values: torch.Tensor, rows: int, cols: int, fill: int) -> torch.Tensor:
    extra_rows, extra_cols = rows - values.shape[0], cols - values.shape[1]
    if extra_rows == 0 and extra_cols == 0:
        return values
    return torch.nn.functional.pad(values, (0, extra_cols, 0, extra_rows), value=fill)


def tile_rows(rows: torch.Tensor, unit_bytes: int) -> torch.Tensor:
    """[out_pad, bytes] -> [tiles, bytes * 4]: per tile, each unit of its 4 rows in turn."""
    out_pad, width = rows.shape
    blocks = rows.reshape(out_pad // ROWS, ROWS, width // unit_bytes, unit_bytes).transpose(1, 2)
    return blocks.reshape(out_pad // ROWS, width * ROWS).contiguous()


def untile_rows(tiled: torch.Tensor, unit_bytes: int) -> torch.Tensor:
    """The inverse of tile_rows: [tiles, bytes * 4] -> [tiles * 4, bytes]."""
    tiles, width = tiled.shape
    blocks = tiled.reshape(tiles, width // (ROWS * unit_bytes), ROWS, unit_bytes).transpose(1, 2)
    return blocks.reshape(tiles * ROWS, width // ROWS)


def tile_params(values: torch.Tensor, out_pad: int, groups: int) -> torch.Tensor:
    """Per-row group parameters [out, groups'] -> [tiles, groups, 4], padding rows and groups with 0."""
    padded = _pad(values, out_pad, groups, 0)
    return padded.reshape(out_pad // ROWS, ROWS, groups).transpose(1, 2).contiguous()


def untile_params(tiled: torch.Tensor) -> torch.Tensor:
    """[tiles, groups, 4] -> [tiles * 4, groups]."""
    return tiled.transpose(1, 2).reshape(-1, tiled.shape[1])


def pack_nibbles(indices: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, in_pad / 2] from 4-bit indices [rows, in_pad] (in_pad a multiple of 128), rows not tiled.

    Unit u (128 columns) is 16 little-endian dwords; nibble j of dword l holds column 128u + 16j + l, so
    byte k of dword l holds j = 2k in its low and j = 2k + 1 in its high nibble.
    """
    rows, in_pad = indices.shape
    by_k = indices.to(torch.uint8).reshape(rows, in_pad // 128, 4, 2, 16)  # [.., k, low/high, l]
    packed = by_k[:, :, :, 0] | (by_k[:, :, :, 1] << 4)  # [rows, units, k, l]
    return packed.transpose(2, 3).reshape(rows, in_pad // 2)


def unpack_nibbles(data: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_nibbles: uint8 indices [rows, in_pad]."""
    rows, half = data.shape
    by_l = data.reshape(rows, half // 64, 16, 4).transpose(2, 3)  # [rows, units, k, l]
    return torch.stack([by_l & 0x0F, by_l >> 4], dim=3).reshape(rows, half * 2)


def _packed(kind: str, values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
            lut: torch.Tensor | None, group_size: int, perm: torch.Tensor | None) -> PackedWeight:
    """Pad, nibble-pack (lut4) and tile [out, in] values with their [out, groups] parameters."""
    out_f, in_f = values.shape
    out_pad, in_pad = _round_up(out_f, ROWS), _round_up(in_f, UNIT_COLS[kind])
    groups = in_pad // group_size
    if kind == "lut4":
        rows = pack_nibbles(_pad(values, out_pad, in_pad, 8))  # index 8 is the value 0 of signed codes
    else:
        rows = _pad(values, out_pad, in_pad, 0)
    data = tile_rows(rows, UNIT_BYTES[kind])
    scale_t = tile_params(scale.float(), out_pad, groups)
    zero_t = None if zero is None else tile_params(zero if zero.is_floating_point() else zero.to(torch.int8),
                                                   out_pad, groups)
    return PackedWeight(kind, data, scale_t, zero_t, lut, group_size, in_f, out_f, perm)


def pack_quantized(weight: QuantizedWeight) -> PackedWeight:
    """Repack an infopt QuantizedWeight (any reader's output); raises Unpackable for shapes the kernels skip."""
    in_f = weight.shape[1]
    groups = weight.scale.shape[1]
    if weight.spec.bits not in (2, 3, 4, 8):
        raise Unpackable(f"no kernel for {weight.spec.bits}-bit codes")
    kind = "int8" if weight.spec.bits == 8 else "lut4"
    group_size = group_size_for(kind, in_f, groups)
    codes, perm = weight.codes, None
    if weight.g_idx is not None:
        perm = act_order_perm(weight.g_idx, groups)
        if perm is not None:
            codes = codes[:, perm]
    if kind == "int8":
        return _packed(kind, codes.to(torch.int8), weight.scale, weight.zero, None, group_size, perm)
    return _packed(kind, codes.to(torch.int16) + 8, weight.scale, weight.zero, INT4_LUT.clone(), group_size, perm)


def pack_blocks(weight: BlockWeight) -> PackedWeight:
    """Repack a GGUF block weight: codes of up to 4 bits as lut4 indices (the table holds the codes themselves),
    wider ones as int8, each block's step a group scale and its offset in the zero points' place."""
    in_f = weight.shape[1]
    kind = "lut4" if weight.bits <= 4 else "int8"
    group_size = group_size_for(kind, in_f, weight.scale.shape[1])
    offset = None if weight.offset is None else weight.offset.float()
    if kind == "int8":
        return _packed(kind, weight.codes, weight.scale, offset, None, group_size, None)
    lut = torch.arange(16, dtype=torch.float32) + weight.low
    return _packed(kind, weight.codes.to(torch.int16) - weight.low, weight.scale, offset, lut, group_size, None)


def pack_four_bit(weight: FourBitWeight) -> PackedWeight:
    """Repack a bitsandbytes-style NF4/FP4 weight: value = code[index] * absmax[block], one block per group.

    Needs a 2-D weight whose rows hold whole blocks (in_features a multiple of the block size); raises
    Unpackable otherwise.
    """
    if len(weight.orig_shape) != 2:
        raise Unpackable(f"expected a 2-D weight, got shape {weight.orig_shape}")
    out_f, in_f = weight.orig_shape
    if in_f % weight.blocksize:
        raise Unpackable(f"blocks of {weight.blocksize} do not tile rows of {in_f}")
    group_size = group_size_for("lut4", in_f, in_f // weight.blocksize)
    indices = weight.codes().reshape(out_f, in_f)
    scale = weight.absmax_fp32().reshape(out_f, in_f // weight.blocksize)
    return _packed("lut4", indices, scale, None, weight.code.float().contiguous(), group_size, None)


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None) == (b is None) and (a is None or (a.shape == b.shape and torch.equal(a, b)))


def concat_rows(parts: list[PackedWeight]) -> PackedWeight | None:
    """One packed weight with the rows of `parts` one after another (linears that read the same input computed in
    one call), or None when their layouts differ: kind, width, groups, table, zero points and column order must
    match, and every part but the last must fill whole 4-row tiles. Each row's numbers are unchanged."""
    first = parts[0]
    for w in parts[1:]:
        if (w.kind, w.group_size, w.in_features, w.data.shape[1]) != (first.kind, first.group_size,
                                                                       first.in_features, first.data.shape[1]):
            return None
        if ((w.zero is None) != (first.zero is None) or (w.zero is not None and w.zero.dtype != first.zero.dtype)
                or not _same(w.lut, first.lut) or not _same(w.perm, first.perm)):
            return None
    if any(w.out_features % ROWS for w in parts[:-1]):
        return None
    zero = None if first.zero is None else torch.cat([w.zero for w in parts])
    return PackedWeight(first.kind, torch.cat([w.data for w in parts]), torch.cat([w.scale for w in parts]), zero,
                        first.lut, first.group_size, first.in_features, sum(w.out_features for w in parts),
                        first.perm)


def pack(weight: QuantizedWeight | FourBitWeight | BlockWeight) -> PackedWeight:
    if isinstance(weight, FourBitWeight):
        return pack_four_bit(weight)
    if isinstance(weight, BlockWeight):
        return pack_blocks(weight)
    return pack_quantized(weight)


def dequantize_fp32(weight: QuantizedWeight | FourBitWeight | BlockWeight) -> torch.Tensor:
    """fp32 [out, in] with the kernels' arithmetic, for weights pack() refuses: (code - zero) * scale in fp32
    (code * scale + offset for block weights)."""
    if isinstance(weight, BlockWeight):
        return weight.dequantize()
    if isinstance(weight, FourBitWeight):
        values = weight.code.float()[weight.codes().long()]
        scales = weight.absmax_fp32().repeat_interleave(weight.blocksize)[: values.numel()]
        return (values * scales).reshape(weight.orig_shape[0], -1)
    index = weight.column_groups().long()
    levels = weight.codes.float()
    if weight.zero is not None:
        levels = levels - weight.zero.float()[:, index]
    return levels * weight.scale.float()[:, index]
