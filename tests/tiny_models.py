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
