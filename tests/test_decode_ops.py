"""The fused C++ ops of the runtime's small steps (decode_ops.cpp) against the plain-torch forms they replace."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from infopt.runtime import kernels
from infopt.runtime.model import RMSNorm, Rotary, apply_rotary, rope_frequencies

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"infopt kernels unavailable: {kernels.reason()}")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # relative, of the largest value


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = want.float().abs().max().clamp(min=1e-6)
    assert float((got.float() - want.float()).abs().max() / scale) <= TOL[dtype]


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), width=st.sampled_from([8, 24, 64, 172, 256]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_rms_norm_and_the_residual_add_match_torch(rows, width, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, width, generator=g) * 3).to(dtype)
    delta = torch.randn(rows, width, generator=g).to(dtype)
    weight = torch.randn(width, generator=g).to(dtype)
    norm = RMSNorm(weight, 1e-5)
    _close(kernels.rms_norm(x, weight, 1e-5), norm(x), dtype)
    residual = x.clone()
    normed = kernels.add_rms_norm(residual, delta, weight, 1e-5)
    assert torch.equal(residual, x + delta)  # the sum is rounded once, as torch rounds it
    _close(normed, norm(x + delta), dtype)


@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(1, 5), heads=st.sampled_from([(4, 2), (8, 8), (6, 1)]), head_dim=st.sampled_from([8, 16, 64]),
       partial=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_rotary_and_cache_write_equal_the_torch_path_bit_for_bit(tokens, heads, head_dim, partial, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    num_heads, kv_heads = heads
    params = {"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.5 if partial else 1.0}
    rotary = Rotary(*rope_frequencies(params, head_dim, 512))
    positions = torch.randint(0, 300, (tokens,), generator=g)
    cos, sin = rotary.tables(positions, dtype)
    qkv = torch.randn(tokens, (num_heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    q, k, v = (t.reshape(tokens, -1, head_dim) for t in qkv.split([num_heads * head_dim, kv_heads * head_dim,
                                                                   kv_heads * head_dim], dim=-1))
    want_q, want_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    keys, values = torch.zeros(8, 16, kv_heads, head_dim, dtype=dtype), torch.zeros(8, 16, kv_heads, head_dim, dtype=dtype)
    slots = torch.randperm(128, generator=g)[:tokens]
    kernels.rotary_kv_write(q, k, v, cos, sin, keys, values, slots)  # q and k are views into qkv: rotated in place
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(keys.view(-1, kv_heads, head_dim)[slots], want_k)
    assert torch.equal(values.view(-1, kv_heads, head_dim)[slots], v)
    assert int((keys != 0).flatten(1).any(1).sum()) <= tokens  # nothing else written


def _reference_attention(q, keys, values, tables, owners, positions, scale, window):
    """softmax(q K^T) V per query token over its sequence's keys 0 .. position (within the window), by SDPA."""
    out = []
    block = keys.shape[1]
    for t in range(q.shape[0]):
        length = int(positions[t]) + 1
        ids = tables[owners[t], : -(-length // block)]
        k = keys[ids].flatten(0, 1)[:length].transpose(0, 1)[None]
        v = values[ids].flatten(0, 1)[:length].transpose(0, 1)[None]
        visible = torch.ones(length, dtype=torch.bool)
        if window:
            visible[: max(0, length - window)] = False
        out.append(F.scaled_dot_product_attention(q[t][None, :, None].float(), k.float(), v.float(),
                                                  attn_mask=visible[None], scale=scale, enable_gqa=True)[0, :, 0])
    return torch.stack(out).to(q.dtype)


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 90), min_size=1, max_size=3), new=st.integers(1, 4),
       heads=st.sampled_from([(4, 2), (8, 4), (2, 2)]), head_dim=st.sampled_from([8, 32, 64, 80]),
       window=st.sampled_from([None, 5, 40]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_paged_attention_equals_sdpa_over_the_gathered_context(lengths, new, heads, head_dim, window, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    num_heads, kv_heads, block = *heads, 8
    keys = torch.randn(64, block, kv_heads, head_dim, generator=g).to(dtype)
    values = torch.randn(64, block, kv_heads, head_dim, generator=g).to(dtype)
    order = torch.randperm(64, generator=g)  # sequences own scattered blocks
    width = -(-(max(lengths) + new) // block)
    tables = torch.stack([order[i * width:(i + 1) * width] for i in range(len(lengths))])
    owners = torch.tensor([i for i in range(len(lengths)) for _ in range(new)])
    positions = torch.tensor([n + j for n in lengths for j in range(new)])  # new tokens after each context
    q = (torch.randn(len(owners), num_heads, head_dim, generator=g) * 2).to(dtype)
    scale = head_dim ** -0.5
    got = kernels.paged_attention(q, keys, values, tables, owners, positions, scale, window)
    _close(got, _reference_attention(q, keys, values, tables, owners, positions, scale, window), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(dtype):
    gate_up = (torch.randn(5, 2 * 172, generator=torch.Generator().manual_seed(4)) * 4).to(dtype)
    gate, up = gate_up.split([172, 172], dim=-1)  # strided halves of one fused product
    _close(kernels.silu_mul(gate, up), F.silu(gate) * up, dtype)


def test_indices_outside_the_cache_are_refused_not_read():
    keys = torch.zeros(4, 8, 2, 16)
    q = torch.zeros(1, 4, 16)
    one = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="block id 9 lies outside the cache"):
        kernels.paged_attention(q, keys, keys, torch.tensor([[9]]), one, torch.tensor([3]), 0.25, None)
    with pytest.raises(RuntimeError, match="lies beyond its block table"):
        kernels.paged_attention(q, keys, keys, torch.tensor([[0]]), one, torch.tensor([8]), 0.25, None)
    with pytest.raises(RuntimeError, match="names sequence 1 of 1"):
        kernels.paged_attention(q, keys, keys, torch.tensor([[0]]), one + 1, torch.tensor([3]), 0.25, None)
    k = torch.zeros(1, 2, 16)
    cos = torch.ones(1, 1, 16)
    with pytest.raises(RuntimeError, match="slot 32 lies outside the cache"):
        kernels.rotary_kv_write(q, k, k, cos, cos, keys, keys, torch.tensor([32]))
    with pytest.raises(RuntimeError, match="dtype"):
        kernels.rotary_kv_write(q, k, k, cos, cos, keys.half(), keys.half(), one)
