import pytest
import torch

from infopt.errors import InfoptError
from infopt.quant.rtn import quantize_rtn
from infopt.quant.spec import QuantSpec, build_plan, parse_override


def _weight(out_f=32, in_f=128, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(out_f, in_f, generator=gen) * 0.02).to(dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [-1, 32])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_codes_in_range_and_error_within_half_step(bits, group, sym):
    w = _weight()
    q = quantize_rtn(w, QuantSpec(bits, group, sym))
    spec = q.spec
    assert q.codes.dtype == torch.int8
    assert int(q.codes.min()) >= spec.qmin and int(q.codes.max()) <= spec.qmax
    assert q.scale.shape == (32, spec.num_groups(128))
    assert (q.zero is None) == sym
    step = q.scale.repeat_interleave(128 // q.scale.shape[1], dim=1)
    err = (q.dequantize() - w).abs()
    # symmetric: the positive extreme lands exactly half a step above qmax and is clipped by that half step
    assert bool((err <= step * 0.5 * (1 + 1e-3)).all())


def test_more_bits_and_smaller_groups_reduce_error():
    w = _weight(64, 256, seed=1)

    def err(spec):
        return (quantize_rtn(w, spec).dequantize() - w).pow(2).mean().item()

    assert err(QuantSpec(8, -1)) < err(QuantSpec(4, -1)) < err(QuantSpec(3, -1)) < err(QuantSpec(2, -1))
    assert err(QuantSpec(4, 32)) < err(QuantSpec(4, -1))


def test_asymmetric_represents_zero_exactly_and_handles_constant_rows():
    w = _weight(4, 64)
    w[0] = 0.0
    w[1] = 0.5  # all-positive row: the range is widened to include zero
    q = quantize_rtn(w, QuantSpec(4, 32, symmetric=False))
    deq = q.dequantize()
    assert torch.equal(deq[0], torch.zeros(64))
    assert torch.allclose(deq[1], w[1], atol=0.5 / 15 / 2 + 1e-6)


def test_scales_stored_in_source_dtype():
    w = _weight(dtype=torch.bfloat16)
    q = quantize_rtn(w, QuantSpec(4, 32))
    assert q.scale.dtype == torch.bfloat16 and q.dequantize().dtype == torch.bfloat16


@pytest.mark.parametrize("bits,group", [(5, 128), (4, 0), (4, -2), (16, -1)])
def test_invalid_specs_rejected(bits, group):
    with pytest.raises(InfoptError):
        QuantSpec(bits, group)


def test_plan_skips_non_divisible_groups_with_warning_and_applies_overrides():
    shapes = {"l.0.q": (64, 64), "l.0.down": (64, 172), "l.0.up": (172, 64)}
    spec = QuantSpec(4, 32)
    plan = build_plan(shapes, spec, ignore=[r"\.q$"], overrides=[parse_override(r"up$=8:-1:asym", spec)])
    by_name = {e.module: e for e in plan.entries}
    assert by_name["l.0.q"].spec is None and by_name["l.0.q"].note == "ignored"
    assert by_name["l.0.down"].spec is None and "172" in by_name["l.0.down"].note
    assert by_name["l.0.up"].spec == QuantSpec(8, -1, False)
    assert len(plan.warnings) == 1 and "l.0.down" in plan.warnings[0]
    assert parse_override("mlp=skip", spec) == ("mlp", None)
    with pytest.raises(InfoptError):
        parse_override("no-equals-sign", spec)


def _awkward(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Random rows plus all-zero, constant, all-negative, on-grid (exact halves after scaling) and tiny ones."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 0.05
    w[0] = 0
    w[1] = 0.3
    w[2] = -w[2].abs()
    w[3] = torch.randint(-16, 16, (cols,), generator=g).float() * 0.125
    w[4] *= 1e-30
    w[5, ::7] = 0
    return w


@pytest.mark.skipif(not __import__("infopt.runtime.kernels", fromlist=["available"]).available(),
                    reason="infopt kernels unavailable")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [16, 32, 128])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype, scale_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
                                                (torch.bfloat16, torch.float16), (torch.float32, torch.float16)])
def test_rtn_in_cpp_gives_the_torch_forms_codes_scales_and_zeros(bits, group, sym, dtype, scale_dtype, monkeypatch):
    """The one-pass C++ RTN (round_to_nearest) against the torch form, bit for bit, on awkward rows, for fp32 and
    16-bit sources with scales stored in the source's dtype or fp16 (GPTQ's format): 16-bit scales that round to 0
    or overflow included. A value that is not finite (--allow-non-finite) leaves the whole weight to the torch form."""
    import infopt.quant.rtn as rtn

    spec = QuantSpec(bits, group, sym)
    storage = rtn.Storage(scale_dtype=scale_dtype)
    weight = _awkward(40, 256, bits * 100 + group)
    if dtype == torch.float16:
        weight = weight.clamp(-6e4, 6e4)  # finite in fp16; the 1e-30 row still rounds to zero scales
    else:
        weight[6] *= 1e7  # an fp16 scale of this row overflows to infinity
    weight = weight.to(dtype)
    poisoned = weight.clone()
    poisoned[9, 5] = float("nan")
    fast = [quantize_rtn(weight, spec, storage), quantize_rtn(poisoned, spec, storage)]
    assert rtn._in_kernel(weight, spec, storage) is not None  # the kernel did run
    monkeypatch.setattr(rtn, "_in_kernel", lambda *args: None)
    slow = [quantize_rtn(weight, spec, storage), quantize_rtn(poisoned, spec, storage)]
    for a, b in zip(fast, slow):
        assert torch.equal(a.codes, b.codes) and a.codes.dtype == b.codes.dtype == torch.int8
        assert torch.equal(a.scale, b.scale) and a.scale.dtype == b.scale.dtype
        assert (a.zero is None) == (b.zero is None) == sym
        if not sym:
            assert torch.equal(a.zero, b.zero) and a.zero.dtype == b.zero.dtype


def test_rtn_kernel_refuses_bad_input():
    from infopt.runtime import kernels

    if not kernels.available():
        pytest.skip("infopt kernels unavailable")
    ops = kernels.build.ops()
    with pytest.raises(RuntimeError, match="multiples of 16"):
        ops.round_to_nearest(torch.zeros(4, 48), 24, -8, 7, True, torch.float32)
    with pytest.raises(RuntimeError, match="float32"):
        ops.round_to_nearest(torch.zeros(4, 32).double(), 16, -8, 7, True, torch.float32)
    with pytest.raises(RuntimeError, match="scales are"):
        ops.round_to_nearest(torch.zeros(4, 32), 16, -8, 7, True, torch.float64)
    with pytest.raises(RuntimeError, match="qmin"):
        ops.round_to_nearest(torch.zeros(4, 32), 16, 0, 7, True, torch.float32)


@pytest.mark.parametrize("group", [16, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_reported_weight_error_equals_the_dequantized_residual(group, sym, dtype):
    """relative_error (one C++ pass where the kernels are built) against the residual through dequantize(), whose
    weights are formed in the scale's dtype (16-bit sources keep 16-bit scales)."""
    from infopt.quant.weights import relative_error

    weight = _awkward(40, 256, 7).to(dtype)
    q = quantize_rtn(weight, QuantSpec(4, group, sym))
    assert q.scale.dtype == dtype
    direct = float(((q.dequantize().double() - weight.double()) ** 2).sum() / (weight.double() ** 2).sum())
    assert relative_error(q, weight) == pytest.approx(direct, rel=1e-5)
    assert relative_error(q, weight * 0) == 0.0 or relative_error(q, weight * 0) > 0  # no division by zero
