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
