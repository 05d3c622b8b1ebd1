"""The agent's copy of each live sequence's state, kept up to date by the deltas every step carries.

The master owns the sequences; the agent keeps, per sequence id, what stays the same from step to step so
that a step carries only what changed (as vLLM's workers keep their requests' state between SchedulerOutputs):

- its block table (master/block_manager.py owns it): a step sends only the entries from the first one the
  agent does not hold yet (new blocks, a copy-on-write replacement, or the whole table of a sequence new to
  the agent). A sequence's table is then its first `start` entries and the new ones: shorter than before
  when the master took back blocks past its tokens (rejected speculative tokens').
- its sampling parameters, sent once with the step that first schedules it;
- for a sequence with penalties or n-gram bans, its tokens (prompt and output), as deltas from the first
  position the agent does not hold right: a decode step sends one id.

A released sequence id (finished, preempted, aborted) drops it all. Everything lives in arrays with a row
per live sequence, so a step's tables and its sampled rows' parameters are gathers of its rows.
"""
from __future__ import annotations

import numpy as np

from llmserve.common.protocol import ProtocolError, StepRequest
from llmserve.common.step_arrays import (
    NO_SEED, PARAM_COLUMNS, ROW_PARAM_FIELDS, SEED_STRIDE, SamplingRows, StepInputs,
)

PARAM_NAMES = [name for name, _ in PARAM_COLUMNS if name != "param_seq_ids"]


class SequenceTable:
    """Per sequence id: block table, sampling parameters and token history. `check` refuses a step's deltas
    that do not fit what is held, `apply` applies them and returns the step's [num_seqs, width] block tables,
    and `sampling_rows` gives the sampler the step's rows."""

    def __init__(self, max_blocks_per_seq: int, max_tokens: int, num_rows: int = 64):
        self.max_blocks_per_seq, self.max_tokens = max_blocks_per_seq, max_tokens
        self.blocks = np.zeros((num_rows, max_blocks_per_seq), dtype=np.int32)
        self.lengths = np.zeros(num_rows, dtype=np.int64)  # entries held of each table
        self.params = {name: np.zeros(num_rows, col.dtype) for name, col in PARAM_COLUMNS if name in PARAM_NAMES}
        self.tokens = np.zeros((num_rows, max_tokens), dtype=np.int32)  # zeros: pages untouched until written
        self.num_tokens = np.zeros(num_rows, dtype=np.int64)  # leading tokens held of each history
        self.row_of: dict[int, int] = {}  # seq id -> its row
        self.free_rows = list(range(num_rows - 1, -1, -1))
        self.step_rows = np.zeros(0, dtype=np.int64)  # the rows of the last step applied, in its order
        # its sampled rows' parameters: (row_seqs as bytes, table rows, {name: values}, history starts)
        self.step_params = None

    def held(self, seq_id: int) -> list[int]:
        """The block table held for `seq_id` (empty if none)."""
        row = self.row_of.get(seq_id)
        return [] if row is None else self.blocks[row, : self.lengths[row]].tolist()

    def history(self, seq_id: int) -> list[int]:
        """The tokens held for `seq_id` (empty if none, or if it keeps no history)."""
        row = self.row_of.get(seq_id)
        return [] if row is None else self.tokens[row, : self.num_tokens[row]].tolist()

    def lengths_of(self, seq_ids: np.ndarray) -> np.ndarray:
        """The table length of each of `seq_ids` (all held)."""
        return self.lengths[[self.row_of[seq_id] for seq_id in seq_ids.tolist()]]

    def check(self, header: StepRequest, batch: StepInputs) -> None:
        """ProtocolError, before anything changes, for deltas that do not fit what is held."""
        step = header.step_id
        seq_ids = batch.seq_ids.tolist()
        if len(set(seq_ids)) != len(seq_ids):
            raise ProtocolError(f"step {step}: a sequence appears twice")
        if int(batch.block_counts.sum()) != header.num_new_blocks:
            raise ProtocolError(f"step {step}: block_counts do not add up to num_new_blocks")
        released = set(header.released_seq_ids)
        rows = [None if seq_id in released else self.row_of.get(seq_id) for seq_id in seq_ids]
        held = [0 if row is None else int(self.lengths[row]) for row in rows]
        _refuse_gaps(step, seq_ids, "blocks", batch.block_starts.tolist(), batch.block_counts.tolist(), held,
                     self.max_blocks_per_seq, empty=False)
        if header.num_new_params or None in rows:
            param_ids = batch.params.param_seq_ids.tolist()
            if len(set(param_ids)) != len(param_ids) or not set(param_ids) <= set(seq_ids):
                raise ProtocolError(f"step {step}: sampling parameters for a sequence not in the step, or twice")
            missing = {seq_id for seq_id, row in zip(seq_ids, rows) if row is None} - set(param_ids)
            if missing:
                raise ProtocolError(f"step {step}: sequences {sorted(missing)} are new here and came without "
                                    "sampling parameters")
        if header.num_history_ids:  # else the counts are not read
            counts = batch.history_counts
            if int(counts.sum()) != header.num_history_ids:
                raise ProtocolError(f"step {step}: history_counts do not add up to num_history_ids")
            held = [0 if row is None else int(self.num_tokens[row]) for row in rows]
            _refuse_gaps(step, seq_ids, "tokens", batch.history_starts.tolist(), counts.tolist(), held, self.max_tokens,
                         empty=True)

    def apply(self, header: StepRequest, batch: StepInputs) -> np.ndarray:
        """Drop the released sequences, apply the deltas; the step's block tables, one row per sequence."""
        for seq_id in header.released_seq_ids:
            row = self.row_of.pop(seq_id, None)
            if row is not None:
                self.free_rows.append(row)
        seq_ids, counts = batch.seq_ids.tolist(), batch.block_counts.tolist()
        rows = [self.row_of.get(seq_id) for seq_id in seq_ids]
        if None in rows or any(counts):
            self._write_blocks(seq_ids, rows, batch.block_starts.tolist(), counts, batch.new_block_ids)
        rows = np.asarray(rows, dtype=np.int64)
        if header.num_new_params or header.released_seq_ids or not np.array_equal(rows, self.step_rows):
            self.step_params = None  # the rows' parameters are gathered again
        self.step_rows = rows
        if header.num_new_params:
            self._write_params(batch)
        if header.num_history_ids:
            self._write_history(rows, batch)
        self.lengths[rows] = batch.block_starts + batch.block_counts  # a table cut back keeps its first entries
        return self.blocks[rows, : int(self.lengths[rows].max())]

    def sampling_rows(self, batch: StepInputs) -> SamplingRows:
        """The sampled rows of the step last applied: each row's parameters are its sequence's; its seed offset
        and history length follow from the position of the token it samples after. ProtocolError for a row whose
        sequence keeps a history that does not reach that token."""
        key = batch.row_seqs.tobytes()
        if self.step_params is None or self.step_params[0] != key:  # a decode batch repeats its rows: gathered once
            rows = self.step_rows[batch.row_seqs]
            params = {name: array[rows] for name, array in self.params.items()}
            self.step_params = (key, rows, params, rows * self.max_tokens)
        _, rows, params, history_starts = self.step_params
        keeps, seeds, prompt_lens = params["keeps_history"], params["seeds"], params["prompt_lens"]
        history_lens = seed_offsets = np.zeros(len(rows), dtype=np.int64)  # read only where a row keeps / is seeded
        if keeps.any() or (seeds != NO_SEED).any():
            lengths = batch.positions[batch.logits_indices] + 1  # tokens up to and with the one sampled after
            history_lens = np.where(keeps, lengths, 0)
            if (history_lens > self.num_tokens[rows]).any():
                raise ProtocolError("a sampled row's sequence keeps a history that does not reach the row's token")
            seed_offsets = (params["sample_indexes"] + batch.row_samples) * SEED_STRIDE + lengths - prompt_lens
        return SamplingRows(
            **{name: params[name] for name in ROW_PARAM_FIELDS},
            seed_offsets=seed_offsets,
            history_starts=history_starts,
            history_lens=history_lens,
            history_prompt_lens=prompt_lens,
            num_suppress=batch.num_suppress,
            history=self.tokens.reshape(-1),
            suppress_ids=batch.suppress_ids,
        )

    def _write_blocks(self, seq_ids: list[int], rows: list, starts: list[int], counts: list[int],
                      new_ids: np.ndarray) -> None:
        """Give new sequences a row and write every non-empty delta (fills `rows` in place)."""
        offset = 0
        for index, (seq_id, start, count) in enumerate(zip(seq_ids, starts, counts)):
            if rows[index] is None:
                rows[index] = self.row_of[seq_id] = self._take_row()
            row = rows[index]
            if count:
                self.blocks[row, start : start + count] = new_ids[offset : offset + count]
            offset += count

    def _write_params(self, batch: StepInputs) -> None:
        new = batch.params
        rows = [self.row_of[seq_id] for seq_id in new.param_seq_ids.tolist()]
        for name in PARAM_NAMES:
            self.params[name][rows] = getattr(new, name)

    def _write_history(self, rows: np.ndarray, batch: StepInputs) -> None:
        counts, starts, ids = batch.history_counts, batch.history_starts, batch.history_ids
        if counts.max() == 1:  # decode steps: one token each, in one scatter
            sent = counts == 1
            self.tokens[rows[sent], starts[sent]] = ids
            self.num_tokens[rows[sent]] = starts[sent] + 1
            return
        offset = 0
        for index in np.flatnonzero(counts).tolist():
            row, start, count = int(rows[index]), int(starts[index]), int(counts[index])
            self.tokens[row, start : start + count] = ids[offset : offset + count]
            self.num_tokens[row] = start + count  # a history cut back keeps its first tokens
            offset += count

    def _take_row(self) -> int:
        if not self.free_rows:  # more live sequences than rows: double them
            grown = len(self.blocks)
            doubled = (np.concatenate([a, np.zeros_like(a)]) for a in (self.blocks, self.lengths, self.tokens, self.num_tokens))
            self.blocks, self.lengths, self.tokens, self.num_tokens = doubled
            self.params = {name: np.concatenate([a, np.zeros_like(a)]) for name, a in self.params.items()}
            self.free_rows = list(range(2 * grown - 1, grown - 1, -1))
        row = self.free_rows.pop()
        self.num_tokens[row] = 0
        return row


def _refuse_gaps(step: int, seq_ids: list[int], what: str, starts: list[int], counts: list[int], held: list[int],
                 most: int, empty: bool) -> None:
    """ProtocolError naming the first sequence whose delta does not start within what is held, or ends past
    `most`; `empty`: a sequence may send none (else what it holds may not become empty)."""
    for seq_id, start, count, have in zip(seq_ids, starts, counts, held):
        if (empty and not count) or (0 <= start <= have and 0 < start + count <= most):
            continue
        raise ProtocolError(f"step {step}: sequence {seq_id}'s {what} {start}..{start + count} do not follow the "
                            f"{have} held (at most {most})")
