"""Builds a sampler's input rows the way the agent does: each row's sequence arrives with its SamplingParams and
history as a step's deltas, and the agent's sequence table gives the SamplingRows."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from llmserve.agent.sequence_table import SequenceTable
from llmserve.common.protocol import StepRequest
from llmserve.common.sampling import SamplingParams
from llmserve.common.step_arrays import StepCapacity, input_layout, step_inputs, write_sequence_params

SUPPRESS_WIDTH = 8


def make_rows(
    params: Sequence[SamplingParams],
    histories: Optional[Sequence[Sequence[int]]] = None,
    prompt_lens: Optional[Sequence[int]] = None,
    suppress: Optional[Sequence[Sequence[int]]] = None,
    sample_indexes: Optional[Sequence[int]] = None,
    beam_candidates: Optional[Sequence[int]] = None,
):
    """(SamplingRows, is_all_greedy) for one row per params, each sampling after the last of its history (prompt
    + output token ids)."""
    num_rows = len(params)
    histories = [list(h) for h in histories] if histories else [[0]] * num_rows
    longest = max(len(h) for h in histories)
    capacity = StepCapacity(max_num_tokens=num_rows, max_num_seqs=num_rows, max_blocks_per_seq=1,
                            history_capacity=sum(len(h) for h in histories), suppress_width=SUPPRESS_WIDTH)
    arrays = {name: np.zeros(n, dtype) for name, dtype, n in input_layout(capacity)}
    num_history = 0
    for row, (p, history) in enumerate(zip(params, histories)):
        write_sequence_params(arrays, row, row, p, prompt_lens[row] if prompt_lens else len(history),
                              sample_indexes[row] if sample_indexes else 0,
                              beam_candidates[row] if beam_candidates else 0)
        arrays["seq_ids"][row], arrays["block_counts"][row], arrays["row_seqs"][row] = row, 1, row
        arrays["positions"][row], arrays["logits_indices"][row] = len(history) - 1, row
        if p.needs_history:
            arrays["history_counts"][row] = len(history)
            arrays["history_ids"][num_history : num_history + len(history)] = history
            num_history += len(history)
        ids = tuple(suppress[row]) if suppress else ()
        arrays["num_suppress"][row] = len(ids)
        arrays["suppress_ids"][row * SUPPRESS_WIDTH : row * SUPPRESS_WIDTH + len(ids)] = ids
    header = StepRequest(step_id=0, num_tokens=num_rows, num_seqs=num_rows, num_sample=num_rows,
                         num_new_blocks=num_rows, is_all_greedy=all(p.is_greedy for p in params),
                         num_new_params=num_rows, num_history_ids=num_history)
    batch = step_inputs(arrays, header, SUPPRESS_WIDTH)
    table = SequenceTable(max_blocks_per_seq=1, max_tokens=longest, num_rows=num_rows)
    table.check(header, batch)
    table.apply(header, batch)
    return table.sampling_rows(batch), header.is_all_greedy
