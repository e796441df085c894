"""Speculative decoding: a cheap drafter proposes K tokens, the target scores all K + 1 positions in one forward.

Acceptance follows Leviathan et al. 2022 (Algorithm 1) and Chen et al. 2023: draft token x with draft probability
q(x) is kept with probability min(1, p(x) / q(x)); at the first rejection the token is drawn from
normalize(max(0, p - q)) and the round ends; when all K are kept a bonus token is drawn from the target's next
distribution. The emitted tokens are then distributed exactly as the target's own sampling. At temperature 0 a
draft token is kept when it is the target's argmax, so the output equals plain greedy decoding.
Rejected positions are dropped from both KV caches (truncate), so the caches always hold exactly the kept tokens.

Drafters: another model sharing the tokenizer (its own paged cache), the target quantized on the fly
(`self:int4`, `self:int8`), or n-gram prompt lookup (`ngram`: copy what followed the latest earlier occurrence of
the last few tokens; deterministic, so q is one-hot).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from infopt.runtime.attention import BatchLayout
from infopt.runtime.engine import Engine, Sequence
from infopt.runtime.generate import distribution
from infopt.runtime.kv_cache import BlockTable, KVCache
from infopt.runtime.model import EngineModel


def _probabilities(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    return distribution(logits, p.temperature, p.top_k, p.top_p)


def verify(target_logits: torch.Tensor, draft: list[int], draft_probs: list[torch.Tensor | None], seq: Sequence,
           ) -> tuple[int, list[int]]:
    """(draft tokens kept, tokens to emit) for target logits [len(draft) + 1, vocab].

    draft_probs[i] is the draft's distribution at position i (None: the draft was deterministic, q one-hot).
    """
    if seq.params.temperature <= 0:
        out = []
        for i, token in enumerate(draft):
            best = int(target_logits[i].argmax())
            out.append(best)
            if best != token:
                return i, out
        return len(draft), out + [int(target_logits[len(draft)].argmax())]
    out = []
    for i, token in enumerate(draft):
        p = _probabilities(target_logits[i], seq)
        q = draft_probs[i]
        q_token = 1.0 if q is None else float(q[token])
        if float(torch.rand(1, generator=seq.generator)) * q_token < float(p[token]):  # r < p/q without dividing
            out.append(token)
            continue
        if q is None:
            q = torch.zeros_like(p)
            q[token] = 1.0
        residual = (p - q).clamp(min=0)
        residual = residual if float(residual.sum()) > 0 else p
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=seq.generator)))
        return i, out
    bonus = _probabilities(target_logits[len(draft)], seq)
    return len(draft), out + [int(torch.multinomial(bonus, 1, generator=seq.generator))]


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the last n tokens (n = max_n ... 1), propose what followed."""

    name = "ngram"

    def __init__(self, max_n: int = 3) -> None:
        self.max_n = max_n

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[tuple[list[int], list[torch.Tensor | None]]]:
        return [self._lookup(seq.tokens, k) for seq, k in zip(seqs, ks)]

    def _lookup(self, tokens: list[int], k: int) -> tuple[list[int], list[torch.Tensor | None]]:
        if k <= 0:
            return [], []
        for n in range(min(self.max_n, len(tokens) - 1), 0, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start:start + n] == tail:
                    proposal = tokens[start + n:start + n + k]
                    return proposal, [None] * len(proposal)
        return [], []

    def rollback(self, seq: Sequence, length: int) -> None:
        pass

    def release(self, seq: Sequence) -> None:
        pass


class ModelDrafter:
    """A draft model with its own paged cache; proposes by sampling (or argmax) from its own distribution."""

    def __init__(self, model: EngineModel, cache: KVCache, name: str = "model") -> None:
        self.model, self.cache, self.name = model, cache, name
        self.tables: dict[int, BlockTable] = {}

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[tuple[list[int], list[torch.Tensor | None]]]:
        active = [(seq, k) for seq, k in zip(seqs, ks) if k > 0]
        out: dict[int, tuple[list[int], list[torch.Tensor | None]]] = {seq.id: ([], []) for seq in seqs}
        feed = {seq.id: seq.tokens[self._table(seq).length:] for seq, _ in active}  # what the draft has not seen
        for step in range(max((k for _, k in active), default=0)):
            batch = [(seq, k) for seq, k in active if k > step]
            batch = [(seq, k) for seq, k in batch if self._reserve_ok(seq, len(feed[seq.id]))]
            if not batch:
                break
            starts = [self._table(seq).length for seq, _ in batch]
            slots = [self.cache.reserve(self._table(seq), len(feed[seq.id])) for seq, _ in batch]
            layout = BatchLayout.build(starts, [len(feed[seq.id]) for seq, _ in batch],
                                       [self._table(seq).blocks for seq, _ in batch], slots, self.cache.block_size)
            tokens = torch.tensor([t for seq, _ in batch for t in feed[seq.id]])
            logits = self.model(tokens, layout, self.cache)
            for (seq, _), row in zip(batch, logits):
                token, probs = self._sample(row, seq)
                out[seq.id][0].append(token)
                out[seq.id][1].append(probs)
                feed[seq.id] = [token]
            active = batch
        return [out[seq.id] for seq in seqs]

    def _sample(self, logits: torch.Tensor, seq: Sequence) -> tuple[int, torch.Tensor | None]:
        if seq.params.temperature <= 0:
            return int(logits.argmax()), None
        probs = _probabilities(logits, seq)
        return int(torch.multinomial(probs, 1, generator=seq.generator)), probs

    def _table(self, seq: Sequence) -> BlockTable:
        return self.tables.setdefault(seq.id, BlockTable())

    def _reserve_ok(self, seq: Sequence, tokens: int) -> bool:
        return self.cache.blocks_needed(self._table(seq), tokens) <= self.cache.allocator.num_free

    def rollback(self, seq: Sequence, length: int) -> None:
        if seq.id in self.tables:
            self.cache.truncate(self.tables[seq.id], length)

    def release(self, seq: Sequence) -> None:
        table = self.tables.pop(seq.id, None)
        if table is not None:
            self.cache.free(table)


@dataclass
class SpeculativeStats:
    rounds: int = 0  # target verification passes, summed over sequences
    proposed: int = 0
    accepted: int = 0
    emitted: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {**self.__dict__, "acceptance_rate": self.accepted / self.proposed if self.proposed else None,
                "tokens_per_target_forward": self.emitted / self.rounds if self.rounds else None}


class SpeculativeEngine(Engine):
    """Engine whose decode steps are speculative rounds; admission, preemption and prefill are the base engine's."""

    def __init__(self, model: EngineModel, cache: KVCache, drafter, num_draft: int = 4, adaptive: bool = False,
                 **kwargs) -> None:
        super().__init__(model, cache, **kwargs)
        self.drafter, self.num_draft, self.adaptive = drafter, num_draft, adaptive
        self.spec = SpeculativeStats()
        self._k: dict[int, int] = {}

    def _draft_length(self, seq: Sequence) -> int:
        room = min(seq.params.max_new_tokens - len(seq.generated), self.max_positions - len(seq.tokens)) - 1
        return max(0, min(self._k.get(seq.id, self.num_draft), room))

    def _decode(self) -> None:
        if not self.running:
            return
        start = time.perf_counter()
        self._make_room(1)
        seqs = list(self.running)
        if not seqs:
            return
        ks = self._fit([self._draft_length(s) for s in seqs], seqs)
        t0 = time.perf_counter()
        proposals = self.drafter.propose(seqs, ks)
        t1 = time.perf_counter()
        starts = [s.table.length for s in seqs]
        new = [1 + len(tokens) for tokens, _ in proposals]
        slots = [self.cache.reserve(s.table, n) for s, n in zip(seqs, new)]
        layout = BatchLayout.build(starts, new, [s.table.blocks for s in seqs], slots, self.cache.block_size,
                                   all_logits=True)
        flat = torch.tensor([t for s, (tokens, _) in zip(seqs, proposals) for t in [s.tokens[-1], *tokens]])
        logits = self.model(flat, layout, self.cache)
        self.spec.draft_seconds += t1 - t0
        self.spec.verify_seconds += time.perf_counter() - t1
        emitted, offset = 0, 0
        for seq, n, (draft, probs) in zip(seqs, new, proposals):
            kept, tokens = verify(logits[offset:offset + n], draft, probs, seq)
            offset += n
            self._tune(seq, kept, len(draft))
            self.spec.rounds += 1
            self.spec.proposed += len(draft)
            self.spec.accepted += kept
            for token in tokens:
                self._emit(seq, token)
                emitted += 1
                if seq.finish_reason:
                    break
            if not seq.finish_reason:  # the caches keep every token but the newest
                self.cache.truncate(seq.table, len(seq.tokens) - 1)
                self.drafter.rollback(seq, len(seq.tokens) - 1)
        self.spec.emitted += emitted
        self.timings.decode_tokens += emitted
        self.timings.decode_seconds += time.perf_counter() - start

    def _fit(self, ks: list[int], seqs: list[Sequence]) -> list[int]:
        """Shorten drafts so every sequence's K + 1 new slots fit the free blocks (each keeps at least one)."""
        free = self.cache.allocator.num_free - sum(self.cache.blocks_needed(s.table, 1) for s in seqs)
        fitted = []
        for seq, k in zip(seqs, ks):
            base = self.cache.blocks_needed(seq.table, 1)
            while k > 0 and self.cache.blocks_needed(seq.table, k + 1) - base > free:
                k -= 1
            free -= self.cache.blocks_needed(seq.table, k + 1) - base
            fitted.append(k)
        return fitted

    def _tune(self, seq: Sequence, kept: int, proposed: int) -> None:
        """Adaptive K: grow after a fully kept draft, shrink after an early rejection (between 1 and 2 x num_draft)."""
        if not self.adaptive or proposed == 0:
            return
        k = self._k.get(seq.id, self.num_draft)
        self._k[seq.id] = min(2 * self.num_draft, k + 1) if kept == proposed else max(1, min(k, kept + 1))

    def _preempt(self, seq: Sequence) -> None:
        self.drafter.release(seq)
        super()._preempt(seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.drafter.release(seq)
        super()._finish(seq, reason)


def self_draft(model_dir, spec_name: str, dtype: torch.dtype, backend: str | None = None,
               device: str = "cpu") -> EngineModel:
    """The target quantized on the fly with RTN ("int4": 4-bit group 128 symmetric, per channel where 128 does not
    divide the input; "int8": per channel)."""
    from infopt.errors import InfoptError
    from infopt.models.adapters import adapter_for
    from infopt.models.loading import load_state_dict, text_config
    from infopt.quant.rtn import quantize_rtn
    from infopt.quant.spec import QuantSpec
    from infopt.runtime.model import build_engine_model

    specs = {"int4": QuantSpec(4, 128, True), "int8": QuantSpec(8, -1, True)}  # int4 falls back to per channel
    if spec_name not in specs:
        raise InfoptError(f"invalid self draft {spec_name!r}: use self:int4 or self:int8")
    if model_dir.quant_method is not None:
        raise InfoptError("--draft self:... quantizes a full-precision target; this target is already quantized")
    spec = specs[spec_name]
    state = load_state_dict(model_dir)
    layers = int(text_config(model_dir.config)["num_hidden_layers"])
    quantized = {}
    for name in adapter_for(text_config(model_dir.config)).layer_linears(layers):
        weight = state.get(f"{name}.weight")
        if weight is not None:
            fitted = spec if spec.fits(weight.shape[1]) else QuantSpec(spec.bits, -1, True)
            quantized[f"{name}.weight"] = quantize_rtn(state.pop(f"{name}.weight"), fitted)
    return build_engine_model(model_dir.config, state, quantized, dtype, backend, device)


def draft_cache_for(draft: EngineModel, target_cache: KVCache, max_batch: int, num_draft: int) -> KVCache:
    """A draft cache holding as many tokens as the target's, plus room for the drafts in flight."""
    bs = target_cache.block_size
    return KVCache.for_model(draft, target_cache.num_blocks + max_batch * (-(-num_draft // bs) + 1), bs)


__all__ = ["ModelDrafter", "NgramDrafter", "SpeculativeEngine", "draft_cache_for", "self_draft", "verify"]
