"""Parameter counts and memory arithmetic from config.json alone (no weights read).

Per-format overheads (facts of each format):
- int8: per-output-channel fp16 scale.
- int4 g128: fp16 scale and a 4-bit zero point per group of 128 inputs (GPTQ/AWQ/compressed-tensors).
- NF4 (bitsandbytes): one fp32 absmax per block of 64; with double quantization an 8-bit absmax per
  block plus one fp32 scale and offset per 256 blocks.
Embeddings, norms and lm_head stay in 16-bit in every quantized variant, as the tools ship them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Linear:
    name: str
    out_features: int
    in_features: int
    count: int  # how many such linears in the whole model


@dataclass
class ModelShape:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    max_positions: int | None
    linears: list[Linear] = field(default_factory=list)
    other_params: int = 0  # norms, biases, routers: kept in 16-bit

    @property
    def linear_params(self) -> int:
        return sum(l.out_features * l.in_features * l.count for l in self.linears)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def total_params(self) -> int:
        return self.linear_params + self.embedding_params + self.other_params


def _get(cfg: dict, *names, default=None):
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def _with_defaults(config: dict) -> dict:
    """Fill keys the file leaves to transformers' class defaults (tie_word_embeddings, head_dim...)."""
    try:
        from transformers import AutoConfig

        cfg = {k: v for k, v in config.items() if k != "model_type"}
        filled = AutoConfig.for_model(config["model_type"], **cfg).to_dict()
        return {**filled, **config}
    except Exception:  # unknown to this transformers: use the file as it is
        return config


def model_shape(config: dict) -> ModelShape:
    cfg = config.get("text_config") or config
    if "model_type" in cfg:
        cfg = _with_defaults(cfg)
    hidden = int(_get(cfg, "hidden_size", "n_embd", "d_model"))
    layers = int(_get(cfg, "num_hidden_layers", "n_layer", "num_layers"))
    heads = int(_get(cfg, "num_attention_heads", "n_head"))
    kv_heads = int(_get(cfg, "num_key_value_heads", default=heads) or heads)
    head_dim = int(_get(cfg, "head_dim", default=hidden // heads) or hidden // heads)
    inter = int(_get(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden) or 4 * hidden)
    vocab = int(cfg["vocab_size"])
    tied = bool(_get(cfg, "tie_word_embeddings", default=False))
    model_type = str(cfg.get("model_type", "unknown"))
    shape = ModelShape(model_type, hidden, layers, heads, kv_heads, head_dim, vocab, tied,
                       _get(cfg, "max_position_embeddings", "n_positions"))
    q, kv = heads * head_dim, kv_heads * head_dim
    shape.linears += [Linear("q_proj", q, hidden, layers), Linear("k_proj", kv, hidden, layers),
                      Linear("v_proj", kv, hidden, layers), Linear("o_proj", hidden, q, layers)]
    experts = int(_get(cfg, "num_local_experts", "num_experts", default=0) or 0)
    expert_inter = int(_get(cfg, "moe_intermediate_size", default=inter) or inter)
    if experts:
        n = layers * experts
        shape.linears += [Linear("expert gate_proj", expert_inter, hidden, n), Linear("expert up_proj", expert_inter, hidden, n),
                          Linear("expert down_proj", hidden, expert_inter, n)]
        shape.other_params += layers * experts * hidden  # router
    else:
        shape.linears += [Linear("gate_proj", inter, hidden, layers), Linear("up_proj", inter, hidden, layers),
                          Linear("down_proj", hidden, inter, layers)]
    norms_per_layer = 4 if model_type.startswith("gemma2") or model_type.startswith("gemma3") else 2
    shape.other_params += layers * norms_per_layer * hidden + hidden
    if model_type in ("qwen3", "qwen3_moe", "gemma3_text", "olmo2"):
        shape.other_params += layers * 2 * head_dim  # q_norm / k_norm
    if model_type == "qwen2" or cfg.get("attention_bias"):
        shape.other_params += layers * (q + 2 * kv + (hidden if cfg.get("attention_bias") and model_type != "qwen2" else 0))
    if cfg.get("mlp_bias"):
        shape.other_params += layers * (2 * inter + hidden)
    return shape


def weight_bytes(shape: ModelShape) -> dict[str, int]:
    """Bytes of weights on disk / in memory for each storage scheme."""
    rest = (shape.embedding_params + shape.other_params) * 2
    linears = shape.linears

    def per_linear(fn) -> int:
        return sum(fn(l.out_features, l.in_features) * l.count for l in linears)

    def nf4(out_f: int, in_f: int, double: bool) -> int:
        numel = out_f * in_f
        blocks = math.ceil(numel / 64)
        absmax = blocks + 8 * math.ceil(blocks / 256) if double else blocks * 4
        return math.ceil(numel / 2) + absmax

    return {
        "fp32": shape.total_params * 4,
        "fp16/bf16": shape.total_params * 2,
        "int8": rest + per_linear(lambda o, i: o * i + o * 2),
        "int4-g128": rest + per_linear(lambda o, i: math.ceil(o * i / 2) + o * math.ceil(i / 128) * 2
                                       + math.ceil(o / 2) * math.ceil(i / 128)),
        "nf4": rest + per_linear(lambda o, i: nf4(o, i, False)),
        "nf4-double-quant": rest + per_linear(lambda o, i: nf4(o, i, True)),
    }


def kv_cache_bytes_per_token(shape: ModelShape, bytes_per_element: int = 2) -> int:
    """Keys and values of every layer for one token (16-bit by default)."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * bytes_per_element


def footprint(config: dict, context: int | None = None, batch: int = 1) -> dict:
    shape = model_shape(config)
    context = context or shape.max_positions or 2048
    per_token = kv_cache_bytes_per_token(shape)
    return {
        "model_type": shape.model_type,
        "parameters": shape.total_params,
        "layers": shape.layers,
        "attention_heads": shape.heads,
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "weight_bytes": weight_bytes(shape),
        "kv_cache": {
            "dtype": "fp16",
            "bytes_per_token": per_token,
            "context": context,
            "batch": batch,
            "bytes": per_token * context * batch,
        },
        "quantization_config": config.get("quantization_config"),
    }


# Accelerators by memory as sold (vendors' datasheets; "80 GB" parts hold 80 GiB of HBM).
ACCELERATORS: dict[str, float] = {
    "T4 16GB": 16, "V100 32GB": 32, "A10G 24GB": 24, "L4 24GB": 24, "RTX 3090 24GB": 24, "RTX 4090 24GB": 24,
    "RTX 5090 32GB": 32, "L40S 48GB": 48, "RTX 6000 Ada 48GB": 48, "A100 40GB": 40, "A100 80GB": 80,
    "H100 80GB": 80, "H200 141GB": 141, "B200 192GB": 192, "MI300X 192GB": 192,
}
# The share of each GPU the weights and the KV cache may use: vLLM's default gpu_memory_utilization (EngineArgs,
# 0.9); the rest covers the CUDA context, activations and allocator fragmentation.
UTILIZATION = 0.9
GPU_COUNTS = (1, 2, 4, 8)  # tensor-parallel sizes within one node


def capacity(report: dict, gpus: dict[str, float] | None = None, utilization: float = UTILIZATION) -> list[dict]:
    """For every storage and accelerator: the fewest GPUs (1, 2, 4 or 8) whose usable memory holds the weights and
    one full sequence of KV cache (`report`'s context), and how many KV tokens then fit beside the weights."""
    per_token = report["kv_cache"]["bytes_per_token"]
    context = report["kv_cache"]["context"]
    rows = []
    for storage, weight in report["weight_bytes"].items():
        for gpu, gib in (gpus or ACCELERATORS).items():
            memory = int(gib * 2**30)
            need = next((n for n in GPU_COUNTS if weight + per_token * context <= n * memory * utilization), None)
            free = (need * memory * utilization - weight) if need else 0
            rows.append({"storage": storage, "gpu": gpu, "gpu_memory_bytes": memory, "fits": need is not None,
                         "gpus_needed": need, "max_kv_tokens": int(free // per_token) if need else 0,
                         "max_batch_at_context": int(free // (per_token * context)) if need else 0})
    return rows
