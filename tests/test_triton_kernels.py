"""Triton int4/int8 GPU kernels against QuantizedWeight.dequantize() matmuls.

The kernel tests need triton and a CUDA GPU and are skipped without them (as in CI). With
INFOPT_TRITON_INTERPRET=1 they run on the CPU through Triton's interpreter, on small shapes only.
The layout tests (pack/dequantize, plain torch on the CPU) run everywhere.
"""

import functools

import pytest
import torch

from infopt.quant.rtn import quantize_rtn
from infopt.quant.weights import QuantizedWeight, Storage
from infopt.quant.spec import QuantSpec
from infopt.runtime.kernels import triton_int4 as ti

needs_triton = pytest.mark.skipif(not ti.available(), reason=f"Triton kernels unavailable: {ti.reason()}")
ON_GPU = torch.cuda.is_available() and not ti.INTERPRET
DEVICE = "cuda" if ON_GPU else "cpu"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (out, in, bits, group, symmetric, act_order, scale dtype)
GPU_CASES = [
    (256, 512, 4, 128, True, False, F32),
    (256, 512, 4, 32, False, False, F32),
    (256, 512, 4, 64, False, True, F32),
    (256, 512, 4, -1, True, False, F32),
    (256, 512, 8, -1, True, False, F32),
    (256, 512, 8, 128, False, False, F32),
    (256, 512, 8, 64, True, True, F32),
    (256, 512, 2, 32, False, False, F32),
    (256, 512, 3, 128, True, False, F32),
    (1000, 768, 4, 128, False, False, F16),  # out not a multiple of any block
    (1000, 768, 4, -1, False, False, F32),  # one group of 768 columns: K blocks cross no group edge
    (1000, 768, 8, 32, False, True, F32),
    (4096, 4096, 4, 128, True, False, F16),
    (4096, 4096, 4, 128, False, True, BF16),
    (4096, 4096, 8, -1, True, False, F16),
]
INTERPRETER_CASES = [
    (48, 256, 4, 128, True, False, F32),
    (70, 128, 4, 32, False, True, F32),
    (40, 96, 4, -1, False, False, F16),
    (36, 128, 8, 64, False, False, F32),
    (24, 96, 8, 32, True, True, F32),
    (40, 128, 2, 64, True, False, F32),
    (40, 128, 3, 32, False, False, BF16),
]
CASES = GPU_CASES if ON_GPU else INTERPRETER_CASES
TOKENS = [1, 3, 16, 64, 300] if ON_GPU else [1, 3, 20]
# fp32 x, by scale dtype: fp32 summation order only; fp16/bf16: the reference rounds each weight to that dtype
TOL_FP32_X = {F32: 1e-4, F16: 1e-3, BF16: 5e-3}
LAYOUT_CASES = INTERPRETER_CASES + [(100, 512, 4, 64, False, True, F16), (64, 256, 8, -1, False, False, BF16)]


@functools.lru_cache(maxsize=None)
def _weight(out_f: int, in_f: int, bits: int, group: int, symmetric: bool, act_order: bool,
            scale_dtype: torch.dtype, seed: int = 0) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    w = quantize_rtn(torch.randn(out_f, in_f, generator=gen), QuantSpec(bits, group, symmetric),
                     Storage(scale_dtype=scale_dtype))
    if not act_order:
        return w
    # GPTQ act-order: sorted column i (groups contiguous) is stored at column perm[i], g_idx = i // width
    perm = torch.randperm(in_f, generator=gen)
    codes = torch.empty_like(w.codes)
    codes[:, perm] = w.codes
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[perm] = (torch.arange(in_f) // (in_f // w.scale.shape[1])).to(torch.int32)
    return QuantizedWeight(codes, w.scale, w.zero, w.spec, g_idx)


@functools.lru_cache(maxsize=None)
def _packed(case: tuple) -> tuple[ti.GpuPackedWeight, torch.Tensor]:
    """The packed weight on DEVICE and its reference dense fp32 weight there."""
    w = _weight(*case)
    return ti.pack(w, device=DEVICE), w.dequantize().float().to(DEVICE)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _ids(case: tuple) -> str:
    out_f, in_f, bits, group, sym, act, dtype = case
    return f"{out_f}x{in_f}-int{bits}-g{group}-{'sym' if sym else 'asym'}{'-act' if act else ''}-{str(dtype)[6:]}"


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=_ids)
def test_pack_dequantize_roundtrip(case):
    w = _weight(*case)
    packed = ti.pack(w, device="cpu")
    assert packed.scales.dtype == w.scale.dtype
    assert torch.equal(ti.dequantize(packed).to(w.scale.dtype), w.dequantize())


def test_word_packing_order():
    codes = torch.arange(16, dtype=torch.int32).repeat(3, 2)  # [3, 32]
    words = ti.pack_words(codes)
    assert words.shape == (4, 3) and words.dtype == torch.int32
    assert int(words[0, 0]) == 0x76543210 and int(words[1, 0]) == 0xFEDCBA98 - (1 << 32)
    assert torch.equal(ti.unpack_words(words), codes)


def test_pack_rejects_unequal_act_order_groups():
    w = _weight(32, 128, 4, 32, True, False, F32)
    g_idx = (torch.arange(128) // 32).to(torch.int32)
    g_idx[0] = 1  # group 0 loses a column to group 1
    with pytest.raises(ValueError, match="same size"):
        ti.pack(QuantizedWeight(w.codes, w.scale, w.zero, w.spec, g_idx), device="cpu")


def test_pack_rejects_narrow_groups():
    with pytest.raises(ValueError, match="multiple of 16"):
        ti.pack(_weight(16, 64, 4, 8, True, False, F32), device="cpu")


def test_unavailable_reason_is_consistent():
    assert ti.available() == (ti.reason() == "")


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_dequantize_on_device(case):
    packed, ref = _packed(case)
    assert torch.equal(ti.dequantize(packed).to(case[-1]).float(), ref)


@needs_triton
@pytest.mark.parametrize("kernel", [None, "gemv", "gemm"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matmul_fp32(case, tokens, kernel):
    packed, ref_w = _packed(case)
    x = torch.randn(tokens, packed.in_features, generator=torch.Generator().manual_seed(tokens)).to(DEVICE)
    y = ti.matmul(x, packed, kernel=kernel)
    assert y.shape == (tokens, packed.out_features) and y.dtype == F32
    assert _rel_err(y, x @ ref_w.T) < TOL_FP32_X[case[-1]]


@needs_triton
@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("tokens", [1, 16, 300] if ON_GPU else [1, 20])
@pytest.mark.parametrize("case", CASES[::2], ids=_ids)
def test_matmul_half(case, tokens, dtype):
    if ti.INTERPRET and dtype == BF16 and tokens > ti.GEMV_MAX_TOKENS:
        pytest.skip("Triton's CPU interpreter miscomputes bf16 tl.dot (seen with triton 3.9)")
    packed, ref_w = _packed(case)
    x = torch.randn(tokens, packed.in_features, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    x = x.to(DEVICE)
    y = ti.matmul(x, packed)
    assert y.dtype == dtype
    # the gemm rounds weights to x's dtype; both round the output to it
    assert _rel_err(y, x.float() @ ref_w.T) < (2e-3 if dtype == F16 else 1.5e-2)


@needs_triton
@pytest.mark.parametrize("kernel, config", [
    ("gemv", {"block_k4": 256, "block_k8": 256, "block_n": 32, "waves": 8}),  # K blocks spanning groups
    ("gemv", {"block_k4": 16, "block_k8": 16, "block_n": 128, "waves": 1}),
    ("gemm", {"block_k": 128, "block_k_fp32": 128, "block_n": 32, "waves": 8}),
    ("gemm", {"block_k": 16, "block_k_fp32": 16, "block_n": 128, "waves": 1}),
])
@pytest.mark.parametrize("case", CASES[:8], ids=_ids)
def test_matmul_configs(case, kernel, config):
    packed, ref_w = _packed(case)
    x = torch.randn(5, packed.in_features, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    y = (ti.gemv if kernel == "gemv" else ti.gemm)(x, packed, config).to(x.dtype)
    assert _rel_err(y, x @ ref_w.T) < TOL_FP32_X[case[-1]]


@needs_triton
def test_matmul_leading_dims_and_errors():
    packed, ref_w = _packed(CASES[0])
    x = torch.randn(2, 3, packed.in_features).to(DEVICE)
    y = ti.matmul(x, packed)
    assert y.shape == (2, 3, packed.out_features)
    assert _rel_err(y.reshape(6, -1), x.reshape(6, -1) @ ref_w.T) < 1e-4
    with pytest.raises(ValueError):
        ti.matmul(x[..., :-8], packed)
    with pytest.raises(ValueError):
        ti.matmul(x, packed, kernel="bogus")
