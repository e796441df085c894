"""Token windows from text: tokenize once, then seeded random windows or consecutive chunks."""

from __future__ import annotations

import random

import torch

from infopt.errors import InfoptError


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one id sequence (with the tokenizer's BOS, once, as the papers do)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: the same ids without the Python-side batch conversion (~2x faster)
        return torch.tensor(backend.encode(text, add_special_tokens=True).ids, dtype=torch.long)
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "longer than model_max_length" warning
    try:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids[0]
    finally:
        transformers.logging.set_verbosity(verbosity)
    return ids


def calibration_windows(ids: torch.Tensor, count: int, seq_len: int, seed: int = 0,
                        mode: str = "random") -> torch.Tensor:
    """[count, seq_len] windows: uniformly random starts (the GPTQ recipe) or consecutive chunks."""
    if count < 1 or seq_len < 2:
        raise InfoptError("need at least 1 calibration sample of at least 2 tokens")
    total = ids.numel()
    if mode == "random":
        if total <= seq_len:
            raise InfoptError(f"calibration text has {total} tokens; windows of {seq_len} need more than {seq_len}")
        rng = random.Random(seed)
        starts = [rng.randint(0, total - seq_len - 1) for _ in range(count)]
    elif mode == "chunks":
        if total < count * seq_len:
            raise InfoptError(f"calibration text has {total} tokens; {count} chunks of {seq_len} need {count * seq_len}")
        starts = [i * seq_len for i in range(count)]
    else:
        raise InfoptError(f"unknown window mode {mode!r} (random or chunks)")
    return torch.stack([ids[s : s + seq_len] for s in starts])
