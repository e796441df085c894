"""Paged KV cache: fixed-size blocks, a block table per sequence, a free list and reference counts.

The storage is one key and one value tensor per layer, [blocks, block_size, kv_heads, head_dim]; a token's slot is
block_table[pos // block_size] * block_size + pos % block_size. Sequences that share a prefix (parallel samples of
one prompt) point at the same blocks; a shared block is copied before a sequence writes into it (copy on write).
The idea is the PagedAttention paper's (Kwon et al. 2023); the code is written for this runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DEFAULT_BLOCK_SIZE = 16


class OutOfBlocks(RuntimeError):
    """The free list is empty; the scheduler preempts a sequence and tries again."""


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out block 0 first

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        if not self.free:
            raise OutOfBlocks()
        block = self.free.pop()
        self.refcount[block] = 1
        return block

    def share(self, block: int) -> None:
        self.refcount[block] += 1

    def release(self, block: int) -> None:
        if self.refcount[block] <= 0:
            raise RuntimeError(f"block {block} released more often than it was held")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self.free.append(block)


@dataclass
class BlockTable:
    """One sequence's blocks and how many of its tokens have keys and values in them."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0


class KVCache:
    """Storage plus allocator. `reserve` makes room for a sequence's next tokens (allocating or copying blocks)."""

    def __init__(self, num_layers: int, num_blocks: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 block_size: int = DEFAULT_BLOCK_SIZE, device: torch.device | str = "cpu") -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.block_size, self.dtype = block_size, dtype
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks)

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE,
                  dtype: torch.dtype | None = None) -> KVCache:
        """A cache shaped for an EngineModel (its layers, KV heads, head size, dtype and device)."""
        s = model.shape
        return cls(s.num_layers, num_blocks, s.num_kv_heads, s.head_dim, dtype or model.dtype, block_size, model.device)

    @staticmethod
    def block_bytes(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                    block_size: int = DEFAULT_BLOCK_SIZE) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def blocks_needed(self, table: BlockTable, new_tokens: int) -> int:
        """Blocks `reserve(table, new_tokens)` would take from the free list."""
        total = -(-(table.length + new_tokens) // self.block_size)
        extra = max(0, total - len(table.blocks))
        last = table.length // self.block_size
        cow = int(table.length % self.block_size != 0 and last < len(table.blocks)
                  and self.allocator.refcount[table.blocks[last]] > 1)
        return extra + cow

    def reserve(self, table: BlockTable, new_tokens: int) -> torch.Tensor:
        """Slots (int64 [new_tokens]) for positions table.length ... + new_tokens; raises OutOfBlocks untouched."""
        if self.blocks_needed(table, new_tokens) > self.allocator.num_free:
            raise OutOfBlocks()
        first_block = table.length // self.block_size
        if table.length % self.block_size and self.allocator.refcount[table.blocks[first_block]] > 1:
            self._copy_on_write(table, first_block)
        while len(table.blocks) * self.block_size < table.length + new_tokens:
            table.blocks.append(self.allocator.allocate())
        bs, blocks = self.block_size, table.blocks
        slots = [blocks[p // bs] * bs + p % bs for p in range(table.length, table.length + new_tokens)]
        table.length += new_tokens
        return torch.tensor(slots, dtype=torch.int64)

    def _copy_on_write(self, table: BlockTable, index: int) -> None:
        old, new = table.blocks[index], self.allocator.allocate()
        for layer in range(len(self.keys)):
            self.keys[layer][new].copy_(self.keys[layer][old])
            self.values[layer][new].copy_(self.values[layer][old])
        self.allocator.release(old)
        table.blocks[index] = new

    def fork(self, table: BlockTable) -> BlockTable:
        """A table sharing every block of `table` (parallel samples of one prompt)."""
        for block in table.blocks:
            self.allocator.share(block)
        return BlockTable(list(table.blocks), table.length)

    def truncate(self, table: BlockTable, length: int) -> None:
        """Forget positions >= length (speculative tokens that were rejected); frees blocks no longer used."""
        keep = -(-length // self.block_size)
        for block in table.blocks[keep:]:
            self.allocator.release(block)
        del table.blocks[keep:]
        table.length = min(table.length, length)

    def free(self, table: BlockTable) -> None:
        for block in table.blocks:
            self.allocator.release(block)
        table.blocks.clear()
        table.length = 0

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys/values [tokens, kv_heads, head_dim] at flat slots."""
        self.keys[layer].view(-1, *k.shape[1:]).index_copy_(0, slots, k.to(self.dtype))
        self.values[layer].view(-1, *v.shape[1:]).index_copy_(0, slots, v.to(self.dtype))

    def gather(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [batch, kv_heads, blocks * block_size, head_dim] for block tables [batch, blocks]."""
        b, n = block_ids.shape
        k = self.keys[layer][block_ids].reshape(b, n * self.block_size, *self.keys[layer].shape[2:])
        v = self.values[layer][block_ids].reshape(b, n * self.block_size, *self.values[layer].shape[2:])
        return k.transpose(1, 2), v.transpose(1, 2)
