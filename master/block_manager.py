"""Accounting of KV-cache blocks: reference counts, an LRU free queue and block tables, with prefix caching.

Automatic prefix caching (scheduler_config.enable_prefix_caching): each full block of a sequence is named by
a chained hash of (its parent block's hash, or the request's cache salt for the first, its token ids); a
hash -> block map finds blocks whose contents another sequence computed. A freed block keeps its contents
and hash in the free queue, least recently freed first, until an allocation takes it (evicting its hash).
A new or preempted sequence starts from the cached blocks of its longest cached prefix, never covering its
last token (whose logits must be computed).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional

import numpy as np

from llmserve.master.sequence import Sequence


def block_hash(parent: Optional[bytes], token_ids: list[int]) -> bytes:
    """The name of a full block: a digest of its parent's name and its token ids."""
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return digest.digest()


def _root(seq: Sequence) -> Optional[bytes]:
    """What a sequence's first block is chained to: its cache salt, so different salts never share a block."""
    return None if seq.cache_salt is None else b"salt:" + seq.cache_salt.encode()


class BlockManager:
    """Hands out fixed-size KV blocks to sequences as they grow, and finds the blocks of prefixes computed before."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self._hash_of: dict[int, bytes] = {}  # cached block -> its hash
        self._block_of: dict[bytes, int] = {}  # hash -> the cached block holding it
        self.num_queried_tokens = 0  # prompt tokens looked up in the cache, and those found
        self.num_hit_tokens = 0
        self._released: list[int] = []  # sequences whose tables the agents hold and may drop

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def num_exclusive(self, seq: Sequence) -> int:
        """Blocks only `seq` holds: what freeing it gives back."""
        return sum(self._ref_counts[block_id] == 1 for block_id in seq.block_ids)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a sequence of `num_tokens` tokens occupies."""
        return -(-num_tokens // self.block_size)

    def num_missing(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still needs to hold `num_tokens` tokens, counting copies of shared blocks it will write."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_ids)) + len(self._shared_written(seq, num_tokens))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_missing(seq, num_tokens) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> list[tuple[int, int]]:
        """Give `seq` its own blocks for every token up to `num_tokens`; the caller checked can_grow.

        A shared block that the new tokens land in is copied first (copy-on-write); the
        (source, destination) pairs returned must be copied on the agents before the step runs.
        """
        copies = []
        for index in self._shared_written(seq, num_tokens):
            source = seq.block_ids[index]
            destination = self._take()
            self._ref_counts[source] -= 1
            seq.block_ids[index] = destination
            seq.agent_blocks = min(seq.agent_blocks, index)
            copies.append((source, destination))
        for _ in range(max(0, self.blocks_for(num_tokens) - len(seq.block_ids))):
            seq.block_ids.append(self._take())
        return copies

    def shrink(self, seq: Sequence, num_tokens: int) -> None:
        """Return the blocks `seq` holds past its first `num_tokens` tokens (rejected proposed tokens'), first in
        line to be taken again; the agents' copy of its table is cut back with the next step's delta."""
        keep = self.blocks_for(num_tokens)
        for block_id in seq.block_ids[keep:]:
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None
                self._free.move_to_end(block_id, last=False)
        del seq.block_ids[keep:]
        seq.agent_blocks = min(seq.agent_blocks, keep)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares every block of `parent` (its block table is a copy of the parent's)."""
        child.block_ids = list(parent.block_ids)
        child.block_hashes = list(parent.block_hashes)
        child.agent_blocks = child.agent_tokens = 0
        self.share(child.block_ids)

    def share(self, block_ids: list[int]) -> None:
        """One more reference to each of `block_ids` (a cached free block leaves the free queue)."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def lookup(self, seq: Sequence) -> list[int]:
        """The cached blocks of `seq`'s longest cached prefix of full blocks, short of its last token and of
        any prompt position whose log-probability it still wants."""
        if not self.enable_caching:
            return []
        num_blocks = (seq.num_tokens - 1) // self.block_size
        if seq.num_prompt_positions_to_score:  # positions not scored yet must be computed
            num_blocks = min(num_blocks, len(seq.prompt_logprobs) // self.block_size)
        hashes, found = self._prefix_hashes(seq, num_blocks), []
        for digest in hashes:
            block_id = self._block_of.get(digest)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def num_needed(self, cached: list[int], num_tokens: int) -> int:
        """Free blocks a sequence holding none takes to start from `cached` and hold `num_tokens` tokens."""
        return self.blocks_for(num_tokens) - len(cached) + sum(self._ref_counts[block_id] == 0 for block_id in cached)

    def start_from_cache(self, seq: Sequence, cached: list[int]) -> None:
        """`seq` (holding no blocks) starts with the cached blocks of lookup(seq) as computed."""
        if not self.enable_caching:
            return
        self.share(cached)
        seq.block_ids = list(cached)
        seq.block_hashes = self._prefix_hashes(seq, len(cached))
        seq.num_computed = len(cached) * self.block_size
        hit = min(seq.num_computed, seq.num_prompt_tokens)
        if seq.first_scheduled_time is None:  # its first admission, not a resume after preemption
            seq.num_cached_tokens = hit
        self.num_queried_tokens += seq.num_prompt_tokens
        self.num_hit_tokens += hit

    def cache_computed(self, seq: Sequence, num_tokens: Optional[int] = None) -> None:
        """Name every block `seq` has filled with computed tokens (its first `num_tokens`, when a later step in
        flight counts more as computed), so later sequences can find it."""
        if not self.enable_caching:
            return
        num_computed = seq.num_computed if num_tokens is None else min(num_tokens, seq.num_computed)
        hashes = self._prefix_hashes(seq, min(num_computed // self.block_size, len(seq.block_ids)))
        for digest, block_id in zip(hashes[len(seq.block_hashes):], seq.block_ids[len(seq.block_hashes):]):
            if digest not in self._block_of and block_id not in self._hash_of:
                self._block_of[digest], self._hash_of[block_id] = block_id, digest
        seq.block_hashes = hashes

    def reset_cache(self) -> int:
        """Forget every cached block no sequence holds; how many were forgotten."""
        forgotten = [block_id for block_id in self._free if block_id in self._hash_of]
        for block_id in forgotten:
            del self._block_of[self._hash_of.pop(block_id)]
        return len(forgotten)

    def _prefix_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        hashes = list(seq.block_hashes[:num_blocks])
        for index in range(len(hashes), num_blocks):
            tokens = seq.token_ids[index * self.block_size : (index + 1) * self.block_size]
            hashes.append(block_hash(hashes[-1] if hashes else _root(seq), tokens))
        return hashes

    def _shared_written(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Indexes of blocks `seq` shares with another sequence and will write tokens num_computed.. into."""
        first = seq.num_computed // self.block_size
        last = min(self.blocks_for(num_tokens), len(seq.block_ids))
        return [i for i in range(first, last) if self._ref_counts[seq.block_ids[i]] > 1]

    def _take(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        digest = self._hash_of.pop(block_id, None)
        if digest is not None:  # evicted: its contents are about to be overwritten
            del self._block_of[digest]
        self._ref_counts[block_id] = 1
        return block_id

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks no one holds go to the free queue, its last blocks nearest eviction."""
        for block_id in reversed(seq.block_ids):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None
        seq.block_ids.clear()
        seq.block_hashes.clear()
        if seq.on_agents:
            self._released.append(seq.seq_id)
        seq.agent_blocks, seq.agent_tokens, seq.on_agents = 0, 0, False

    def take_released(self) -> list[int]:
        """Sequences freed since the last call whose tables the agents held: they may drop them."""
        released, self._released = self._released, []
        return released

    def release_again(self, seq_ids: list[int]) -> None:
        """Released ids a failed step may not have delivered: the next one carries them (dropping twice is harmless)."""
        self._released += seq_ids

    def check_consistent(self, seqs: list[Sequence]) -> None:
        """AssertionError unless every count equals the tables of `seqs` holding the block, the free queue holds
        exactly the unreferenced blocks, and the hash map and its inverse agree."""
        held = [0] * self.num_blocks
        for seq in seqs:
            for block_id in seq.block_ids:
                held[block_id] += 1
        assert held == self._ref_counts, "reference counts differ from the block tables"
        assert set(self._free) == {b for b in range(self.num_blocks) if held[b] == 0}, "free queue != unreferenced"
        assert {v: k for k, v in self._block_of.items()} == self._hash_of, "hash map and its inverse disagree"
