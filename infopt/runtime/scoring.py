"""Score whole token windows with the infopt engine, in the shape perplexity evaluation expects.

    scorer = EngineScorer(load_engine_model(model_dir, backend="ext-a8"))
    logits = scorer(input_ids).logits          # [batch, tokens, vocab], fp32

Each call is one prefill of every window from position 0 through a paged cache sized for it, so `infopt eval
--engine infopt` measures the numbers `infopt run` computes (packed kernels, int8 activations with ext-a8).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from infopt.runtime.attention import BatchLayout
from infopt.runtime.kv_cache import BlockTable, KVCache
from infopt.runtime.model import EngineModel


class EngineScorer:
    """model(input_ids [batch, tokens]).logits -> [batch, tokens, vocab] through the engine's prefill."""

    def __init__(self, model: EngineModel, block_size: int = 16) -> None:
        self.model, self.block_size = model, block_size
        self.config = SimpleNamespace(vocab_size=model.shape.vocab_size)
        self._cache: KVCache | None = None

    def _cache_for(self, blocks: int) -> KVCache:
        if self._cache is None or self._cache.allocator.num_blocks < blocks:
            self._cache = None  # free the old storage first
            self._cache = KVCache.for_model(self.model, blocks, self.block_size)
        return self._cache

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> SimpleNamespace:
        batch, tokens = input_ids.shape
        cache = self._cache_for(batch * -(-tokens // self.block_size))
        tables = [BlockTable() for _ in range(batch)]
        try:
            slots = [cache.reserve(table, tokens) for table in tables]
            layout = BatchLayout.build([0] * batch, [tokens] * batch, [t.blocks for t in tables], slots,
                                       self.block_size, all_logits=True)
            logits = self.model(input_ids.reshape(-1), layout, cache)
        finally:
            for table in tables:
                cache.free(table)
        return SimpleNamespace(logits=logits.view(batch, tokens, -1))
