"""Precision of the calibration forwards and of the Hessian products.

Two measured facts on an AVX512-BF16 CPU (AMD Zen 5, torch 2.13 with oneDNN):
- bf16 matrix products (autocast) run at ~4.5x torch's fp32 GEMM rate, with bf16 accuracy (inputs rounded to
  8 significant bits; relative error ~3e-3 on a 768-term product).
- fp32 products with oneDNN's bf16 "fpmath" mode allowed (torch.backends.mkldnn.matmul.fp32_precision = "bf16")
  run at ~2.2x the fp32 GEMM rate and stayed fp32-accurate: max relative error vs float64 8e-7 for x @ w.T and 3e-7
  for X^T X on 8192 x 768 inputs (fp32 GEMM: 4e-7 and 3e-7; bf16 inputs: 2.6e-3). tests/test_gptq.py checks this
  stays true, since the mode only promises that reduced precision *may* be used.

On an Intel Xeon with AMX (measured 2026-12-02, 2 threads): bf16 products run at 3.75x the fp32 GEMM rate
(8192 x 256 x 1536: 848 vs 226 GFLOP/s), the bf16 attention kernel at 2.6x fp32's (16 x 4 x 512 x 64 causal:
7.0 vs 18.3 ms), and the fpmath mode rounds fp32 inputs to bf16 (so it is off for fp32 inputs), but on inputs
that are bf16 already it is exact and 3.6x faster (X^T X, 8192 x 768: 7.6 vs 27.5 ms, relative error 7e-7).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from infopt.device import cpu_flags, fast_bf16
from infopt.errors import InfoptError

FORWARD_DTYPES = ("auto", "float32", "bfloat16")


def resolve_forward_dtype(choice: str, bf16_forwards: bool, device: str) -> torch.dtype | None:
    """The dtype of the calibration forwards' matmuls; None keeps float32.

    auto: bfloat16 where bf16 products are native, for a method whose registry entry says it tolerates them
    (Method.bf16_forwards). GPTQ needs the inputs' second moments and the next layer's inputs, which bf16 products
    keep to ~3 significant digits, as GPU GPTQ runs in fp16/bf16 do (bench model: perplexity 12.7403 vs 12.7336 in
    fp32). AWQ compares the output errors of its scale candidates: bf16 rounding of the outputs adds about 0.3% of
    noise to errors that differ by percents between alphas, and on the bench model every one of its 18 scale searches
    picked the same alpha in bf16 as in fp32 (measured 2026-12-02).
    """
    if choice not in FORWARD_DTYPES:
        raise InfoptError(f"invalid --forward-dtype {choice!r}: choose one of {', '.join(FORWARD_DTYPES)}")
    if choice == "auto":
        return torch.bfloat16 if bf16_forwards and fast_bf16(device) else None
    return torch.bfloat16 if choice == "bfloat16" else None


@functools.cache
def bf16_fpmath_stays_fp32_accurate() -> bool:
    """Whether oneDNN's bf16 fpmath mode keeps fp32 accuracy on this CPU, measured once on the products GPTQ uses.

    Measured: yes on AMD Zen 5 (AVX512-BF16, max relative error 8e-7); no on an Intel Xeon with AMX (3.6e-4: the
    mode there really rounds inputs to bf16). Where it does not, products stay plain fp32."""
    backend = getattr(torch.backends.mkldnn, "matmul", None)
    if backend is None or not fast_bf16("cpu"):
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 256, generator=g) * torch.rand(256, generator=g) * 10
    w = torch.randn(192, 256, generator=g)
    previous = backend.fp32_precision
    backend.fp32_precision = "bf16"
    try:
        h = torch.zeros(128, 256).addmm_(x[:, :128].T, x)
        y = torch.nn.functional.linear(x, w)
    finally:
        backend.fp32_precision = previous
    xd = x.double()
    exact_h, exact_y = xd[:, :128].T @ xd, xd @ w.double().T
    error = max(float((h.double() - exact_h).abs().max() / exact_h.abs().max()),
                float((y.double() - exact_y).abs().max() / exact_y.abs().max()))
    return error < 2e-6


@functools.cache
def bf16_fpmath_exact_on_bf16_inputs() -> bool:
    """Whether oneDNN's bf16 fpmath mode keeps fp32 accuracy on inputs that are bf16 values already (it then has
    nothing to round: only the accumulation could lose, and this checks it does not)."""
    backend = getattr(torch.backends.mkldnn, "matmul", None)
    if backend is None or not fast_bf16("cpu"):
        return False
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4096, 256, generator=g) * torch.rand(256, generator=g) * 10).bfloat16().float()
    previous = backend.fp32_precision
    backend.fp32_precision = "bf16"
    try:
        h = torch.zeros(128, 256).addmm_(x[:, :128].T, x)
    finally:
        backend.fp32_precision = previous
    xd = x.double()
    exact = xd[:, :128].T @ xd
    return float((h.double() - exact).abs().max() / exact.abs().max()) < 2e-6


@contextlib.contextmanager
def fast_fp32_products(device: torch.device, bf16_inputs: bool = False):
    """fp32 matrix products through oneDNN with its bf16 fpmath mode allowed, where that was measured to stay
    fp32-accurate (see the module notes and bf16_fpmath_stays_fp32_accurate). bf16_inputs: the caller promises its
    operands hold bf16 values (upcast), for which the mode is exact on more CPUs (bf16_fpmath_exact_on_bf16_inputs)."""
    backend = getattr(torch.backends.mkldnn, "matmul", None)
    accurate = bf16_fpmath_stays_fp32_accurate() or (bf16_inputs and bf16_fpmath_exact_on_bf16_inputs())
    if device.type != "cpu" or backend is None or not accurate:
        yield
        return
    previous = backend.fp32_precision
    backend.fp32_precision = "bf16"
    try:
        yield
    finally:
        backend.fp32_precision = previous


def bf16_attention_kernel_is_faster() -> bool:
    """Whether reduced-precision forwards should run attention in torch's bf16 kernel rather than in fp32: where AMX
    runs it (2.6x fp32 on a Xeon) and fp32 has no fast products. On AMD Zen 5 fp32 with the fast products wins
    (8192-token batches of 4 x 512 x 64 heads: 18.6 ms vs 26.9 ms for the bf16 kernel)."""
    return "amx_bf16" in cpu_flags() and not bf16_fpmath_stays_fp32_accurate()


@contextlib.contextmanager
def fp32_attention():
    """Inside autocast on the CPU: torch.nn.functional.scaled_dot_product_attention in fp32 with oneDNN's fast fp32
    products; the result goes on in fp32. Models that call it through torch.nn.functional (transformers' sdpa path)
    pick it up."""
    with _attention_in(torch.float32):
        yield


@contextlib.contextmanager
def forward_attention():
    """The attention of reduced-precision calibration forwards on the CPU: the faster of the bf16 kernel and fp32
    (bf16_attention_kernel_is_faster). Either way its inputs and output keep about bf16's precision, which the
    projections around it have already."""
    with _attention_in(torch.bfloat16 if bf16_attention_kernel_is_faster() else torch.float32):
        yield


@contextlib.contextmanager
def _attention_in(dtype: torch.dtype):
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, *args, **kwargs):
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(dtype)
        with torch.autocast("cpu", enabled=False), fast_fp32_products(torch.device("cpu")):
            return original(query.to(dtype), key.to(dtype), value.to(dtype), attn_mask, *args, **kwargs)

    functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original
