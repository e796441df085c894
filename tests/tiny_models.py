"""Tiny random models of each supported architecture, saved as real Hugging Face folders."""

from pathlib import Path

import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)

ARCH_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
}


def make_tiny_model(arch: str, path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    import transformers

    class_name, extra = ARCH_CONFIGS[arch]
    config = getattr(transformers, class_name)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(path)
    return path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


def copy_tokenizer(source: Path, model: Path) -> Path:
    """Give a tiny model (vocab 512) another folder's tokenizer, so calibration text can be tokenized."""
    import shutil

    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, model / name)
    return model


def widen_heads(source: Path, out: Path, head_dim: int = 32, intermediate: int = 256) -> Path:
    """The same function as a Llama folder (stories260K: head_dim 8, intermediate 172) with wider attention heads and
    MLP, zero-padded, so that engines whose kernels need common head sizes and packable widths (vLLM's CPU attention
    and int4 kernels) run a real trained model.

    Attention: rotary pair (i, i + d/2) of a head moves to (r*i, r*i + D/2) with r = D/d, whose frequency
    theta^(-2ri/D) is the original theta^(-2i/d); the other dimensions are zero. q is scaled by sqrt(r), so the
    softmax scale 1/sqrt(D) acts as 1/sqrt(d). MLP: zero gate/up rows and down columns add silu(0) * 0 = 0."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    config = json.loads((source / "config.json").read_text())
    d, heads, kv_heads = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    assert head_dim % d == 0 and head_dim > d and intermediate >= inner

    def pad_heads(weight: torch.Tensor, count: int, scale: float = 1.0) -> torch.Tensor:
        per_head = weight.view(count, d, -1) * scale
        wide = torch.zeros(count, head_dim, weight.shape[-1], dtype=weight.dtype)
        r = head_dim // d
        wide[:, 0 : head_dim // 2 : r], wide[:, head_dim // 2 :: r] = per_head[:, : d // 2], per_head[:, d // 2 :]
        return wide.reshape(count * head_dim, -1)

    tensors = {}
    for name, t in load_file(str(source / "model.safetensors")).items():
        if name.endswith("q_proj.weight"):
            t = pad_heads(t, heads, (head_dim / d) ** 0.5)
        elif name.endswith("k_proj.weight"):
            t = pad_heads(t, kv_heads)
        elif name.endswith("v_proj.weight"):
            t = pad_heads(t, kv_heads)
        elif name.endswith("o_proj.weight"):
            t = pad_heads(t.t().contiguous(), heads).t().contiguous()
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            t = torch.cat([t, t.new_zeros(intermediate - inner, hidden)])
        elif name.endswith("down_proj.weight"):
            t = torch.cat([t, t.new_zeros(hidden, intermediate - inner)], 1)
        tensors[name] = t.contiguous()
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.update(head_dim=head_dim, intermediate_size=intermediate)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for path in source.iterdir():
        if path.name not in ("config.json", "model.safetensors", "infopt-manifest.json"):
            shutil.copy(path, out / path.name)
    return out
