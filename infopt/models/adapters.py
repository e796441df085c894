"""One table that says, per architecture, where the decoder layers are and which linears they hold.

Linears are listed in true-sequential order (attention inputs, attention output, MLP inputs, MLP
output) so calibrated methods can quantize them in the order activations flow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from infopt.errors import InfoptError


@dataclass(frozen=True)
class ScaleGroup:
    """Linears fed by one preceding op, so a per-channel input scale folds into that op (AWQ)."""

    prev: str  # the norm or linear whose output is the linears' input
    linears: tuple[str, ...]
    inspect: str  # the module whose output measures the effect of quantizing the linears


@dataclass(frozen=True)
class GGUFLayout:
    """How llama.cpp names and lays out the architecture (its convert_hf_to_gguf.py and llama-arch.cpp)."""

    arch: str  # general.architecture
    # per layer: module or tensor (relative to the layer) -> name under blk.N (".weight"/".bias" follow modules)
    names: tuple[tuple[str, str], ...]
    # llama.cpp's llama graph rotates adjacent pairs, Hugging Face's Llama rotates halves: q and k rows are
    # reordered per head on the way into GGUF (convert_hf_to_gguf.py, LlamaModel.permute)
    permute_qk: bool = False


_GGUF_LLAMA_NAMES = (
    ("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"), ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
)
_GGUF_QWEN3_NAMES = _GGUF_LLAMA_NAMES + (("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm"))
# Gemma 2 normalizes after attention and around the MLP (gguf-py's TENSOR_NAMES: post_attention_norm, ffn_norm,
# post_ffw_norm)
_GGUF_GEMMA2_NAMES = tuple(p for p in _GGUF_LLAMA_NAMES if p[0] != "post_attention_layernorm") + (
    ("post_attention_layernorm", "post_attention_norm"), ("pre_feedforward_layernorm", "ffn_norm"),
    ("post_feedforward_layernorm", "post_ffw_norm"))
_GGUF_PHI3_NAMES = (("input_layernorm", "attn_norm"), ("self_attn.qkv_proj", "attn_qkv"),
                    ("self_attn.o_proj", "attn_output"), ("post_attention_layernorm", "ffn_norm"),
                    ("mlp.gate_up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"))


@dataclass(frozen=True)
class Adapter:
    name: str
    layers: str  # dotted path of the decoder-layer list
    linear_groups: tuple[tuple[str, ...], ...]  # per layer, relative names, grouped by shared input
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    scale_groups: tuple[ScaleGroup, ...] = ()
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (offset + weight)
    attention: str = "self_attn"  # the attention module, whose output is its last linear's output
    attention_out: str = "self_attn.o_proj"
    # linears whose inputs cannot take a folded scale, with the reason (reported, never silent)
    unscalable: tuple[tuple[str, str], ...] = ()
    gguf: GGUFLayout | None = None  # None: no GGUF export yet
    # what expected_shapes needs beyond the linears (each a fact of the architecture's transformers modeling file):
    # per-layer norms of hidden_size and of head_dim, and which linears carry a bias: (linears, config flag or
    # None for always)
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    head_norms: tuple[str, ...] = ()
    biases: tuple[tuple[tuple[str, ...], str | None], ...] = ()
    head_dim_default: bool = True  # a config without head_dim means hidden_size / heads (else a class default)
    tied_default: bool = False  # tie_word_embeddings where the config leaves it out

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.linear_groups for name in group)

    def layer_linears(self, num_layers: int) -> list[str]:
        """Full module names of every decoder-layer linear, layer by layer."""
        return [f"{self.layers}.{i}.{name}" for i in range(num_layers) for name in self.linears]

    def layer_index(self, module_name: str) -> int | None:
        match = re.match(rf"{re.escape(self.layers)}\.(\d+)\.", module_name)
        return int(match.group(1)) if match else None


_LLAMA_LIKE = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_PHI3 = (
    ("self_attn.qkv_proj",),
    ("self_attn.o_proj",),
    ("mlp.gate_up_proj",),
    ("mlp.down_proj",),
)

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_SCALES = (
    ScaleGroup("input_layernorm", _QKV, "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
# Gemma 2 normalises the attention output with post_attention_layernorm; the MLP input norm is another
_GEMMA2_SCALES = (_LLAMA_SCALES[0], _LLAMA_SCALES[1],
                  ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"), _LLAMA_SCALES[3])
_PHI3_SCALES = (
    ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
)
_PHI3_FUSED = (("self_attn.o_proj", "fed by the fused qkv_proj"), ("mlp.down_proj", "fed by the fused gate_up_proj"))


def _llama_like(name: str, **extra) -> Adapter:
    return Adapter(name, "model.layers", _LLAMA_LIKE, scale_groups=_LLAMA_SCALES, **extra)


_ATTENTION_BIAS = ((_QKV + ("self_attn.o_proj",), "attention_bias"),)
_MLP_BIAS = (("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), "mlp_bias")

ADAPTERS: dict[str, Adapter] = {
    "llama": _llama_like("llama", gguf=GGUFLayout("llama", _GGUF_LLAMA_NAMES, permute_qk=True),
                         biases=_ATTENTION_BIAS + (_MLP_BIAS,)),
    "mistral": _llama_like("mistral", gguf=GGUFLayout("llama", _GGUF_LLAMA_NAMES, permute_qk=True)),
    "qwen2": _llama_like("qwen2", gguf=GGUFLayout("qwen2", _GGUF_LLAMA_NAMES), biases=((_QKV, None),)),
    "qwen3": _llama_like("qwen3", gguf=GGUFLayout("qwen3", _GGUF_QWEN3_NAMES), biases=_ATTENTION_BIAS,
                         head_norms=("self_attn.q_norm", "self_attn.k_norm"), head_dim_default=False),
    "gemma": _llama_like("gemma", norm_offset=1.0, gguf=GGUFLayout("gemma", _GGUF_LLAMA_NAMES),
                         biases=_ATTENTION_BIAS, head_dim_default=False, tied_default=True),
    "gemma2": Adapter("gemma2", "model.layers", _LLAMA_LIKE, scale_groups=_GEMMA2_SCALES, norm_offset=1.0,
                      gguf=GGUFLayout("gemma2", _GGUF_GEMMA2_NAMES), biases=_ATTENTION_BIAS,
                      layer_norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                                   "post_feedforward_layernorm"), head_dim_default=False, tied_default=True),
    "phi3": Adapter("phi3", "model.layers", _PHI3, scale_groups=_PHI3_SCALES, unscalable=_PHI3_FUSED,
                    gguf=GGUFLayout("phi3", _GGUF_PHI3_NAMES)),
}

# [out, in] of each linear the table names, from the config's sizes: hidden h, intermediate i, heads q, kv heads k,
# head dim d
_LINEAR_SHAPES = {
    "self_attn.q_proj": lambda h, i, q, k, d: (q * d, h), "self_attn.k_proj": lambda h, i, q, k, d: (k * d, h),
    "self_attn.v_proj": lambda h, i, q, k, d: (k * d, h), "self_attn.o_proj": lambda h, i, q, k, d: (h, q * d),
    "self_attn.qkv_proj": lambda h, i, q, k, d: ((q + 2 * k) * d, h),
    "mlp.gate_proj": lambda h, i, q, k, d: (i, h), "mlp.up_proj": lambda h, i, q, k, d: (i, h),
    "mlp.gate_up_proj": lambda h, i, q, k, d: (2 * i, h), "mlp.down_proj": lambda h, i, q, k, d: (h, i),
}
_SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads")


def expected_shapes(config: dict) -> tuple[dict[str, tuple[int, ...]], bool] | None:
    """Every tensor name and shape of the architecture, and whether lm_head is tied to the embedding, from the table
    alone (no transformers import, which costs seconds). None where the table cannot say for sure: a config without
    the explicit sizes, a nested (multimodal) one, a bias flag left to a class default. tests/test_adapters.py checks
    it against transformers' own model for every architecture here."""
    adapter = ADAPTERS.get(config.get("model_type"))
    if adapter is None or "text_config" in config or not all(_size(config.get(key)) for key in _SIZE_KEYS):
        return None
    tied = config.get("tie_word_embeddings", adapter.tied_default)
    flags = [flag for _, flag in adapter.biases if flag]
    if not isinstance(tied, bool) or not all(isinstance(config.get(flag, False), bool) for flag in flags):
        return None
    h, i, q, k = (config[key] for key in ("hidden_size", "intermediate_size", "num_attention_heads",
                                          "num_key_value_heads"))
    d = config.get("head_dim")
    if d is None:
        if not adapter.head_dim_default or h % q:
            return None
        d = h // q
    if not _size(d):
        return None
    layer: dict[str, tuple[int, ...]] = {}
    for name in adapter.linears:
        layer[f"{name}.weight"] = _LINEAR_SHAPES[name](h, i, q, k, d)
    for linears, flag in adapter.biases:
        if flag is None or config.get(flag, False):  # every flag here defaults to no bias
            layer.update({f"{name}.bias": layer[f"{name}.weight"][:1] for name in linears})
    layer.update({f"{name}.weight": (h,) for name in adapter.layer_norms})
    layer.update({f"{name}.weight": (d,) for name in adapter.head_norms})
    shapes = {f"{adapter.embed}.weight": (config["vocab_size"], h), f"{adapter.final_norm}.weight": (h,),
              f"{adapter.lm_head}.weight": (config["vocab_size"], h)}
    for index in range(config["num_hidden_layers"]):
        shapes.update({f"{adapter.layers}.{index}.{name}": shape for name, shape in layer.items()})
    return shapes, tied


def _size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def supported_architectures() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(config: dict) -> Adapter:
    """The adapter for a config.json dict; a clear error naming the supported ones otherwise."""
    model_type = config.get("model_type")
    if model_type not in ADAPTERS:
        archs = ", ".join(config.get("architectures") or []) or "unknown"
        raise InfoptError(
            f"unsupported architecture {model_type!r} ({archs}); supported: "
            + ", ".join(supported_architectures())
        )
    return ADAPTERS[model_type]
