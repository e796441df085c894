import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from infopt.formats.packing import pack_int32, unpack_int32


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(5, 64), (7, 172), (3, 33), (16, 1), (1, 300)])
@pytest.mark.parametrize("dim", [0, 1])
def test_packing_matches_compressed_tensors_and_round_trips(bits, shape, dim):
    gen = torch.Generator().manual_seed(bits * 1000 + shape[1])
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, generator=gen, dtype=torch.int8)
    ours = pack_int32(codes, bits, dim)
    theirs = pack_to_int32(codes, bits, packed_dim=dim)
    assert ours.dtype == torch.int32 and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_int32(ours, bits, shape[dim], dim), codes)
    assert torch.equal(unpack_from_int32(ours, bits, torch.Size(shape), packed_dim=dim), codes)


def test_four_bit_layout_is_eight_codes_per_word_low_nibble_first():
    codes = torch.arange(-8, 8, dtype=torch.int8)[:8].reshape(1, 8)  # levels -8..-1 -> stored 0..7
    word = pack_int32(codes, 4)[0, 0].item() & 0xFFFFFFFF
    assert word == 0x76543210
