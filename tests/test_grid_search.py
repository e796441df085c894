"""The GGUF quantizers' block scale searches: the C++ form (runtime/kernels/grid_search.cpp) against the torch form."""

import pytest
import torch

from infopt.formats import ggml_quants
from infopt.quant import kgrid
from infopt.runtime import kernels

needs_ext = pytest.mark.skipif(not kernels.available(), reason=f"infopt kernels unavailable: {kernels.reason()}")


@pytest.fixture
def torch_form(monkeypatch):
    """Force the torch form of both searches."""
    monkeypatch.setattr(kgrid, "search_kernels", lambda x: None)
    monkeypatch.setattr(ggml_quants, "search_kernels", lambda x: None)


def _blocks(seed: int, count: int, size: int) -> torch.Tensor:
    """Random blocks plus the awkward ones: all zero, constant, one outlier, ties in magnitude, all negative."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, size, generator=g) * torch.rand(count, 1, generator=g) * 0.1
    x[0] = 0
    x[1] = 0.37
    x[2, 3] = 9.0
    x[3, :2] = torch.tensor([-0.5, 0.5])
    x[3, 2:] = x[3, 2:].clamp(-0.4, 0.4)
    x[4] = -x[4].abs()
    x[5] = torch.randint(-8, 8, (size,), generator=g).float() * 0.01  # already on a grid: exact halves appear
    return x


def _weights(x: torch.Tensor, seed: int, imatrix: bool) -> torch.Tensor:
    size = x.shape[1]
    column = torch.rand(size, generator=torch.Generator().manual_seed(seed + 1)) if imatrix else None
    if column is not None:
        column[0] = 0  # a column no calibration token reached
    return kgrid.importance_weights(x, column, size)


@needs_ext
@pytest.mark.parametrize("nmax,size", [(8, 32), (16, 32), (32, 16)])
@pytest.mark.parametrize("imatrix", [False, True])
def test_the_symmetric_search_in_cpp_equals_the_torch_form(nmax, size, imatrix, monkeypatch):
    x = _blocks(nmax + size, 3000, size)
    w = _weights(x, nmax, imatrix)
    fast = ggml_quants._symmetric_search(x, w, nmax)
    monkeypatch.setattr(ggml_quants, "search_kernels", lambda x: None)
    slow = ggml_quants._symmetric_search(x, w, nmax)
    assert torch.equal(fast, slow)
    assert float(fast[0]) == 0.0  # an all-zero block gets scale 0
    # never worse than ggml's plain scale, the signed maximum over -nmax (one of the candidates, before its refit)
    x, w, scale = x[1:].double(), w[1:].double(), fast[1:].double()
    peak = x.gather(1, x.abs().argmax(1, keepdim=True))
    plain = peak / -nmax
    error = (w * (x - scale * torch.clamp(kgrid.round_half_away(x / scale), -nmax, nmax - 1)).pow(2)).sum(1)
    plain_error = (w * (x - plain * torch.clamp(kgrid.round_half_away(x / plain), -nmax, nmax - 1)).pow(2)).sum(1)
    energy = (w * x * x).sum(1)  # exact fits tie; the stored fp32 scale then leaves ~1e-15 of it
    assert bool((error <= plain_error * (1 + 1e-6) + 1e-9 * energy).all())


@needs_ext
@pytest.mark.parametrize("nmax", [15, 31])
@pytest.mark.parametrize("nonnegative_min", [True, False])
@pytest.mark.parametrize("imatrix", [False, True])
def test_the_affine_search_in_cpp_equals_the_torch_form(nmax, nonnegative_min, imatrix, monkeypatch):
    x = _blocks(nmax, 3000, 32)
    w = _weights(x, nmax, imatrix)
    fast = kgrid.affine_search(x, w, nmax, nonnegative_min=nonnegative_min)
    monkeypatch.setattr(kgrid, "search_kernels", lambda x: None)
    slow = kgrid.affine_search(x, w, nmax, nonnegative_min=nonnegative_min)
    for a, b in zip(fast, slow):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (3000, 1)
        assert torch.equal(a, b)
    scale, minimum = fast
    assert bool((scale >= 0).all()) and (not nonnegative_min or bool((minimum >= 0).all()))


@needs_ext
@pytest.mark.parametrize("type_name", ["Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q8_0"])
def test_every_gguf_type_writes_the_same_bytes_with_either_form(type_name, monkeypatch):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(70, 512, generator=g) * 0.02
    weight[5] = 0
    imatrix = torch.rand(512, generator=g)
    fast = [ggml_quants.quantize(type_name, weight), ggml_quants.quantize(type_name, weight, imatrix)]
    monkeypatch.setattr(kgrid, "search_kernels", lambda x: None)
    monkeypatch.setattr(ggml_quants, "search_kernels", lambda x: None)
    slow = [ggml_quants.quantize(type_name, weight), ggml_quants.quantize(type_name, weight, imatrix)]
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_chunked_quantization_writes_the_bytes_of_one_pass(torch_form, monkeypatch):
    """Rows are quantized in cache-sized chunks; a block never spans rows, so the chunking changes nothing."""
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(40, 256, generator=g) * 0.02
    whole = {t: ggml_quants.quantize(t, weight) for t in ("Q4_0", "Q4_K", "Q6_K", "Q4_1")}
    monkeypatch.setattr(ggml_quants, "CHUNK_VALUES", 3 * 256)  # chunks of 3 rows, the last one short
    for type_name, data in whole.items():
        assert torch.equal(ggml_quants.quantize(type_name, weight), data)


@needs_ext
def test_the_cpp_searches_refuse_bad_blocks():
    ops = kernels.build.ops()
    x = torch.zeros(4, 32)
    with pytest.raises(RuntimeError, match="float32"):
        ops.symmetric_scale_search(x.double(), x.double(), 8, 9)
    with pytest.raises(RuntimeError, match="both be"):
        ops.affine_scale_search(x, torch.zeros(4, 16), 15, 20, True)
    for size in (300, 24, 8):
        with pytest.raises(RuntimeError, match="block size"):
            ops.symmetric_scale_search(torch.zeros(2, size), torch.zeros(2, size), 8, 9)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.symmetric_scale_search(torch.zeros(32, 4).T, torch.zeros(32, 4).T, 8, 9)
    with pytest.raises(RuntimeError, match="nmax"):
        ops.affine_scale_search(x, x, 0, 20, True)


@needs_ext
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0"])
def test_the_legacy_blocks_round_and_pack_in_cpp_as_in_torch(type_name, monkeypatch):
    """round_q8_0 / round_q4_0 against the torch form on the awkward blocks, at magnitudes whose fp16 scales are
    subnormal, ordinary, or overflow to infinity; a value that is not finite (--allow-non-finite) leaves the block
    to the torch form, which writes what it always did."""
    x = _blocks(11, 600, 32)
    x[100:200] *= 1e-3  # subnormal fp16 scales
    x[200:300] *= 1e8  # scales past fp16's largest, infinite
    x[300:400] = torch.randint(-127, 128, (100, 32)).float() * 0.5  # many exact halves
    weight = x.reshape(60, 320)
    poisoned = weight.clone()
    poisoned[7, 3], poisoned[9, 0] = float("nan"), float("inf")
    fast = [ggml_quants.quantize(type_name, weight), ggml_quants.quantize(type_name, poisoned)]
    monkeypatch.setattr(kgrid, "search_kernels", lambda x: None)
    monkeypatch.setattr(ggml_quants, "search_kernels", lambda x: None)
    slow = [ggml_quants.quantize(type_name, weight), ggml_quants.quantize(type_name, poisoned)]
    for a, b in zip(fast, slow):
        assert a.shape == b.shape and torch.equal(a, b)
    block_bytes = 34 if type_name == "Q8_0" else 18
    d = fast[0].reshape(-1, block_bytes)[:, :2].contiguous().view(torch.float16).float().reshape(-1)
    assert bool((d[200:300] == float("inf")).any()) and bool(((d[100:200] > 0) & (d[100:200] < 6.2e-5)).any())


@needs_ext
def test_the_cpp_rounding_refuses_bad_blocks():
    ops = kernels.build.ops()
    with pytest.raises(RuntimeError, match="\\[blocks, 32\\]"):
        ops.round_q8_0(torch.zeros(4, 16))
    with pytest.raises(RuntimeError, match="one float32 scale per block"):
        ops.round_q4_0(torch.zeros(4, 32), torch.zeros(3))
    with pytest.raises(RuntimeError, match="fp16 values"):
        ops.round_q4_0(torch.zeros(4, 32), torch.full((4,), 0.1))
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.round_q8_0(torch.zeros(32, 4).T)
