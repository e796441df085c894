"""Token sampling on a transformers model with its KV cache (greedy, temperature, top-k, top-p)."""

from __future__ import annotations

from typing import Callable

import torch


def distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """fp32 probabilities [vocab] after temperature, top-k and top-p (temperature > 0)."""
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = (sorted_probs.cumsum(0) - sorted_probs) >= top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return probs / probs.sum()


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator) -> int:
    """One token id from a [vocab] logit vector; temperature 0 is greedy."""
    if temperature <= 0:
        return int(logits.argmax())
    return int(torch.multinomial(distribution(logits, temperature, top_k, top_p), 1, generator=generator))


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eos_token_id: int | list[int] | None = None,
             max_length: int | None = None, on_token: Callable[[int], None] | None = None) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    limit = max_new_tokens if max_length is None else max(0, min(max_new_tokens, max_length - len(prompt_ids)))
    out: list[int] = []
    inputs = torch.tensor([prompt_ids])
    cache = None
    for _ in range(limit):
        result = model(input_ids=inputs, past_key_values=cache, use_cache=True)
        cache = result.past_key_values
        token = sample_next(result.logits[0, -1], temperature, top_k, top_p, generator)
        out.append(token)
        if on_token:
            on_token(token)
        if token in eos:
            break
        inputs = torch.tensor([[token]])
    return out
