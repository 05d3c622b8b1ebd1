"""Accounting of KV-cache blocks: a free list, reference counts, block tables."""
from __future__ import annotations

from collections import deque

from master.sequence import Sequence


class BlockManager:
    """Hands out fixed-size KV blocks to sequences as they grow."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a sequence of `num_tokens` tokens occupies."""
        return -(-num_tokens // self.block_size)

    def num_missing(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still needs to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_ids))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_missing(seq, num_tokens) <= len(self.free_ids)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` enough blocks for `num_tokens` tokens; the caller checked can_grow."""
        for _ in range(self.num_missing(seq, num_tokens)):
            block_id = self.free_ids.popleft()
            self.ref_counts[block_id] = 1
            seq.block_ids.append(block_id)

    def free(self, seq: Sequence) -> None:
        """Return every block of `seq` whose last reference it held."""
        for block_id in reversed(seq.block_ids):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_ids.append(block_id)
        seq.block_ids.clear()
