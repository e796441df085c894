"""CPU kernels for quantized linears: the C++ extension and the torch fallback against dequantize() matmuls."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from infopt.errors import InfoptError
from infopt.quant.nf4 import quantize_4bit
from infopt.quant.rtn import quantize_rtn
from infopt.quant.weights import QuantizedWeight
from infopt.quant.spec import QuantSpec
from infopt.runtime import kernels
from infopt.runtime.kernels import build, ops, packing
from infopt.runtime.qlinear import QuantLinear, replace_linears
from tests.tiny_models import make_tiny_model

needs_ext = pytest.mark.skipif(not kernels.available(), reason=f"infopt kernels unavailable: {kernels.reason()}")
TOL = 1e-5  # fp32 summation-order differences only

# (out, in, bits, group, symmetric, act_order): multiples of 32/64/128 and ragged shapes, every group layout
CASES = [
    (64, 128, 4, 32, True, False),
    (96, 256, 4, 64, False, False),
    (130, 512, 4, 128, True, False),  # rows not a multiple of the 4-row tile
    (33, 100, 4, -1, False, False),  # per-channel, columns padded to a unit
    (32, 768, 4, 256, False, False),
    (64, 384, 4, 128, False, True),  # GPTQ act-order
    (40, 96, 4, 32, False, True),  # act-order, small groups, padded groups
    (48, 256, 3, 64, False, False),
    (40, 192, 2, 32, True, False),
    (72, 256, 8, -1, True, False),
    (64, 256, 8, 64, False, False),
    (36, 96, 8, 32, True, True),
    (17, 50, 8, -1, False, False),
]
BATCHES = [1, 3, 16]


def _weight(out_f: int, in_f: int, bits: int, group: int, symmetric: bool, act_order: bool = False,
            dtype: torch.dtype = torch.float32, seed: int = 0) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    weight = quantize_rtn(torch.randn(out_f, in_f, generator=gen).to(dtype), QuantSpec(bits, group, symmetric))
    if not act_order:
        return weight
    # GPTQ act-order: sorted column i (groups contiguous) is stored at column perm[i], g_idx = i // width
    perm = torch.randperm(in_f, generator=gen)
    codes = torch.empty_like(weight.codes)
    codes[:, perm] = weight.codes
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[perm] = weight.column_groups()
    return QuantizedWeight(codes, weight.scale, weight.zero, weight.spec, g_idx)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _reference(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    return x.double() @ dense.double().T


def _case_id(case) -> str:
    out_f, in_f, bits, group, sym, act = case
    return f"{out_f}x{in_f}-int{bits}-g{group}-{'sym' if sym else 'asym'}{'-act' if act else ''}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fallback_matches_dequantize(case):
    weight = _weight(*case)
    dense = weight.dequantize()
    assert torch.equal(packing.dequantize_fp32(weight), dense)  # fp32 scales: the same arithmetic
    packed = kernels.pack(weight)
    assert torch.equal(ops.dense_weight(packed), dense)  # packing loses nothing
    for batch in BATCHES:
        x = torch.randn(batch, weight.shape[1])
        ref = _reference(x, dense)
        assert _rel(ops.tiled_matmul(x, packed, use_kernels=False), ref) < TOL
        assert _rel(kernels.matmul(x, packed, backend="torch"), ref) < TOL


@needs_ext
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("batch", BATCHES)
def test_extension_matches_fallback(case, batch):
    weight = _weight(*case, seed=batch)
    packed = kernels.pack(weight)
    x = torch.randn(batch, weight.shape[1])
    ref = _reference(x, weight.dequantize())
    y_ext = ops.kernel_matmul(x, packed)
    assert y_ext.dtype == torch.float32 and y_ext.shape == (batch, weight.shape[0])
    assert _rel(y_ext, ref) < TOL
    assert _rel(y_ext, ops.tiled_matmul(x, packed, use_kernels=False)) < TOL
    # bf16 activations are widened exactly: compare with the fp32 product of the same values
    xb = x.bfloat16()
    assert _rel(ops.kernel_matmul(xb, packed), _reference(xb.float(), weight.dequantize())) < TOL


@needs_ext
@pytest.mark.parametrize("case", CASES[:6] + CASES[9:11], ids=_case_id)
def test_extension_dequantize_is_bit_exact(case):
    packed = kernels.pack(_weight(*case))
    rows = packed.out_features
    assert torch.equal(ops.kernel_dequantize(packed, 0, rows), ops.torch_dequantize(packed, 0, rows))
    assert torch.equal(ops.kernel_dequantize(packed, 5, rows - 2), ops.torch_dequantize(packed, 5, rows - 2))


@needs_ext
def test_extension_large_batch_and_tiled_path(monkeypatch):
    weight = _weight(70, 256, 4, 64, False)
    packed = kernels.pack(weight)
    x = torch.randn(37, 256)
    ref = _reference(x, weight.dequantize())
    assert _rel(ops.kernel_matmul(x, packed), ref) < TOL  # 37 tokens: 9 slices of 4, one of 1
    monkeypatch.setattr(kernels, "MAX_KERNEL_TOKENS", 8)
    assert _rel(kernels.matmul(x, packed), ref) < TOL  # dequantize tiles by the extension + dense GEMM


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_four_bit_weights(quant_type, double_quant):
    weight = quantize_4bit(torch.randn(36, 256), quant_type, 64, double_quant)
    dense = weight.dequantize()
    x = torch.randn(3, 256)
    layers = [QuantLinear.from_quantized(weight, backend="torch"), QuantLinear.from_quantized(weight, backend="torch",
                                                                                              lean=True)]
    if kernels.available():
        layers.append(QuantLinear.from_quantized(weight, backend="ext"))
    for layer in layers:
        assert layer.packed is None or layer.packed.kind == "lut4"
        assert _rel(layer(x), _reference(x, dense)) < TOL


# (bits, low code, block, affine): GGUF's block grids as the reader hands them over (Q4_1/Q4_K, Q5_0, Q5_1/Q5_K,
# Q6_K), plus awkward row and column counts
BLOCK_CASES = [(4, 0, 32, True), (5, -16, 32, False), (5, 0, 32, True), (6, -32, 16, False), (4, -8, 32, False),
               (8, 0, 32, True)]


@pytest.mark.parametrize("bits, low, block, affine", BLOCK_CASES)
@pytest.mark.parametrize("rows, cols", [(36, 256), (13, 96)])
def test_block_weights_run_packed_with_their_exact_values(bits, low, block, affine, rows, cols):
    """code * scale + offset, as ggml dequantizes (a multiply, then an add): the kernels' weights equal
    BlockWeight.dequantize() bit for bit, and their products the dense product up to summation order."""
    from infopt.quant.weights import BlockWeight

    g = torch.Generator().manual_seed(bits * 100 + block + rows)
    codes = torch.randint(low, low + 2**bits, (rows, cols), generator=g).to(torch.int8)
    scale = torch.rand(rows, cols // block, generator=g) * 0.02
    offset = -torch.rand(rows, cols // block, generator=g) * 0.1 if affine else None
    weight = BlockWeight(codes=codes, scale=scale, offset=offset, bits=bits, low=low)
    dense = weight.dequantize()
    packed = packing.pack(weight)
    assert packed.kind == ("lut4" if bits <= 4 else "int8") and not ops.int8_activation_eligible(packed)
    assert torch.equal(ops.torch_dequantize(packed, 0, rows)[:, :cols], dense)
    x = torch.randn(5, cols, generator=g)
    assert _rel(QuantLinear.from_quantized(weight, backend="torch", lean=True)(x), _reference(x, dense)) < TOL
    if kernels.available():
        assert torch.equal(ops.kernel_dequantize(packed, 0, rows)[:, :cols], dense)
        for tokens in (1, 3, 5):
            assert _rel(QuantLinear.from_quantized(weight, backend="ext")(x[:tokens]),
                        _reference(x[:tokens], dense)) < TOL


def test_block_weights_refuse_what_they_cannot_hold():
    from infopt.quant.weights import BlockWeight

    with pytest.raises(InfoptError, match="block weight"):
        BlockWeight(codes=torch.zeros(4, 96, dtype=torch.int8), scale=torch.ones(4, 5), offset=None, bits=4, low=0)
    if kernels.has_vnni():  # a float offset has no int8-activation form
        weight = BlockWeight(codes=torch.zeros(4, 128, dtype=torch.int8), scale=torch.ones(4, 1), bits=4, low=0,
                             offset=torch.ones(4, 1))
        packed = packing.pack(weight)
        with pytest.raises(RuntimeError, match="offsets"):
            build.ops().lut4_mm_a8(torch.randn(1, 128), packed.data, packed.scale, packed.zero, 128, 4, None)


def test_bf16_scales_follow_fp32_semantics():
    weight = _weight(64, 256, 4, 64, False, dtype=torch.bfloat16)
    assert weight.scale.dtype == torch.bfloat16
    fp32 = packing.dequantize_fp32(weight)  # (code - zero) * scale in fp32, not rounded back to bf16
    packed = kernels.pack(weight)
    assert torch.equal(ops.dense_weight(packed), fp32)
    # dequantize() rounds every weight to bf16: within half a bf16 ulp of the fp32 value
    assert torch.allclose(weight.dequantize().float(), fp32, rtol=2**-8, atol=0)
    x = torch.randn(2, 256)
    backends = ["torch", "ext"] if kernels.available() else ["torch"]
    for backend in backends:
        assert _rel(QuantLinear.from_quantized(weight, backend=backend)(x), _reference(x, fp32)) < TOL


def test_quant_linear_shapes_dtypes_and_bias():
    weight = _weight(48, 128, 4, 32, False)
    bias = torch.randn(48)
    x = torch.randn(2, 5, 128)
    ref = (_reference(x.reshape(-1, 128), weight.dequantize()) + bias.double()).reshape(2, 5, 48)
    backends = ["torch", "ext"] if kernels.available() else ["torch"]
    for backend in backends:
        for lean in (False, True):
            layer = QuantLinear.from_quantized(weight, bias, backend=backend, lean=lean)
            assert layer.backend == backend
            y = layer(x)
            assert y.shape == (2, 5, 48) and y.dtype == torch.float32
            assert _rel(y, ref) < TOL
            yb = layer(x.bfloat16())
            assert yb.dtype == torch.bfloat16
            assert _rel(yb.float(), (_reference(x.bfloat16().float().reshape(-1, 128), weight.dequantize())
                                     + bias.double()).reshape(2, 5, 48)) < 1e-2  # bf16 output rounding


def test_unpackable_weights_fall_back_to_dense():
    group16 = _weight(32, 64, 4, 16, True)
    irregular = _weight(32, 256, 4, 64, False)
    irregular.g_idx = torch.tensor([0] * 96 + [1] * 32 + [2] * 64 + [3] * 64, dtype=torch.int32)
    for weight, reason in ((group16, "groups of 16"), (irregular, "same size")):
        with pytest.raises(kernels.Unpackable, match=reason):
            kernels.pack(weight)
        layer = QuantLinear.from_quantized(weight)
        assert layer.backend == "torch" and layer.packed is None and reason in layer.note
        x = torch.randn(3, weight.shape[1])
        assert _rel(layer(x), _reference(x, weight.dequantize())) < TOL


def test_layout_roundtrips():
    indices = torch.randint(0, 16, (8, 256), dtype=torch.uint8)
    packed = packing.pack_nibbles(indices)
    assert packed.shape == (8, 128) and torch.equal(packing.unpack_nibbles(packed), indices)
    # byte k of dword l in unit 0 holds columns 16 * 2k + l (low nibble) and 16 * (2k + 1) + l (high nibble)
    assert int(packed[0, 4 * 3 + 1]) == int(indices[0, 32 + 3]) | int(indices[0, 48 + 3]) << 4
    rows = torch.arange(8 * 64, dtype=torch.int32).reshape(8, 64)
    assert torch.equal(packing.untile_rows(packing.tile_rows(rows, 16), 16), rows)
    assert torch.equal(packing.tile_rows(rows, 16)[0, 16:32], rows[1, :16])  # unit 0 of row 1 follows row 0's


def test_precheck_reasons():
    assert build.precheck(env={"INFOPT_NO_EXT": "1"}) == "disabled by INFOPT_NO_EXT"
    assert "lacks" in build.precheck(env={}, flags={"avx2", "fma"})


def test_build_failure_falls_back_with_a_warning(monkeypatch):
    def broken() -> None:
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setattr(build, "precheck", lambda: None)
    monkeypatch.setattr(build, "_build", broken)
    with pytest.warns(UserWarning, match="compiler exploded"):
        assert build.ops() is None
    assert not build.available() and "build failed" in build.reason()
    layer = QuantLinear.from_quantized(_weight(8, 64, 4, 32, True))
    assert layer.backend == "torch" and "compiler exploded" in layer.note


def test_no_ext_environment_selects_torch():
    code = ("import torch; from infopt.quant.rtn import quantize_rtn; from infopt.quant.spec import QuantSpec;"
            "from infopt.runtime.qlinear import QuantLinear;"
            "w = quantize_rtn(torch.randn(8, 64), QuantSpec(4, 32, True)); layer = QuantLinear.from_quantized(w);"
            "x = torch.randn(2, 64); err = (layer(x) - x @ w.dequantize().T).abs().max().item();"
            "print(layer.backend, layer.note, err < 1e-4)")
    env = {**os.environ, "INFOPT_NO_EXT": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["torch", "extension", "unavailable:", "disabled", "by", "INFOPT_NO_EXT", "True"]


def _on_one_and_two_threads(run):
    """run() with torch's thread count at 1, then at 2 (restored afterwards)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        return one, run()
    finally:
        torch.set_num_threads(threads)


@needs_ext
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs")
def test_thread_count_does_not_change_results():
    packed = kernels.pack(_weight(256, 4096, 4, 128, False))
    x = torch.randn(5, 4096)
    one, two = _on_one_and_two_threads(lambda: ops.kernel_matmul(x, packed))
    assert torch.equal(one, two)  # each row's summation order is fixed, whatever the split


DENSE_SHAPES = [(7, 48), (130, 512), (64, 4096), (33, 16)]  # rows off the 4-row tile, one-step and long rows


@needs_ext
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [1, 4, 5, 6, 7, 13])
def test_dense_kernel_matches_linear(shape, dtype, tokens):
    gen = torch.Generator().manual_seed(tokens)
    weight = torch.randn(*shape, generator=gen).to(dtype)
    x = torch.randn(tokens, shape[1], generator=gen).to(dtype)
    y = ops.dense_matmul(x, weight)
    assert y.dtype == torch.float32 and y.shape == (tokens, shape[0])
    assert _rel(y, _reference(x, weight)) < TOL  # bf16 weights and inputs widen exactly; fp32 sums


@needs_ext
def test_dense_kernel_rows_agree_across_slices_and_threads():
    weight, x = torch.randn(260, 1024), torch.randn(9, 1024)
    together = ops.dense_matmul(x, weight)  # slices of 6 + 3 tokens
    for i in (0, 4, 8):  # a token alone takes the one-row path (two accumulator sets): same sums up to rounding
        assert _rel(ops.dense_matmul(x[i:i + 1], weight)[0], together[i]) < 1e-6
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.dense_matmul(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, together)  # the split between threads never changes a row's summation order


@needs_ext
def test_dense_kernel_rejects_what_it_cannot_read():
    assert ops.dense_kernel_tokens(torch.randn(8, 40)) == 0  # in_features not a multiple of 16
    assert ops.dense_kernel_tokens(torch.randn(40, 8).t()) == 0  # not contiguous
    assert ops.dense_kernel_tokens(torch.randn(8, 32, dtype=torch.float16)) == 0
    assert ops.dense_kernel_tokens(torch.randn(8, 32)) == ops.DENSE_KERNEL_TOKENS[torch.float32]
    with pytest.raises(RuntimeError, match="divisible by 16"):
        ops.dense_matmul(torch.randn(1, 40), torch.randn(8, 40))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.dense_matmul(torch.randn(1, 32), torch.randn(8, 32, dtype=torch.float16))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dense_linear_sends_decode_batches_to_the_kernel(monkeypatch, dtype):
    from infopt.runtime.model import DenseLinear

    weight, bias = torch.randn(96, 64).to(dtype), torch.randn(96).to(dtype)
    layer, plain = DenseLinear(weight, bias, use_kernel=True), DenseLinear(weight, bias)
    calls = []
    real = kernels.dense_matmul
    monkeypatch.setattr(kernels, "dense_matmul", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    limit = ops.DENSE_KERNEL_TOKENS[dtype]
    for tokens in (1, limit, limit + 1, 64):
        x = torch.randn(1, tokens, 64).to(dtype)
        y = layer(x)
        assert y.dtype == dtype and y.shape == (1, tokens, 96)
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 output rounding
        assert torch.allclose(y.float(), plain(x).float(), rtol=tol, atol=tol)
    assert calls == [1, limit]  # prefill-sized inputs stay with torch


needs_vnni = pytest.mark.skipif(not kernels.has_vnni(), reason="the int8-activation kernel needs AVX512-VNNI")
# (out, in, bits, group, symmetric, act_order): the weights the W4A8 kernel takes (int codes, whole 128-column groups)
A8_CASES = [
    (130, 512, 4, 128, True, False),
    (64, 768, 4, 256, False, False),
    (33, 100, 4, -1, False, False),  # per channel, padded to a unit
    (64, 384, 4, 128, False, True),  # act-order
    (48, 256, 3, 128, False, False),
    (40, 384, 2, -1, True, False),
]


@needs_vnni
@pytest.mark.parametrize("case", A8_CASES, ids=_case_id)
@pytest.mark.parametrize("tokens", [1, 3, 4, 5, 9])
def test_int8_activation_kernel_matches_its_reference(case, tokens):
    weight = _weight(*case)
    packed = kernels.pack(weight)
    assert ops.int8_activation_eligible(packed)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, weight.shape[1], generator=gen) * torch.linspace(0.1, 3, weight.shape[1])
    x[0, : min(64, weight.shape[1])] = 0  # an all-zero slice (amax 0) in the first unit
    y = ops.kernel_matmul_a8(x, packed)
    assert y.shape == (tokens, weight.shape[0]) and torch.isfinite(y).all()
    rows = ops.torch_dequantize(packed, 0, weight.shape[0])  # packed column order, like the reference's x
    want = ops.quantize_activations_reference(x, packed).double() @ rows.double().T
    assert _rel(y, want) < TOL  # exact integer dot products; fp32 scaling and sums
    exact = _rel(y, _reference(x, weight.dequantize()))
    assert 1e-5 < exact < 2e-2  # int8 activations: close to the exact product, but not equal to it


@needs_vnni
def test_int8_activation_kernel_takes_bf16_and_is_thread_invariant():
    packed = kernels.pack(_weight(256, 4096, 4, 128, False))
    x = torch.randn(6, 4096)
    assert torch.equal(ops.kernel_matmul_a8(x.bfloat16(), packed), ops.kernel_matmul_a8(x.bfloat16().float(), packed))
    one, two = _on_one_and_two_threads(lambda: ops.kernel_matmul_a8(x, packed))
    assert torch.equal(one, two)


@needs_vnni
def test_int8_activation_backend_only_takes_eligible_weights():
    nf4 = kernels.pack(quantize_4bit(torch.randn(64, 256), "nf4", 64, False))
    small_groups = kernels.pack(_weight(64, 256, 4, 32, True))
    int8 = kernels.pack(_weight(64, 256, 8, -1, True))
    assert not any(ops.int8_activation_eligible(p) for p in (nf4, small_groups, int8))
    nf4_128 = kernels.pack(quantize_4bit(torch.randn(64, 256), "nf4", 128, False))  # unit-wide groups, NF4 values
    assert nf4_128.group_size == 128 and not nf4_128.int_codes
    with pytest.raises(ValueError, match="integer codes"):
        ops.kernel_matmul_a8(torch.randn(1, 256), nf4_128)
    x = torch.randn(2, 256)
    for weight in (_weight(64, 256, 4, 32, True), _weight(64, 256, 8, -1, True)):
        layer = QuantLinear.from_quantized(weight, backend="ext-a8")
        assert layer.backend == "ext" and "int8 activations" in layer.note
        assert _rel(layer(x), _reference(x, weight.dequantize())) < TOL  # exact, as "ext"
    weight = _weight(64, 256, 4, 128, False)
    layer = QuantLinear.from_quantized(weight, torch.randn(64), backend="ext-a8")
    assert layer.backend == "ext-a8"
    assert 1e-5 < _rel(layer(x) - layer.bias, _reference(x, weight.dequantize())) < 2e-2


def test_int8_activation_backend_needs_vnni(monkeypatch):
    monkeypatch.setattr(build, "has_vnni", lambda: False)
    weight = _weight(64, 256, 4, 128, False)
    if kernels.available():
        layer = QuantLinear.from_quantized(weight, backend="ext-a8")
        assert layer.backend == "ext" and "VNNI" in layer.note
    else:
        with pytest.raises(InfoptError, match="unavailable"):
            QuantLinear.from_quantized(weight, backend="ext-a8")


@needs_ext
def test_a_build_without_vnni_refuses_int8_activations(tmp_path):
    code = ("import torch; from infopt.runtime.kernels import build, ops;"
            "flags = build.cpu_flags() - {'avx512_vnni'}; build.cpu_flags = lambda: flags;"
            "from infopt.runtime import kernels; from infopt.quant.rtn import quantize_rtn;"
            "from infopt.quant.spec import QuantSpec; from infopt.runtime.qlinear import QuantLinear;"
            "w = quantize_rtn(torch.randn(64, 256), QuantSpec(4, 128, True)); p = kernels.pack(w);"
            "layer = QuantLinear.from_quantized(w, backend='ext-a8'); x = torch.randn(2, 256);"
            "print(build.available(), build.has_vnni(), ops.int8_activation_eligible(p), layer.backend,"
            " torch.allclose(layer(x), x @ w.dequantize().T, atol=1e-4));"
            "ops._ext().lut4_mm_a8(x, p.data, p.scale, p.zero, p.group_size, p.out_features, p.perm)")
    env = {**os.environ, "INFOPT_EXT_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}  # a separate build
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.stdout.split() == ["True", "False", "False", "ext", "True"], run.stderr
    assert run.returncode != 0 and "no AVX512-VNNI int8-activation path" in run.stderr


@needs_ext
def test_a_kept_build_loads_without_setuptools_or_ninja(tmp_path):
    """A build is kept under a hash of its sources, flags and torch version; the next process with the same ones loads
    it directly, without importing cpp_extension (setuptools) or running ninja."""
    code = ("import sys; from infopt.runtime.kernels import build; ok = build.ops() is not None;"
            "print(ok, 'torch.utils.cpp_extension' in sys.modules)")
    env = {**os.environ, "INFOPT_EXT_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}  # a separate build
    first, second = (subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
                     for _ in range(2))
    assert first.stdout.split() == ["True", "True"], first.stderr  # built through cpp_extension
    assert second.stdout.split() == ["True", "False"], second.stderr
    assert len(list((tmp_path / "kernels").glob(f"{build.NAME}-*.so"))) == 1
    assert build._kept_library(["-O3"]) != build._kept_library(["-O2"])


def _quantized_llama(tmp_path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(make_tiny_model("llama", tmp_path / "llama"),
                                                              dtype=torch.float32).eval()
    specs = [QuantSpec(4, 32, False), QuantSpec(8, -1, True), QuantSpec(4, 64, True), QuantSpec(3, 32, False)]
    quantized = {}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for i, (name, module) in enumerate(linears):
        weight = quantize_rtn(module.weight.detach(), specs[i % len(specs)])
        if i % 5 == 2:  # some act-order weights too
            weight = _weight(*module.weight.shape, 4, 32, False, act_order=True, seed=i)
            weight = QuantizedWeight(weight.codes, weight.scale * module.weight.abs().mean(), weight.zero,
                                     weight.spec, weight.g_idx)
        quantized[f"{name}.weight"] = weight
    return model, quantized


@pytest.mark.parametrize("backend,lean", [("ext", False), ("torch", False), ("torch", True)])
def test_replace_linears_on_tiny_llama(tmp_path, backend, lean):
    if backend == "ext" and not kernels.available():
        pytest.skip(f"infopt kernels unavailable: {kernels.reason()}")
    model, quantized = _quantized_llama(tmp_path)
    reference = copy.deepcopy(model)
    for name, weight in quantized.items():
        reference.get_submodule(name.removesuffix(".weight")).weight.data = weight.dequantize()
    replaced = replace_linears(model, quantized, backend=backend, lean=lean)
    assert len(replaced) == len(quantized)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in replaced)
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert _rel(got, want) < 1e-4


def test_replace_linears_rejects_bad_names(tmp_path):
    model, quantized = _quantized_llama(tmp_path)
    name, weight = next(iter(quantized.items()))
    with pytest.raises(InfoptError, match="no such module"):
        replace_linears(model, {"model.nope.weight": weight})
    with pytest.raises(InfoptError, match="expected an nn.Linear"):
        replace_linears(model, {"model.norm": weight})
    wrong = quantize_rtn(torch.randn(3, 64), QuantSpec(4, 32, True))
    with pytest.raises(InfoptError, match="does not match"):
        replace_linears(model, {name: wrong})
