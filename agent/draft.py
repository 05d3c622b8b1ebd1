"""A speculative draft model on the agent: after each step it proposes each asking sequence's next tokens.

The draft keeps a paged KV pool of its own under the target's block ids (same count, same block tables), so
the master's tables and copy-on-write serve both. After the target's step has sampled, the draft reads
every sequence's tokens that are now settled: the step's tokens up to the last accepted proposal (a
prefill chunk whole), and for a sequence asked for proposals the token just sampled, at the same positions
as the target (a sequence whose proposals pause is skipped: its draft KV goes stale, which can only lower
the acceptance later). Then it proposes greedily, one token per pass, as many as each sequence asked for; the
master verifies them in the next step (master/speculative.py). A greedy proposal is a deterministic
function of the tokens, which keeps the verification exact. KV the draft writes for proposals the target
rejects is rewritten when those positions are settled later.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from llmserve.agent.kv_cache import allocate_kv_cache, copy_blocks
from llmserve.agent.model_runner import ModelRunner
from llmserve.common.step_arrays import StepInputs


class DraftModel:
    """The draft's model runner and the per-step proposal passes."""

    def __init__(self, runner: ModelRunner, block_size: int):
        self.runner = runner
        self.block_size = block_size

    def allocate(self, num_blocks: int) -> None:
        """A pool of `num_blocks` blocks, as many as the target's (the same ids address both)."""
        config = self.runner.model.config
        self.runner.num_blocks = num_blocks
        self.runner.kv_caches = allocate_kv_cache(config.num_layers, self.runner.attention.pools(num_blocks),
                                                  self.runner.device)

    @property
    def kv_cache_bytes(self) -> int:
        return self.runner.num_blocks * self.runner.block_bytes

    def copy_blocks(self, pairs: np.ndarray) -> None:
        """The step's copy-on-write copies, in the draft's pool too."""
        if len(pairs):
            copy_blocks(self.runner.kv_caches, torch.from_numpy(pairs).to(self.runner.device))

    def propose(self, batch: StepInputs, block_tables: np.ndarray, table_lengths: np.ndarray,
                sampled_ids: np.ndarray, out: np.ndarray) -> None:
        """Read the step's settled tokens, then write each asking sequence's proposals into its row of `out`
        ([sequences, width], -1 past its proposals). `sampled_ids`: the step's sampled rows, in order."""
        out.fill(-1)
        query_lens = batch.query_lens.astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(query_lens)[:-1]])  # each sequence's first token in the step
        row_of = np.searchsorted(starts, batch.logits_indices, side="right") - 1  # sampled row -> its sequence
        first_row = np.searchsorted(row_of, np.arange(len(query_lens)))  # each sequence's first sampled row
        num_rows = np.bincount(row_of, minlength=len(query_lens))
        ids, positions, seqs, new_tokens = [], [], [], {}
        capacity = table_lengths * self.block_size  # positions each table holds
        wanted = np.clip(batch.propose_counts, 0, out.shape[1]).astype(np.int64)
        for seq in range(len(query_lens)):
            if batch.propose_counts[seq] < 0:  # not read: it never speculates, or its proposals pause
                continue
            start, count, drafted = int(starts[seq]), int(query_lens[seq]), int(batch.num_draft_tokens[seq])
            settled = count - drafted
            if drafted:  # the proposals the step's samples accepted are settled too
                proposals = batch.input_ids[start + settled : start + count]
                samples = sampled_ids[first_row[seq] : first_row[seq] + drafted]
                mismatch = np.flatnonzero(proposals != samples)
                settled += drafted if len(mismatch) == 0 else int(mismatch[0])
            first_position = int(batch.positions[start])
            tokens = batch.input_ids[start : start + settled].tolist()
            if wanted[seq] and num_rows[seq]:
                new_token = int(sampled_ids[first_row[seq] + settled - (count - drafted)])
                new_position = first_position + settled
                wanted[seq] = min(wanted[seq], capacity[seq] - new_position)  # the draft writes KV up to there
                if wanted[seq] > 0:
                    tokens.append(new_token)
                    new_tokens[seq] = new_position
            else:
                wanted[seq] = 0
            ids += tokens
            positions += range(first_position, first_position + len(tokens))
            seqs += [seq] * len(tokens)
        asking = [seq for seq in range(len(query_lens)) if wanted[seq] > 0]
        if not ids:
            return
        logits = self._forward(np.array(ids), np.array(positions), np.array(seqs), block_tables, asking)
        if not asking:
            return
        out[asking, 0] = logits.argmax(dim=-1).cpu().numpy()
        for step in range(1, int(wanted.max())):
            asking = [seq for seq in asking if wanted[seq] > step]
            if not asking:
                break
            step_positions = np.array([new_tokens[seq] + step for seq in asking])
            previous = out[asking, step - 1].astype(np.int64)
            logits = self._forward(previous, step_positions, np.array(asking), block_tables, asking)
            out[asking, step] = logits.argmax(dim=-1).cpu().numpy()

    def _forward(self, ids: np.ndarray, positions: np.ndarray, seqs: np.ndarray, block_tables: np.ndarray,
                 last_of: list[int]) -> Optional[torch.Tensor]:
        """The draft over tokens `ids` at `positions` of sequences `seqs` (grouped, in order); the logits of
        the last token of each sequence in `last_of`."""
        order = np.unique(seqs, return_index=True)
        present, first = order[0], order[1]
        query_lens = np.diff(np.append(first, len(seqs))).astype(np.int32)
        context_lens = (positions[np.append(first[1:], len(seqs)) - 1] + 1).astype(np.int32)
        tables = block_tables[present]
        slots = tables[np.searchsorted(present, seqs), positions // self.block_size].astype(np.int64)
        slot_mapping = slots * self.block_size + positions % self.block_size
        hidden = self.runner.forward(ids.astype(np.int64), positions.astype(np.int64), slot_mapping, query_lens,
                                     context_lens, np.ascontiguousarray(tables))
        if not last_of:
            return None
        ends = np.append(first[1:], len(seqs)) - 1  # the last token of each present sequence
        return self.runner.logits(hidden, ends[np.searchsorted(present, last_of)].astype(np.int64))
