"""NF4 / FP4 quantization checked bit for bit against bitsandbytes' own CPU implementation."""

import copy
import math

import bitsandbytes.functional as F
import pytest
import torch

from infopt.errors import InfoptError
from infopt.quant import nf4, weights

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# odd sizes, sizes that are not a multiple of the block, a single value, rows shorter than a block
SHAPES = [(64, 64), (32, 96), (7, 33), (3, 5), (1, 1), (33, 65), (128, 200), (5, 300)]


@pytest.fixture(autouse=True, scope="module")
def _eager_bitsandbytes():
    """bitsandbytes torch.compiles its fallback dequantizer once per shape: same arithmetic eagerly, much faster."""
    import torch._dynamo

    previous = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = previous


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)  # float storage views can hold NaN patterns: compare raw bytes


def _bnb_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantization, made safe from its AVX-512 kernel's per-row block indexing.

    bitsandbytes 0.50's AVX-512 CPU kernel assumes every row starts a new block; when in_features is not a
    multiple of the block it scales with the wrong absmax. Its flat-block result (the CUDA, default-torch and
    scalar-CPU semantics) is what it computes for the same data viewed as one row, which that kernel handles.
    """
    shape = tuple(state.shape)
    if shape[-1] % state.blocksize == 0 or shape[-1] % 2:
        return F.dequantize_4bit(packed, state).reshape(shape)  # a one-byte weight comes back transposed
    flat = copy.copy(state)
    flat.shape = torch.Size([1, math.prod(shape)])
    return F.dequantize_4bit(packed, flat).reshape(shape)


def _assert_matches_bnb(weight, quant_type, blocksize, double_quant, storage=torch.uint8):
    ref, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type,
                                 compress_statistics=double_quant, quant_storage=storage)
    ours = nf4.quantize_4bit(weight, quant_type, blocksize, double_quant, storage)
    assert ours.packed.dtype == ref.dtype and ours.packed.shape == ref.shape
    assert torch.equal(_bytes(ours.packed), _bytes(ref))
    assert ours.absmax.dtype == state.absmax.dtype and torch.equal(ours.absmax, state.absmax)
    assert torch.equal(_bytes(ours.code), _bytes(state.code))
    assert ours.double_quant == double_quant
    if double_quant:
        assert ours.offset == float(state.offset)
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert torch.equal(_bytes(ours.nested_code), _bytes(state.state2.code))
        assert ours.nested_blocksize == state.state2.blocksize
    theirs = _bnb_dequantize(ref, state)
    mine = ours.dequantize()
    assert mine.dtype == theirs.dtype == weight.dtype and mine.shape == weight.shape
    assert torch.equal(mine, theirs)
    return ours


def test_code_tables_match_bitsandbytes():
    assert torch.equal(_bytes(nf4.code_table("nf4")), _bytes(F.get_4bit_type("nf4", device="cpu")))
    assert torch.equal(_bytes(nf4.code_table("fp4")), _bytes(F.get_4bit_type("fp4", device="cpu")))
    assert torch.equal(_bytes(nf4.dynamic_code()), _bytes(F.create_dynamic_map()))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [64, 128])
def test_quantize_and_dequantize_match_bitsandbytes(blocksize, dtype, quant_type, double_quant):
    torch.manual_seed(blocksize + len(quant_type))
    for shape in SHAPES:
        weight = (torch.randn(shape) * 0.02).to(dtype)
        _assert_matches_bnb(weight, quant_type, blocksize, double_quant)


@pytest.mark.parametrize("blocksize", nf4.BLOCK_SIZES)
def test_every_block_size_bitsandbytes_allows(blocksize):
    torch.manual_seed(blocksize)
    for i, shape in enumerate([(96, 160), (11, 517), (64, 4096)]):
        weight = (torch.randn(shape) * 3).to(DTYPES[i])
        _assert_matches_bnb(weight, "nf4" if i % 2 else "fp4", blocksize, True)
        _assert_matches_bnb(weight, "fp4" if i % 2 else "nf4", blocksize, False)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_ties_and_neighbours_of_code_midpoints(quant_type):
    """Values exactly halfway between two codes (and one ulp either side) in blocks whose absmax is 1."""
    midpoints, _ = nf4._sorted_code(quant_type)
    up, down = torch.nextafter(midpoints, torch.tensor(2.0)), torch.nextafter(midpoints, torch.tensor(-2.0))
    special = torch.tensor([1.0, -1.0, 0.0, -0.0, 1e-3, -1e-3, 1e-30, -1e-30, 0.0026, -0.0026])
    values = torch.cat([midpoints, up, down, special])
    weight = torch.cat([values, torch.full((64 - values.numel(),), 0.5)]).reshape(4, 16)
    for double_quant in (False, True):
        _assert_matches_bnb(weight, quant_type, 64, double_quant)
        _assert_matches_bnb(weight, quant_type, 32, double_quant)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_zero_constant_and_degenerate_weights(quant_type):
    partly_zero = torch.randn(10, 70)
    partly_zero[0] = 0
    partly_zero[-1] = 0
    cases = [torch.zeros(32, 64), torch.zeros(3, 7), torch.full((32, 64), 0.3), torch.full((5, 13), -0.3),
             partly_zero, torch.randn(1, 1), torch.randn(2, 1)]
    for weight in cases:
        for dtype in (torch.float32, torch.float16):
            for double_quant in (False, True):
                _assert_matches_bnb(weight.to(dtype), quant_type, 64, double_quant)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float16, torch.float32, torch.int8], ids=str)
def test_quant_storage_reinterprets_the_bytes(storage):
    torch.manual_seed(3)
    ours = _assert_matches_bnb(torch.randn(64, 96), "nf4", 64, True, storage)
    assert ours.packed.shape == (64 * 96 // 2 // torch.empty(0, dtype=storage).element_size(), 1)
    _assert_matches_bnb(torch.randn(24, 40, dtype=torch.bfloat16), "fp4", 128, False, storage)


def test_nested_8bit_quantizer_matches_bitsandbytes_cpu_kernel():
    """The absmax quantizer rounds through bitsandbytes' 65536-point grid: probe its midpoints and grid edges."""
    code = nf4.dynamic_code()
    midpoints = (code[:-1] + code[1:]) / 2
    edges = (torch.arange(0, 65536, 97, dtype=torch.float32) * 2 + 1) / 65535 - 1  # where the grid index steps
    probes = torch.cat([midpoints, edges])
    up, down = torch.nextafter(probes, torch.tensor(2.0)), torch.nextafter(probes, torch.tensor(-2.0))
    values = torch.cat([probes, up, down])
    blocks = values.clamp(-1, 1)
    blocks = torch.cat([blocks, torch.zeros(-blocks.numel() % 255)]).reshape(-1, 255)
    blocks = torch.cat([torch.ones(blocks.shape[0], 1), blocks], dim=1).reshape(-1)  # absmax 1 in every block
    torch.manual_seed(0)
    for data in (blocks, torch.cat([blocks, torch.zeros(256), torch.randn(1000) * 1e-3, torch.randn(77)])):
        ref_q, ref_absmax = torch.ops.bitsandbytes.quantize_blockwise(data, code, 256)
        q, absmax = nf4._quantize_blockwise_8bit(data, code, 256)
        assert torch.equal(q, ref_q) and torch.equal(absmax, ref_absmax)


def test_container_properties():
    weight = torch.randn(48, 80, dtype=torch.bfloat16)
    q = nf4.quantize_4bit(weight, "nf4", 64, True)
    assert q.shape == (48, 80) and q.dtype == torch.bfloat16 and q.quant_storage == torch.uint8
    assert q.packed.shape == (48 * 80 // 2, 1) and q.absmax.shape == (60,) and q.nested_absmax.shape == (1,)
    assert q.codes().shape == (48 * 80,) and int(q.codes().max()) <= 15
    assert torch.equal(weights.unpack_codes(weights.pack_codes(q.codes()), 48 * 80), q.codes())
    error = (q.dequantize().float() - weight.float()).abs().max()
    assert error <= 0.5 * q.absmax_fp32().max()


def test_invalid_arguments():
    with pytest.raises(InfoptError, match="block size"):
        nf4.quantize_4bit(torch.randn(4, 64), block_size=16)
    with pytest.raises(InfoptError, match="quant type"):
        nf4.quantize_4bit(torch.randn(4, 64), quant_type="int4")
    with pytest.raises(InfoptError, match="float32/float16/bfloat16"):
        nf4.quantize_4bit(torch.randn(4, 64).double())
