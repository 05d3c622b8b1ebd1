"""The agent's copy of each live sequence's block table, kept up to date by the deltas every step carries.

The master owns the tables (master/block_manager.py); a step sends, per sequence, only the entries from the
first one the agent does not hold yet (new blocks, a copy-on-write replacement, or the whole table of a
sequence new to the agent), and the ids of sequences whose tables the agent can drop. A sequence's table is
then its first `start` entries and the new ones: shorter than before when the master took back blocks past
its tokens (rejected speculative tokens'). The tables live in
one array, a row per live sequence, so a step's tables are one gather of its rows.
"""
from __future__ import annotations

import numpy as np

from llmserve.common.protocol import ProtocolError, StepRequest
from llmserve.common.step_arrays import StepInputs


class BlockTables:
    """Block ids per sequence id; `apply` turns one step's deltas into its [num_seqs, width] block tables."""

    def __init__(self, max_blocks_per_seq: int, num_rows: int = 64):
        self.max_blocks_per_seq = max_blocks_per_seq
        self.rows = np.zeros((num_rows, max_blocks_per_seq), dtype=np.int32)
        self.lengths = np.zeros(num_rows, dtype=np.int64)
        self.row_of: dict[int, int] = {}  # seq id -> its row
        self.free_rows = list(range(num_rows - 1, -1, -1))

    def held(self, seq_id: int) -> list[int]:
        """The block table held for `seq_id` (empty if none)."""
        row = self.row_of.get(seq_id)
        return [] if row is None else self.rows[row, : self.lengths[row]].tolist()

    def lengths_of(self, seq_ids: np.ndarray) -> np.ndarray:
        """The table length of each of `seq_ids` (all held)."""
        return self.lengths[[self.row_of[seq_id] for seq_id in seq_ids.tolist()]]

    def check(self, header: StepRequest, batch: StepInputs) -> None:
        """ProtocolError, before anything changes, for deltas that do not fit the tables held."""
        released = set(header.released_seq_ids)
        seq_ids, starts, counts = batch.seq_ids.tolist(), batch.block_starts.tolist(), batch.block_counts.tolist()
        if len(set(seq_ids)) != len(seq_ids):
            raise ProtocolError(f"step {header.step_id}: a sequence appears twice")
        if sum(counts) != header.num_new_blocks:
            raise ProtocolError(f"step {header.step_id}: block_counts add up to {sum(counts)}, not num_new_blocks")
        for seq_id, start, count in zip(seq_ids, starts, counts):
            row = None if seq_id in released else self.row_of.get(seq_id)
            held = 0 if row is None else int(self.lengths[row])
            if not 0 <= start <= held or not 0 < start + count <= self.max_blocks_per_seq:
                raise ProtocolError(f"step {header.step_id}: sequence {seq_id}'s blocks {start}..{start + count} "
                                    f"do not follow the {held} held (at most {self.max_blocks_per_seq})")

    def apply(self, header: StepRequest, batch: StepInputs) -> np.ndarray:
        """Drop the released tables, apply the deltas; the step's block tables, one row per sequence."""
        for seq_id in header.released_seq_ids:
            row = self.row_of.pop(seq_id, None)
            if row is not None:
                self.free_rows.append(row)
        seq_ids, counts = batch.seq_ids.tolist(), batch.block_counts.tolist()
        rows = [self.row_of.get(seq_id) for seq_id in seq_ids]
        if None in rows or any(counts):
            self._write(seq_ids, rows, batch.block_starts.tolist(), counts, batch.new_block_ids)
        rows = np.asarray(rows)
        self.lengths[rows] = batch.block_starts + batch.block_counts  # a table cut back keeps its first entries
        return self.rows[rows, : int(self.lengths[rows].max())]

    def _write(self, seq_ids: list[int], rows: list, starts: list[int], counts: list[int], new_ids: np.ndarray) -> None:
        """Give new sequences a row and write every non-empty delta (fills `rows` in place)."""
        offset = 0
        for index, (seq_id, start, count) in enumerate(zip(seq_ids, starts, counts)):
            if rows[index] is None:
                rows[index] = self.row_of[seq_id] = self._take_row()
            row = rows[index]
            if count:
                self.rows[row, start : start + count] = new_ids[offset : offset + count]
            offset += count

    def _take_row(self) -> int:
        if not self.free_rows:  # more live sequences than rows: double them
            grown = len(self.rows)
            self.rows = np.concatenate([self.rows, np.zeros_like(self.rows)])
            self.lengths = np.concatenate([self.lengths, np.zeros_like(self.lengths)])
            self.free_rows = list(range(2 * grown - 1, grown - 1, -1))
        return self.free_rows.pop()
