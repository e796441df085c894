"""A compact decoder for the Llama family (Llama, Mistral, Qwen2, Qwen3) that reads and writes a paged KV cache.

    model = load_engine_model(model_dir, dtype)             # dense or any quantized format infopt reads
    logits = model(tokens, layout, cache)                   # tokens of many sequences, flattened

Quantized linears stay packed (`QuantLinear`); everything else is plain torch in `dtype`. The numerics follow
transformers' modules for these architectures (RMSNorm in fp32, rotary tables in fp32 cast to the activation
dtype), so fp32 logits agree with transformers to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from infopt.errors import InfoptError
from infopt.models.loading import ModelDir, hf_config_from_dict, load_state_dict, text_config
from infopt.runtime import kernels
from infopt.runtime.attention import BatchLayout, attend
from infopt.runtime.kv_cache import KVCache

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_eps: float
    qk_norm: bool  # Qwen3 normalises each query and key head before the rotation
    sliding_window: int | None
    max_positions: int

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        cfg = text_config(config)
        heads = cfg["num_attention_heads"]
        window = cfg.get("sliding_window")
        if cfg.get("model_type") in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            window = None
        return cls(cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], heads,
                   cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   cfg["intermediate_size"], cfg.get("rms_norm_eps", 1e-6), cfg.get("model_type") == "qwen3",
                   window, cfg.get("max_position_embeddings", 2048))


def unsupported_reason(config: dict) -> str | None:
    """Why the compact model cannot run this config (None when it can)."""
    cfg = text_config(config)
    if cfg.get("model_type") not in ARCHITECTURES:
        return f"architecture {cfg.get('model_type')!r} (the compact runtime covers {', '.join(ARCHITECTURES)})"
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        return f"rope type {rope.get('rope_type')!r} (supported: {', '.join(ROPE_TYPES)})"
    if cfg.get("hidden_act", "silu") != "silu":
        return f"activation {cfg.get('hidden_act')!r}"
    return None


def rope_parameters(config: dict) -> dict:
    """The rope settings as transformers normalises them (rope_theta folded in; old rope_scaling read too)."""
    hf = hf_config_from_dict(text_config(config))
    params = dict(getattr(hf, "rope_parameters", None) or {})
    params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rope_frequencies(params: dict, head_dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the attention scaling factor for a rope configuration."""
    base = float(params["rope_theta"])
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = params.get("rope_type", "default")
    if kind == "linear":  # position interpolation: positions divided by the factor
        return inv_freq / params["factor"], 1.0
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, params), 1.0
    if kind == "yarn":
        return _yarn_frequencies(params, dim, base, max_positions)
    return inv_freq, 1.0


def _llama3_frequencies(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    # Llama 3.1's scaling (Meta's reference implementation): long wavelengths divided by `factor`, short ones kept,
    # a smooth blend between the low- and high-frequency cut-offs.
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_context = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, blended, scaled)


def _yarn_frequencies(p: dict, dim: int, base: float, max_positions: int) -> tuple[torch.Tensor, float]:
    # YaRN (Peng et al. 2023, eqs. 17-23): blend interpolated and extrapolated frequencies by rotation count,
    # and scale attention by 0.1 ln(s) + 1.
    factor = p["factor"]
    old_context = p.get("original_max_position_embeddings") or max_positions
    mscale = p.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    interpolation = extrapolation / factor
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, mscale


class Rotary:
    """cos/sin tables (fp32, grown on demand) applied as transformers' rotate-half convention."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float) -> None:
        self.inv_freq, self.scaling = inv_freq, scaling
        self.cos = self.sin = torch.empty(0)
        self.device = torch.device("cpu")

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin [tokens, 1, rotary_dim] for apply_rotary: the sin of the first half negated."""
        self.cover(int(positions.max()) + 1 if positions.numel() else 0)
        return self.cos[positions].to(dtype).unsqueeze(1), self.sin[positions].to(dtype).unsqueeze(1)

    def cover(self, needed: int) -> None:
        """Grow the fp32 tables (self.cos, self.sin: [positions, rotary_dim]) to at least `needed` positions."""
        if needed > self.cos.shape[0]:
            length = max(needed, 2 * self.cos.shape[0], 256)
            angles = torch.outer(torch.arange(length, dtype=torch.float32), self.inv_freq)
            sin = angles.sin() * self.scaling
            self.cos = (torch.cat([angles, angles], dim=-1).cos() * self.scaling).to(self.device)
            self.sin = torch.cat([-sin, sin], dim=-1).to(self.device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [tokens, heads, head_dim]; cos / signed_sin [tokens, 1, rotary_dim] from Rotary.tables.

    rotate_half(r) * sin with rotate_half(r) = (-r2, r1) equals (r2, r1) * (-sin1, sin2): swapping the halves is
    one flip of a [2, half] view, and negating a factor is exact, so the numbers are transformers' to the bit.
    """
    dim = cos.shape[-1]
    rot = x[..., :dim]
    swapped = rot.unflatten(-1, (2, dim // 2)).flip(-2).flatten(-2)
    out = rot * cos + swapped * signed_sin
    return torch.cat([out, x[..., dim:]], dim=-1) if dim < x.shape[-1] else out


# Most new tokens of one sequence in a step that attention computes with kernels.paged_attention (decode steps,
# speculative checks, short prompts); longer prompts go to SDPA's kernels.
FUSED_ATTENTION_TOKENS = 16
# Most rows the modules hand to the fused elementwise ops (one thread each); larger steps (prefill) keep torch's
# vectorized, multi-threaded ops.
FUSED_OPS_TOKENS = 64


class RMSNorm(nn.Module):
    """With `fused_ops`, one C++ op (kernels.rms_norm) instead of the eight aten calls of the torch form."""

    def __init__(self, weight: torch.Tensor, eps: float, fused_ops: bool = False) -> None:
        super().__init__()
        self.weight, self.eps, self.fused_ops = weight, eps, fused_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_ops and x.shape[0] <= FUSED_OPS_TOKENS:
            return kernels.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class DenseLinear(nn.Module):
    """y = x @ weight.T + bias. With use_kernel, decode-sized inputs on the CPU go through the C++ dense kernel
    (torch's fp32 GEMM here runs 2-8 token products at a fraction of its 1-token speed, which would make checking
    a speculative draft cost several decode steps); prefill stays with torch."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, use_kernel: bool = False) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias
        self.use_kernel = use_kernel
        # most input elements the kernel takes (0: never); use_kernel is only set for CPU weights, which stay there
        self.kernel_elements = kernels.dense_kernel_tokens(weight) * weight.shape[1] if use_kernel else 0

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def kernel_record(self) -> kernels.LinearRecord | None:
        """This product as a record of kernels.decode_step: the kernel up to the tokens forward() gives it."""
        if self.weight.device.type != "cpu":
            return None
        tokens = self.kernel_elements // self.weight.shape[1]
        return [self.weight, None, None, None, None, self.bias], [kernels.LINEAR_DENSE, tokens, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.kernel_elements:
            flat = x.dim() == 2  # the runtime's own inputs: no reshapes (each is a Python-level call per token)
            y = kernels.dense_matmul(x if flat else x.reshape(-1, self.weight.shape[1]), self.weight)
            if self.bias is not None:
                y = y + self.bias
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
            return y if flat else y.reshape(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)


def fuse_linears(parts: list[nn.Module]) -> nn.Module | None:
    """One linear computing `parts` side by side (they read the same input), or None where they do not concatenate.

    Decode steps then make one kernel call (and one pass over the input) instead of several; every output row is
    computed exactly as before by the decode kernels.
    """
    from infopt.runtime.qlinear import QuantLinear, concat_bias

    if all(isinstance(p, QuantLinear) for p in parts):
        return QuantLinear.concat(parts)
    if not all(isinstance(p, DenseLinear) for p in parts):
        return None
    weights = [p.weight for p in parts]
    if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
        return None
    bias = concat_bias([p.bias for p in parts], [p.out_features for p in parts])
    return DenseLinear(torch.cat(weights), bias, parts[0].use_kernel)


class Projections(nn.Module):
    """Linears reading the same input (q/k/v, gate/up): one fused product where their weights concatenate."""

    def __init__(self, parts: list[nn.Module], fuse: bool = True) -> None:
        super().__init__()
        self.sizes = [p.out_features for p in parts]
        self.fused = fuse_linears(parts) if fuse and len(parts) > 1 else None
        self.parts = nn.ModuleList([] if self.fused is not None else parts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.fused is not None:
            return self.fused(x).split_with_sizes(self.sizes, dim=-1)
        return tuple(p(x) for p in self.parts)


def _record(module: nn.Module):
    return getattr(module, "kernel_record", lambda: None)()


def _records(projections: Projections) -> list:
    """decode_step's records of q/k/v or gate/up: the fused product's and empty slots, or each projection's."""
    from infopt.runtime.kernels import NO_PRODUCT

    if projections.fused is not None:
        return [_record(projections.fused)] + [NO_PRODUCT] * (len(projections.sizes) - 1)
    return [_record(p) for p in projections.parts]


class Attention(nn.Module):
    """With `fused_ops`, rotary + KV write is one C++ op, and small steps attend over the cache blocks in place
    (kernels.paged_attention) instead of gathering them for SDPA."""

    def __init__(self, shape: ModelShape, layer: int, linears: dict[str, nn.Module], norms: dict[str, RMSNorm],
                 fuse: bool = True, fused_ops: bool = False) -> None:
        super().__init__()
        self.shape, self.layer, self.fused_ops = shape, layer, fused_ops
        self.qkv = Projections([linears[n] for n in ("q_proj", "k_proj", "v_proj")], fuse)
        self.o_proj = linears["o_proj"]
        self.q_norm, self.k_norm = norms.get("q_norm"), norms.get("k_norm")

    def forward(self, x: torch.Tensor, layout: BatchLayout, cache: KVCache,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        s = self.shape
        q, k, v = self.qkv(x)
        q = q.reshape(-1, s.num_heads, s.head_dim)
        k = k.reshape(-1, s.num_kv_heads, s.head_dim)
        v = v.reshape(-1, s.num_kv_heads, s.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        scale = s.head_dim ** -0.5
        keys, values = cache.keys[self.layer], cache.values[self.layer]
        if self.fused_ops and keys.dtype == q.dtype and q.shape[0] <= FUSED_OPS_TOKENS:
            kernels.rotary_kv_write(q, k, v, cos, sin, keys, values, layout.slots)
            if max(layout.new) <= FUSED_ATTENTION_TOKENS:
                tables, owners = layout.token_tables(q.device)
                out = kernels.paged_attention(q, keys, values, tables, owners, layout.positions, scale,
                                              s.sliding_window)
                return self.o_proj(out.reshape(-1, s.num_heads * s.head_dim))
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            cache.write(self.layer, layout.slots, k, v)
        out = attend(q, k, v, layout, cache, self.layer, scale, s.sliding_window)
        return self.o_proj(out.reshape(-1, s.num_heads * s.head_dim))


class MLP(nn.Module):
    def __init__(self, linears: dict[str, nn.Module], fuse: bool = True, fused_ops: bool = False) -> None:
        super().__init__()
        self.gate_up = Projections([linears["gate_proj"], linears["up_proj"]], fuse)
        self.down_proj = linears["down_proj"]
        self.fused_ops = fused_ops  # silu(gate) * up as one C++ op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        if self.fused_ops and gate.dim() == 2 and gate.shape[0] <= FUSED_OPS_TOKENS:
            return self.down_proj(kernels.silu_mul(gate, up))
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, attn: Attention, mlp: MLP, input_norm: RMSNorm, post_norm: RMSNorm) -> None:
        super().__init__()
        self.self_attn, self.mlp = attn, mlp
        self.input_layernorm, self.post_attention_layernorm = input_norm, post_norm

    def forward(self, x: torch.Tensor, layout: BatchLayout, cache: KVCache,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The layer's output; with fused norms x (the model's own residual stream) is updated in place."""
        attn = self.self_attn(self.input_layernorm(x), layout, cache, rope)
        if self.post_attention_layernorm.fused_ops and x.shape[0] <= FUSED_OPS_TOKENS:
            h = kernels.add_rms_norm(x, attn, self.post_attention_layernorm.weight, self.post_attention_layernorm.eps)
            return x.add_(self.mlp(h))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class EngineModel(nn.Module):
    """The decoder: embeddings, layers, final norm, lm_head. Inputs are flat token lists plus a BatchLayout."""

    def __init__(self, shape: ModelShape, embed: torch.Tensor, layers: list[DecoderLayer], norm: RMSNorm,
                 lm_head: nn.Module, rotary: Rotary, dtype: torch.dtype) -> None:
        super().__init__()
        self.shape, self.embed, self.norm, self.lm_head, self.rotary = shape, embed, norm, lm_head, rotary
        self.layers = nn.ModuleList(layers)
        self.dtype = dtype
        self.notes: list[str] = []
        self.plan = self.decode_plan()

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def decode_plan(self) -> tuple[list, list[int]] | None:
        """The model as kernels.decode_step takes it, or None where a layer has no fused form (fused ops off, a
        product only the Python path computes). q/k/v and gate/up are one record each with empty slots beside it
        where they are one fused product, else one record per projection."""
        head = getattr(self.lm_head, "kernel_record", lambda: None)()
        if head is None or not self.norm.fused_ops:
            return None
        tensors, ints = [], []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if not (attn.fused_ops and mlp.fused_ops and layer.post_attention_layernorm.fused_ops):
                return None
            if len(attn.qkv.sizes) != 3 or len(mlp.gate_up.sizes) != 2 or len(set(mlp.gate_up.sizes)) != 1:
                return None
            records = [*_records(attn.qkv), _record(attn.o_proj), *_records(mlp.gate_up), _record(mlp.down_proj)]
            if any(r is None for r in records):
                return None
            norms = (layer.input_layernorm, layer.post_attention_layernorm, attn.q_norm, attn.k_norm)
            tensors += [None if n is None else n.weight for n in norms]
            for layer_tensors, layer_ints in records:
                tensors += layer_tensors
                ints += layer_ints
        return tensors + [self.norm.weight] + head[0], ints + head[1]

    def to_device(self, device: str | torch.device) -> EngineModel:
        """Move every dense tensor to `device` (tensors shared between modules stay shared)."""
        moved: dict[int, torch.Tensor] = {}

        def move(t: torch.Tensor) -> torch.Tensor:
            return moved.setdefault(id(t), t.to(device))

        self.embed = move(self.embed)
        for module in self.modules():
            for name in ("weight", "bias"):
                tensor = module.__dict__.get(name)
                if isinstance(tensor, torch.Tensor):
                    module.__dict__[name] = move(tensor)
        if torch.device(device).type != "cpu":  # the fused ops are CPU kernels
            for module in self.modules():
                if hasattr(module, "fused_ops"):
                    module.fused_ops = False
            self.plan = None
        self.rotary.device = torch.device(device)
        self.rotary.cos = self.rotary.sin = torch.empty(0)
        return self

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, layout: BatchLayout, cache: KVCache) -> torch.Tensor:
        """Logits (fp32, on the CPU, where sampling happens) at layout.logit_rows of the flat token list."""
        if self.device.type != "cpu":
            tokens, layout = tokens.to(self.device), layout.to(self.device)
        x = F.embedding(tokens, self.embed)
        if (self.plan is not None and max(layout.new) <= FUSED_ATTENTION_TOKENS and cache.dtype == x.dtype
                and len(tokens) <= kernels.MAX_KERNEL_TOKENS):
            s, rotary = self.shape, self.rotary
            rotary.cover(max(start + n for start, n in zip(layout.starts, layout.new)))
            tables, owners = layout.token_tables(x.device)
            return kernels.decode_step(x, self.plan, cache.keys, cache.values, rotary.cos, rotary.sin, layout.slots,
                                       tables, owners, layout.positions, layout.logit_rows, s.num_heads,
                                       s.num_kv_heads, s.head_dim, s.rms_eps, s.head_dim ** -0.5, s.sliding_window)
        rope = self.rotary.tables(layout.positions, x.dtype)  # the same for every layer
        for layer in self.layers:
            x = layer(x, layout, cache, rope)
        x = x if layout.logit_rows is None else x[layout.logit_rows]
        return self.lm_head(self.norm(x)).float().cpu()

    @property
    def weight_bytes(self) -> int:
        """Bytes of every weight the model holds (packed weights counted packed)."""
        from infopt.runtime.qlinear import QuantLinear

        total = self.embed.numel() * self.embed.element_size()
        seen = {id(self.embed)}
        for module in self.modules():
            if isinstance(module, QuantLinear):
                total += module.nbytes
            for tensor in (getattr(module, "weight", None), getattr(module, "bias", None)):
                if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
                    seen.add(id(tensor))
                    total += tensor.numel() * tensor.element_size()
        return total


def _linear(name: str, state: dict[str, torch.Tensor], quantized: dict, dtype: torch.dtype,
            backend: str | None, device: str = "cpu") -> nn.Module:
    from infopt.runtime.qlinear import QuantLinear

    bias = state.pop(f"{name}.bias", None)
    if f"{name}.weight" in quantized:
        return QuantLinear.from_quantized(quantized.pop(f"{name}.weight"), bias, backend, device=device)
    if f"{name}.weight" not in state:
        raise InfoptError(f"checkpoint lacks {name}.weight")
    weight = state.pop(f"{name}.weight").to(dtype).contiguous()
    return DenseLinear(weight, None if bias is None else bias.to(dtype), _dense_kernels(backend, device))


def _dense_kernels(backend: str | None, device: str) -> bool:
    """Whether dense linears use the C++ kernel: on the CPU with backend "ext" / "ext-a8", or None when it loads."""
    return device == "cpu" and backend in (None, "ext", "ext-a8") and kernels.available()


def build_engine_model(config: dict, state: dict[str, torch.Tensor], quantized: dict,
                       dtype: torch.dtype = torch.float32, backend: str | None = None,
                       device: str = "cpu", fuse: bool = True, fused_ops: bool = True) -> EngineModel:
    """The compact model from a config dict, dense tensors and quantized weights (both consumed).

    On a CUDA device quantized weights use the Triton kernels (backend "triton") and dense ones move there.
    With `fuse`, q/k/v and gate/up are concatenated into one product each where their layouts allow. With
    `fused_ops` (on the CPU, where the C++ kernels are in use) RMSNorm, the residual add, rotary + KV write, small
    steps' attention and silu * up run as single C++ ops (decode_ops.cpp) instead of plain torch.
    """
    if device != "cpu":
        backend = "triton"
    reason = unsupported_reason(config)
    if reason:
        raise InfoptError(f"the infopt runtime does not support {reason}")
    shape = ModelShape.from_config(config)
    prefix = "model.language_model." if "model.language_model.embed_tokens.weight" in state else "model."

    fused_ops = fused_ops and _dense_kernels(backend, device)

    def norm(name: str) -> RMSNorm:
        return RMSNorm(state.pop(name).to(dtype).contiguous(), shape.rms_eps, fused_ops)

    layers = []
    for i in range(shape.num_layers):
        p = f"{prefix}layers.{i}."
        lin = {n: _linear(p + f"self_attn.{n}", state, quantized, dtype, backend, device)
               for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        lin |= {n: _linear(p + f"mlp.{n}", state, quantized, dtype, backend, device)
                for n in ("gate_proj", "up_proj", "down_proj")}
        qk = {n: norm(p + f"self_attn.{n}.weight") for n in ("q_norm", "k_norm")} if shape.qk_norm else {}
        attn = Attention(shape, i, lin, qk, fuse, fused_ops)
        layers.append(DecoderLayer(attn, MLP(lin, fuse, fused_ops), norm(p + "input_layernorm.weight"),
                                   norm(p + "post_attention_layernorm.weight")))
    embed = state.pop(f"{prefix}embed_tokens.weight").to(dtype)
    if "lm_head.weight" in state or "lm_head.weight" in quantized:
        lm_head = _linear("lm_head", state, quantized, dtype, backend, device)
    else:  # tied embeddings
        lm_head = DenseLinear(embed, None, _dense_kernels(backend, device))
    rope = rope_parameters(config)
    rotary = Rotary(*rope_frequencies(rope, shape.head_dim, shape.max_positions))
    model = EngineModel(shape, embed, layers, norm(f"{prefix}norm.weight"), lm_head, rotary, dtype)
    return model.to_device(device) if device != "cpu" else model


def load_engine_model(model_dir: ModelDir, dtype: torch.dtype = torch.float32, backend: str | None = None,
                      device: str = "cpu", fuse: bool = True, fused_ops: bool = True) -> EngineModel:
    """The compact model for a checkpoint folder; quantized weights stay packed (see build_engine_model)."""
    reason = unsupported_reason(model_dir.config)
    if reason:
        raise InfoptError(f"the infopt runtime does not support {reason}")
    if model_dir.quant_method is None:
        state, quantized = load_state_dict(model_dir), {}
    else:
        from infopt.formats.registry import read_quantized

        quantized, state = read_quantized(model_dir.files, model_dir.config)
        quantized = dict(quantized)
    return build_engine_model(model_dir.config, dict(state), quantized, dtype, backend, device, fuse, fused_ops)
