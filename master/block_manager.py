"""Accounting of KV-cache blocks: a free list, reference counts, block tables."""
from __future__ import annotations

from collections import deque

from llmserve.master.sequence import Sequence


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
        """Blocks `seq` still needs to hold `num_tokens` tokens, counting copies of shared blocks it will write."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_ids)) + len(self._shared_written(seq, num_tokens))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_missing(seq, num_tokens) <= len(self.free_ids)

    def grow(self, seq: Sequence, num_tokens: int) -> list[tuple[int, int]]:
        """Give `seq` its own blocks for every token up to `num_tokens`; the caller checked can_grow.

        A shared block that the new tokens land in is copied first (copy-on-write); the
        (source, destination) pairs returned must be copied on the agents before the step runs.
        """
        copies = []
        for index in self._shared_written(seq, num_tokens):
            source = seq.block_ids[index]
            destination = self._take()
            self.ref_counts[source] -= 1
            seq.block_ids[index] = destination
            copies.append((source, destination))
        for _ in range(max(0, self.blocks_for(num_tokens) - len(seq.block_ids))):
            seq.block_ids.append(self._take())
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares every block of `parent` (its block table is a copy of the parent's)."""
        child.block_ids = list(parent.block_ids)
        for block_id in child.block_ids:
            self.ref_counts[block_id] += 1

    def _shared_written(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Indexes of blocks `seq` shares with another sequence and will write tokens num_computed.. into."""
        first = seq.num_computed // self.block_size
        last = min(self.blocks_for(num_tokens), len(seq.block_ids))
        return [i for i in range(first, last) if self.ref_counts[seq.block_ids[i]] > 1]

    def _take(self) -> int:
        block_id = self.free_ids.popleft()
        self.ref_counts[block_id] = 1
        return block_id

    def free(self, seq: Sequence) -> None:
        """Return every block of `seq` whose last reference it held."""
        for block_id in reversed(seq.block_ids):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_ids.append(block_id)
        seq.block_ids.clear()
