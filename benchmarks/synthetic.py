"""Synthetic Llama checkpoints with random weights, written layer by layer (never whole in memory).

Used where a benchmark needs realistic shapes but not a trained model: memory scaling and decode
speed. The tokenizer is stories260K's (vocab 512), so calibration text can be tokenized.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from infopt.formats.safetensors_io import ShardedWriter
from infopt.models import llama2c
from infopt.paths import atomic_output_dir, require_data_file


def llama_config(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int = 512,
                 context: int = 2048) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": context,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
            "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}


def _layer_tensors(config: dict, index: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    out = {f"model.layers.{index}.{name}.weight": torch.randn(*shape, generator=gen) / shape[1] ** 0.5
           for name, shape in shapes.items()}
    out[f"model.layers.{index}.input_layernorm.weight"] = torch.ones(h)
    out[f"model.layers.{index}.post_attention_layernorm.weight"] = torch.ones(h)
    return out


def make_synthetic_llama(out: Path, config: dict, seed: int = 0, max_shard_bytes: int = 2 * 10**9) -> Path:
    """Write a random Llama to `out` (reused when it already exists)."""
    if (out / "config.json").is_file():
        return out
    gen = torch.Generator().manual_seed(seed)
    with atomic_output_dir(out) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        h, v = config["hidden_size"], config["vocab_size"]
        writer.add("model.embed_tokens.weight", torch.randn(v, h, generator=gen) * 0.02)
        for index in range(config["num_hidden_layers"]):
            for name, tensor in _layer_tensors(config, index, gen).items():
                writer.add(name, tensor)
        writer.add("model.norm.weight", torch.ones(h))
        writer.add("lm_head.weight", torch.randn(v, h, generator=gen) / h**0.5)
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer = require_data_file("tinyllamas-stories260K/tok512.model")
        llama2c.write_tokenizer(tokenizer, tmp, config["max_position_embeddings"])
    return out


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
