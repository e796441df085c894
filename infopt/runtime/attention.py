"""Attention over the paged cache, through torch's scaled_dot_product_attention.

A step processes, for each sequence, `new` tokens at positions start ... start + new - 1 (a prompt from position
0, one decode token, or several tokens to verify). Their keys and values are written to the cache first; then
  - a prompt from position 0 attends to its own keys (SDPA's causal kernel: flash or memory-efficient, no score
    matrix held),
  - a step where every sequence adds one token gathers each sequence's blocks into one padded batch,
  - anything else (tokens appended to a cached context) gathers that sequence's blocks with a causal offset mask.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                       is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """softmax(Q K^T * scale + mask) V written out, holding the whole [heads, queries, keys] score matrix.

    The textbook form SDPA replaces; the prefill-memory benchmark swaps it in (`attention.sdpa`) to show the
    O(N^2) scores that SDPA's kernels never hold.
    """
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        repeat = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(repeat, dim=-3), v.repeat_interleave(repeat, dim=-3)
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


sdpa = F.scaled_dot_product_attention  # the attention kernel every path calls


@dataclass
class BatchLayout:
    starts: list[int]  # cached tokens of each sequence before this step
    new: list[int]  # tokens each sequence adds
    block_tables: list[list[int]]
    positions: torch.Tensor  # int64 [tokens]
    slots: torch.Tensor  # int64 [tokens]: flat cache slot of each token
    logit_rows: torch.Tensor | None  # which rows get logits (None: all)
    block_size: int
    _memo: dict = field(default_factory=dict, repr=False, compare=False)  # per-step tensors shared by the layers

    def context(self, i: int, window: int | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sequence i's block ids [1, blocks] covering its cached context plus this step, and the mask of its new
        tokens over that context (None when every key is visible: one new token and no window). The same for
        every layer, so built once per step."""
        key = (i, window, device)
        if key not in self._memo:
            start, n = self.starts[i], self.new[i]
            length = start + n
            blocks = torch.tensor(self.block_tables[i][: -(-length // self.block_size)], device=device).unsqueeze(0)
            visible_all = n == 1 and (window is None or window >= length)
            mask = None if visible_all else _window_mask(torch.arange(start, length, device=device), length, window)
            self._memo[key] = (blocks, mask)
        return self._memo[key]

    def padded_context(self, window: int | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """For a step of one new token per sequence: block ids [batch, width] (padded with block 0 to the longest
        context) and which of those keys each sequence sees, [batch, width * block_size]; built once per step."""
        key = ("padded", window, device)
        if key not in self._memo:
            block_ids = self._block_ids(device)
            width = block_ids.shape[1]
            lengths = torch.tensor([s + 1 for s in self.starts], device=device)
            positions = torch.arange(width * self.block_size, device=device)
            visible = positions.unsqueeze(0) < lengths.unsqueeze(1)
            if window is not None:
                visible &= positions.unsqueeze(0) > (lengths - 1 - window).unsqueeze(1)
            self._memo[key] = (block_ids, visible)
        return self._memo[key]

    def token_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """For kernels.paged_attention: block ids [sequences, width] (rows padded with block 0 to the longest
        table this step reads) and the sequence of each token, int64 [tokens]; built once per step."""
        key = ("tokens", device)
        if key not in self._memo:
            tables = self._block_ids(device)
            owners = torch.tensor([i for i, n in enumerate(self.new) for _ in range(n)], dtype=torch.int64,
                                  device=device)
            self._memo[key] = (tables, owners)
        return self._memo[key]

    def _block_ids(self, device: torch.device) -> torch.Tensor:
        """int64 [sequences, width]: each block table cut or padded with block 0 to the longest context this step
        reads (its cached tokens plus its new ones); built once per step."""
        key = ("blocks", device)
        if key not in self._memo:
            width = max(-(-(s + n) // self.block_size) for s, n in zip(self.starts, self.new))
            self._memo[key] = torch.tensor([(table[:width] + [0] * width)[:width] for table in self.block_tables],
                                           dtype=torch.int64, device=device)
        return self._memo[key]

    @property
    def all_decode(self) -> bool:
        return all(n == 1 for n in self.new)

    def to(self, device: torch.device) -> BatchLayout:
        rows = None if self.logit_rows is None else self.logit_rows.to(device)
        return BatchLayout(self.starts, self.new, self.block_tables, self.positions.to(device),
                           self.slots.to(device), rows, self.block_size)

    @classmethod
    def build(cls, starts: list[int], new: list[int], block_tables: list[list[int]], slots: list[torch.Tensor],
              block_size: int, all_logits: bool = False) -> BatchLayout:
        # built from Python lists: a decode step's few tokens cost one tensor each, not several aten calls
        positions = torch.tensor([p for s, n in zip(starts, new) for p in range(s, s + n)], dtype=torch.int64)
        ends = list(itertools.accumulate(new))
        rows = None if all_logits else torch.tensor([e - 1 for e in ends], dtype=torch.int64)
        return cls(starts, new, block_tables, positions, slots[0] if len(slots) == 1 else torch.cat(slots), rows,
                   block_size)


def _window_mask(query_pos: torch.Tensor, key_len: int, window: int | None) -> torch.Tensor:
    """bool [queries, keys]: key j visible to a query at position p when j <= p (and p - j < window)."""
    keys = torch.arange(key_len, device=query_pos.device)
    visible = keys.unsqueeze(0) <= query_pos.unsqueeze(1)
    if window is not None:
        visible &= (query_pos.unsqueeze(1) - keys.unsqueeze(0)) < window
    return visible


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BatchLayout, cache, layer: int,
           scale: float, window: int | None) -> torch.Tensor:
    """Attention output [tokens, heads, head_dim] for flat q [tokens, heads, head_dim] and this step's k, v."""
    if layout.all_decode and len(layout.new) > 1:
        return _decode_batch(q, layout, cache, layer, scale, window)
    outputs, offset = [], 0
    for i, (start, n) in enumerate(zip(layout.starts, layout.new)):
        qi = q[offset:offset + n].transpose(0, 1).unsqueeze(0)  # [1, heads, n, dim]
        if start == 0:
            ki = k[offset:offset + n].transpose(0, 1).unsqueeze(0)
            vi = v[offset:offset + n].transpose(0, 1).unsqueeze(0)
            mask = None if window is None or window >= n else _window_mask(torch.arange(n, device=q.device), n, window)
        else:
            length = start + n
            blocks, mask = layout.context(i, window, q.device)
            ki, vi = cache.gather(layer, blocks)
            ki, vi = ki[:, :, :length], vi[:, :, :length]
        out = sdpa(qi, ki.to(q.dtype), vi.to(q.dtype), attn_mask=mask,
                                             is_causal=mask is None and start == 0 and n > 1, scale=scale,
                                             enable_gqa=qi.shape[1] != ki.shape[1])
        outputs.append(out[0].transpose(0, 1))
        offset += n
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def _decode_batch(q: torch.Tensor, layout: BatchLayout, cache, layer: int, scale: float,
                  window: int | None) -> torch.Tensor:
    """One new token per sequence: gather every sequence's blocks (padded to the longest) and mask the padding."""
    block_ids, visible = layout.padded_context(window, q.device)
    keys, values = cache.gather(layer, block_ids)
    out = sdpa(q.unsqueeze(2), keys.to(q.dtype), values.to(q.dtype),
                                         attn_mask=visible[:, None, None, :], scale=scale,
                                         enable_gqa=q.shape[1] != keys.shape[1])
    return out.squeeze(2)
