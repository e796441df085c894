"""QuantLinear: an nn.Linear replacement that keeps its weight quantized and packed for the CPU kernels.

    layer = QuantLinear.from_quantized(quantized_weight, bias)      # backend "ext" when the extension loads
    replace_linears(model, {"model.layers.0.mlp.down_proj.weight": quantized_weight, ...})

Numbers: y = x @ w.T + bias in fp32 with w = (code - zero) * scale formed in fp32 (for fp32 scales exactly
QuantizedWeight.dequantize()), returned in x's dtype. Backends:
  "ext":   the C++ kernels on the packed weight (infopt.runtime.kernels);
  "ext-a8": the same, but int4 weights with linear codes in 128-column groups (or per channel) multiply int8-rounded
           activations through AVX512-VNNI (faster, not exact: each token's 128-column slices are rounded to steps of
           amax / 127); other weights, or a CPU without VNNI, get "ext";
  "torch": plain torch. By default the weight is dequantized to fp32 once at load (4 bytes a weight, fastest
           fallback); lean=True keeps it packed and dequantizes tile by tile on every call instead.
  "triton": on a CUDA device, the Triton int4/int8 kernels (infopt.runtime.kernels.triton_int4) on a GPU layout;
           NF4/FP4 weights get a dense copy on the GPU instead.
A weight the packed layouts cannot hold (irregular act-order groups, group widths the kernels skip) always gets
the dense torch path; `note` says why.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from infopt.errors import InfoptError
from infopt.quant.weights import BlockWeight, FourBitWeight, QuantizedWeight
from infopt.runtime import kernels
from infopt.runtime.kernels import PackedWeight, Unpackable

BACKENDS = ("ext", "ext-a8", "torch", "triton")


class QuantLinear(nn.Module):
    """y = x @ w.T + bias for a quantized w; x of any leading shape [..., in_features]."""

    def __init__(self, in_features: int, out_features: int, backend: str, packed: PackedWeight | None = None,
                 dense: torch.Tensor | None = None, bias: torch.Tensor | None = None, note: str = "",
                 gpu=None) -> None:
        super().__init__()
        if sum(w is not None for w in (packed, dense, gpu)) != 1:
            raise ValueError("QuantLinear needs exactly one of a packed, a GPU-packed or a dense weight")
        self.gpu = gpu
        self.in_features, self.out_features = in_features, out_features
        self.backend = backend
        # Plain attributes, not buffers: Module.to(dtype) must not cast the fp32 scales, tables or bias.
        self.packed = packed
        self.dense = dense
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.note = note

    @classmethod
    def from_quantized(cls, weight: QuantizedWeight | FourBitWeight | BlockWeight, bias: torch.Tensor | None = None,
                       backend: str | None = None, lean: bool = False, device: str = "cuda") -> QuantLinear:
        """Pack `weight` for `backend` ("ext", "torch", or None: "ext" when the extension is available)."""
        if backend not in (None, *BACKENDS):
            raise InfoptError(f"invalid backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        out_f, in_f = weight.shape
        note = ""
        if backend is None:
            backend = "ext" if kernels.available() else "torch"
            note = "" if backend == "ext" else f"extension unavailable: {kernels.reason()}"
        elif backend in ("ext", "ext-a8") and not kernels.available():
            raise InfoptError(f"the infopt kernels are unavailable: {kernels.reason()}")
        elif backend == "triton":
            return cls._for_gpu(weight, bias, device)
        try:
            packed = kernels.pack(weight)
        except Unpackable as exc:
            dense = kernels.dequantize_fp32(weight).contiguous()
            return cls(in_f, out_f, "torch", dense=dense, bias=bias, note=f"not packable: {exc}")
        if backend == "torch" and not lean:
            return cls(in_f, out_f, backend, dense=kernels.dense_weight(packed), bias=bias, note=note)
        if backend == "ext-a8" and not kernels.int8_activation_eligible(packed):
            backend = "ext"
            note = "int8 activations need int codes in groups of whole 128-column units and AVX512-VNNI"
        return cls(in_f, out_f, backend, packed=packed, bias=bias, note=note)

    @classmethod
    def _for_gpu(cls, weight: QuantizedWeight | FourBitWeight | BlockWeight, bias: torch.Tensor | None,
                 device: str) -> QuantLinear:
        from infopt.runtime.kernels import triton_int4

        if not triton_int4.available():
            raise InfoptError(f"the Triton kernels are unavailable: {triton_int4.reason()}")
        out_f, in_f = weight.shape
        bias = None if bias is None else bias.detach().float().to(device)
        try:
            if not isinstance(weight, QuantizedWeight):
                raise ValueError("NF4/FP4 and GGUF block weights have no Triton kernel")
            return cls(in_f, out_f, "triton", bias=bias, gpu=triton_int4.pack(weight, device))
        except ValueError as exc:
            dense = kernels.dequantize_fp32(weight).to(device=device, dtype=torch.float16)
            return cls(in_f, out_f, "triton", dense=dense, bias=bias, note=f"dense on the GPU: {exc}")

    @classmethod
    def concat(cls, parts: list[QuantLinear]) -> QuantLinear | None:
        """One QuantLinear computing the outputs of `parts` (same input) side by side, or None where their weights
        do not concatenate (different backends or layouts, GPU weights). Each output is computed as before."""
        first = parts[0]
        if any(p.backend != first.backend or p.in_features != first.in_features or p.gpu is not None
               or (p.packed is None) != (first.packed is None) for p in parts):
            return None
        bias = concat_bias([p.bias for p in parts], [p.out_features for p in parts])
        out_f = sum(p.out_features for p in parts)
        if first.packed is None:
            dense = torch.cat([p.dense for p in parts]) if len({p.dense.dtype for p in parts}) == 1 else None
            return None if dense is None else cls(first.in_features, out_f, first.backend, dense=dense, bias=bias)
        packed = kernels.concat_rows([p.packed for p in parts])
        note = "; ".join(sorted({p.note for p in parts if p.note}))
        return None if packed is None else cls(first.in_features, out_f, first.backend, packed, bias=bias, note=note)

    @property
    def nbytes(self) -> int:
        """Bytes held for the weight (packed data, scales, zero points; or the dense copy)."""
        if self.gpu is not None:
            return self.gpu.nbytes
        return self.packed.nbytes if self.packed is not None else self.dense.numel() * self.dense.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.gpu is not None:
            from infopt.runtime.kernels import triton_int4

            y = triton_int4.matmul(x2, self.gpu).float()
        elif self.dense is not None:
            y = torch.nn.functional.linear(x2.to(self.dense.dtype), self.dense).float()
        else:
            y = kernels.matmul(x2, self.packed, self.backend)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def kernel_record(self) -> kernels.LinearRecord | None:
        """This product as a record of kernels.decode_step (None where only the Python path computes it)."""
        if self.gpu is not None:
            return None
        if self.dense is not None:
            return [self.dense, None, None, None, None, self.bias], [kernels.LINEAR_FLOAT, 0, 0]
        return kernels.packed_record(self.packed, self.backend, self.bias)

    def extra_repr(self) -> str:
        if self.gpu is not None:
            layout = f"triton int{self.gpu.bits}, group {self.gpu.group_size}"
        else:
            layout = f"{self.packed.kind}, group {self.packed.group_size}" if self.packed is not None else "dense"
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}, {layout}"


def concat_bias(biases: list[torch.Tensor | None], sizes: list[int]) -> torch.Tensor | None:
    """The biases of linears fused side by side (zeros for those without one); None when none has one."""
    if all(b is None for b in biases):
        return None
    like = next(b for b in biases if b is not None)
    return torch.cat([torch.zeros(n, dtype=like.dtype, device=like.device) if b is None else b
                      for b, n in zip(biases, sizes)])


def replace_linears(model: nn.Module, quantized: Mapping[str, QuantizedWeight | FourBitWeight | BlockWeight],
                    backend: str | None = None, lean: bool = False) -> list[str]:
    """Swap each named nn.Linear of `model` for a QuantLinear holding its quantized weight; returns the names.

    Keys are module names, with or without the ".weight" suffix the format readers use. The linear's bias is
    kept (in fp32); its dense weight is dropped.
    """
    replaced = []
    for key, weight in quantized.items():
        name = key.removesuffix(".weight")
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise InfoptError(f"{name}: no such module in the model") from None
        if not isinstance(linear, nn.Linear):
            raise InfoptError(f"{name}: expected an nn.Linear, found {type(linear).__name__}")
        if tuple(weight.shape) != (linear.out_features, linear.in_features):
            raise InfoptError(f"{name}: quantized shape {tuple(weight.shape)} does not match the linear's "
                              f"{(linear.out_features, linear.in_features)}")
        layer = QuantLinear.from_quantized(weight, linear.bias, backend, lean)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        replaced.append(name)
    return replaced
