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


def cast_copy(source: Path, out: Path, dtype: torch.dtype, max_shard_bytes: int = 2 * 10**9) -> Path:
    """A copy of a model folder with every floating tensor cast to `dtype` (reused when it exists): the 16-bit
    checkpoint a model is usually published as."""
    from infopt.formats.safetensors_io import iter_tensors

    if (out / "config.json").is_file():
        return out
    with atomic_output_dir(out) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        for name, tensor in iter_tensors(sorted(source.glob("*.safetensors"))):
            writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
        writer.close()
        config = json.loads((source / "config.json").read_text())
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for extra in source.iterdir():
            if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in ("config.json",) \
                    and not extra.name.endswith(".index.json"):
                shutil.copy2(extra, tmp / extra.name)
    return out


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def widen_llama(source: Path, out: Path, factor: int) -> Path:
    """A `factor`-times wider copy of a trained Llama that computes the same function (reused when it exists).

    Function-preserving widening in the manner of Net2WiderNet (Chen, Goodfellow & Shlens 2016): every hidden
    unit, intermediate unit, query head and key/value head is repeated `factor` times, and each weight that reads
    the repeated units is divided by `factor` (exact in binary floating point for a power of two). Copies are
    interleaved (new unit c is old unit c mod width), so each run of old-width columns is the old matrix: groups of
    128 columns hold the same values as the original's groups, and RMSNorm sees the same mean square. Query head
    i copies old head i mod heads and uses key/value head i // (heads / kv_heads) with the same group size, which
    copies the old key/value head that old query head used. The result decodes like the trained model at the
    memory cost of a model factor^2 times larger: a realistic target for speculative decoding benchmarks.
    """
    if (out / "config.json").is_file():
        return out
    from infopt.models.loading import load_state_dict, open_model

    model_dir = open_model(str(source))
    config = dict(model_dir.config)
    state = load_state_dict(model_dir)
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or h // heads

    def units(width: int) -> torch.Tensor:  # new index -> old index, interleaved copies
        return torch.arange(width * factor) % width

    def head_units(count: int) -> torch.Tensor:  # new head-dim rows -> old rows, whole heads copied
        old_head = torch.arange(count * factor) % count
        return (old_head[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)

    hidden, mlp, q_rows, kv_rows = units(h), units(inter), head_units(heads), head_units(kv_heads)
    reads = {"q_proj": (q_rows, hidden), "k_proj": (kv_rows, hidden), "v_proj": (kv_rows, hidden),
             "o_proj": (hidden, q_rows), "gate_proj": (mlp, hidden), "up_proj": (mlp, hidden),
             "down_proj": (hidden, mlp)}

    def widen(name: str, tensor: torch.Tensor) -> torch.Tensor:
        kind = name.split(".")[-2]
        if name.endswith("norm.weight"):
            return tensor[hidden].contiguous()
        if kind == "embed_tokens":
            return tensor[:, hidden].contiguous()
        if kind == "lm_head":
            return (tensor[:, hidden] / factor).contiguous()
        rows, cols = reads[kind]
        return (tensor[rows][:, cols] / factor).contiguous()

    with atomic_output_dir(out) as tmp:
        writer = ShardedWriter(tmp, 2 * 10**9)
        for name in sorted(state):
            writer.add(name, widen(name, state[name]))
        writer.close()
        config.update(hidden_size=h * factor, intermediate_size=inter * factor, num_attention_heads=heads * factor,
                      num_key_value_heads=kv_heads * factor, head_dim=head_dim)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for extra in source.iterdir():
            if extra.name.startswith("tokenizer") or extra.name in ("generation_config.json", "special_tokens_map.json"):
                shutil.copy2(extra, tmp / extra.name)
    return out
