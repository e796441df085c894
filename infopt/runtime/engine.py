"""Continuous batching over the paged KV cache.

    engine = Engine(model, cache, eos_ids={2})
    engine.submit(prompt_ids, SamplingParams(max_new_tokens=64, n=2))
    results = engine.run(on_token=print)

Each step either admits waiting requests (one batched prefill, first-come first-served, as long as their prompts'
blocks are free) or decodes one token for every running sequence. When a running sequence needs a block and none
is free, the most recently admitted sequence is preempted: its blocks are freed and it goes back to the head of the
queue with the tokens it has, to be recomputed by a prefill later (so nothing is lost and nothing crashes). A
request with n > 1 is prefilled once; its samples share the prompt's blocks (copy on write).
Sampling draws from a generator per sample seeded by (seed, sample index), so the tokens do not depend on how
requests were batched or preempted.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from infopt.runtime.attention import BatchLayout
from infopt.runtime.generate import sample_next
from infopt.runtime.kv_cache import BlockTable, KVCache
from infopt.runtime.model import EngineModel

MAX_PREFILL_TOKENS = 4096  # prompt tokens batched into one prefill step (one long prompt may exceed it alone)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    n: int = 1


@dataclass
class Sequence:
    id: int
    request_id: int
    sample_index: int
    prompt_len: int
    tokens: list[int]
    params: SamplingParams
    generator: torch.Generator
    table: BlockTable = field(default_factory=BlockTable)
    pending_samples: int = 0  # further samples to fork from this one after its first prefill
    finish_reason: str | None = None
    preemptions: int = 0

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]


@dataclass
class Timings:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    recomputed_tokens: int = 0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    steps: int = 0
    preemptions: int = 0

    def as_dict(self) -> dict:
        def rate(tokens: int, seconds: float) -> float | None:
            return tokens / seconds if seconds > 0 else None

        return {**self.__dict__, "prefill_tokens_per_second": rate(self.prefill_tokens, self.prefill_seconds),
                "decode_tokens_per_second": rate(self.decode_tokens, self.decode_seconds)}


@dataclass
class PageMap:
    """Which sequence holds which block at one moment (the peak of block use, for --kv-report)."""

    block_size: int
    num_blocks: int
    owners: dict[int, list[int]]  # block -> sequence ids
    fill: dict[int, int]  # block -> filled slots
    sequences: dict[int, tuple[int, int, list[int]]]  # sequence id -> (request id, tokens, blocks)

    @property
    def used_blocks(self) -> int:
        return len(self.owners)

    @property
    def filled_slots(self) -> int:
        return sum(self.fill.values())

    @property
    def internal_fragmentation(self) -> float:
        """Share of the allocated slots that hold no token."""
        allocated = self.used_blocks * self.block_size
        return 1 - self.filled_slots / allocated if allocated else 0.0

    @property
    def shared_blocks(self) -> int:
        return sum(len(o) > 1 for o in self.owners.values())


class Engine:
    def __init__(self, model: EngineModel, cache: KVCache, eos_ids: set[int] | None = None,
                 max_batch: int = 32, max_positions: int | None = None) -> None:
        self.model, self.cache = model, cache
        self.eos_ids = set(eos_ids or ())
        self.max_batch = max_batch
        self.max_positions = max_positions or model.shape.max_positions
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.finished: list[Sequence] = []
        self.timings = Timings()
        self.peak_map: PageMap | None = None
        self._next_id = self._next_request = 0
        self._on_token: Callable[[Sequence, int], None] | None = None

    # -- requests -----------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Queue a request; returns its id. Raises ValueError when its prompt alone cannot fit the cache."""
        if not prompt_ids:
            raise ValueError("a prompt needs at least one token")
        if len(prompt_ids) >= self.max_positions:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model takes at most {self.max_positions}")
        needed = -(-(len(prompt_ids) + 1) // self.cache.block_size)
        if needed > self.cache.num_blocks:
            raise ValueError(f"a {len(prompt_ids)}-token prompt needs {needed} KV blocks; the budget holds "
                             f"{self.cache.num_blocks}: raise --kv-budget-mb")
        if params.n > self.max_batch:
            raise ValueError(f"n={params.n} samples exceed the batch limit {self.max_batch}")
        request = self._next_request
        self._next_request += 1
        seq = self._new_sequence(request, 0, list(prompt_ids), params)
        seq.pending_samples = params.n - 1
        self.waiting.append(seq)
        return request

    def _new_sequence(self, request: int, index: int, tokens: list[int], params: SamplingParams) -> Sequence:
        generator = torch.Generator().manual_seed(params.seed + 1_000_003 * index)
        seq = Sequence(self._next_id, request, index, len(tokens), tokens, params, generator)
        self._next_id += 1
        return seq

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self, on_token: Callable[[Sequence, int], None] | None = None) -> list[Sequence]:
        """Run until every request finished; returns the finished sequences ordered by (request, sample)."""
        self._on_token = on_token
        while self.waiting or self.running:
            self.step()
        return sorted(self.finished, key=lambda s: (s.request_id, s.sample_index))

    def step(self) -> None:
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        else:
            self._decode()
        self.timings.steps += 1
        self._record_peak()

    def _admit(self) -> list[Sequence]:
        admitted, free, tokens = [], self.cache.allocator.num_free, 0
        while self.waiting:
            seq = self.waiting[0]
            blocks = -(-len(seq.tokens) // self.cache.block_size)
            lanes = 1 + seq.pending_samples
            if len(self.running) + len(admitted) + lanes > self.max_batch:
                break
            if blocks > free or (admitted and tokens + len(seq.tokens) > MAX_PREFILL_TOKENS):
                break
            admitted.append(self.waiting.popleft())
            free -= blocks
            tokens += len(seq.tokens)
        if not admitted and self.waiting and not self.running:
            # Nothing runs and the head still does not fit: only a preempted sequence that has grown past the
            # whole budget can get here; it ends with what it has.
            self._finish(self.waiting.popleft(), "kv_budget")
        return admitted

    def _prefill(self, seqs: list[Sequence]) -> None:
        start = time.perf_counter()
        slots = [self.cache.reserve(s.table, len(s.tokens)) for s in seqs]
        layout = BatchLayout.build([0] * len(seqs), [len(s.tokens) for s in seqs], [s.table.blocks for s in seqs],
                                   slots, self.cache.block_size)
        tokens = torch.tensor([t for s in seqs for t in s.tokens])
        logits = self.model(tokens, layout, self.cache)
        for seq, row in zip(seqs, logits):
            self.running.append(seq)
            samples = [seq] + self._fork(seq)
            for sample in samples:
                self._append(sample, row)
        elapsed = time.perf_counter() - start
        fresh = sum(s.prompt_len for s in seqs if s.preemptions == 0)
        self.timings.prefill_tokens += fresh
        self.timings.recomputed_tokens += len(tokens) - fresh
        self.timings.prefill_seconds += elapsed

    def _fork(self, seq: Sequence) -> list[Sequence]:
        children = []
        for index in range(1, seq.pending_samples + 1):
            child = self._new_sequence(seq.request_id, index, list(seq.tokens), seq.params)  # tokens: the prompt
            child.table = self.cache.fork(seq.table)
            children.append(child)
            self.running.append(child)
        seq.pending_samples = 0
        return children

    def _decode(self) -> None:
        if not self.running:
            return
        start = time.perf_counter()
        self._make_room()
        seqs = list(self.running)
        if not seqs:
            return
        starts = [s.table.length for s in seqs]
        slots = [self.cache.reserve(s.table, 1) for s in seqs]
        layout = BatchLayout.build(starts, [1] * len(seqs), [s.table.blocks for s in seqs], slots,
                                   self.cache.block_size)
        logits = self.model(torch.tensor([s.tokens[-1] for s in seqs]), layout, self.cache)
        for seq, row in zip(seqs, logits):
            self._append(seq, row)
        self.timings.decode_tokens += len(seqs)
        self.timings.decode_seconds += time.perf_counter() - start

    def _make_room(self, tokens: int = 1) -> None:
        """Preempt the latest-admitted sequences until every running one can take `tokens` more tokens."""
        while self.running:
            needed = sum(self.cache.blocks_needed(s.table, tokens) for s in self.running)
            if needed <= self.cache.allocator.num_free:
                return
            if len(self.running) == 1:
                self._finish(self.running[0], "kv_budget")
                return
            self._preempt(self.running[-1])

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.free(seq.table)
        seq.preemptions += 1
        self.timings.preemptions += 1
        self.waiting.appendleft(seq)

    def _append(self, seq: Sequence, logits: torch.Tensor) -> None:
        p = seq.params
        self._emit(seq, sample_next(logits, p.temperature, p.top_k, p.top_p, seq.generator))

    def _emit(self, seq: Sequence, token: int) -> None:
        """Add a token to a sequence, tell the listener, and finish the sequence when it is done."""
        p = seq.params
        seq.tokens.append(token)
        if self._on_token:
            self._on_token(seq, token)
        if token in self.eos_ids:
            self._finish(seq, "stop")
        elif len(seq.generated) >= p.max_new_tokens or len(seq.tokens) >= self.max_positions:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        self.cache.free(seq.table)
        self.finished.append(seq)

    # -- reporting ----------------------------------------------------------------------------------------
    def page_map(self) -> PageMap:
        owners: dict[int, list[int]] = {}
        fill: dict[int, int] = {}
        sequences = {}
        bs = self.cache.block_size
        for seq in self.running:
            t = seq.table
            sequences[seq.id] = (seq.request_id, t.length, list(t.blocks))
            for i, block in enumerate(t.blocks):
                owners.setdefault(block, []).append(seq.id)
                fill[block] = max(fill.get(block, 0), min(bs, t.length - i * bs))
        return PageMap(bs, self.cache.num_blocks, owners, fill, sequences)

    def _record_peak(self) -> None:
        used = self.cache.num_blocks - self.cache.allocator.num_free
        if self.peak_map is None or used > self.peak_map.used_blocks:
            self.peak_map = self.page_map()
