"""Turns a StepPlan into the rows of the shared step arrays and its header."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from common.protocol import StepRequest, logits_file_name
from common.step_arrays import NO_SEED
from master.scheduler import StepPlan


def write_step(
    plan: StepPlan,
    arrays: dict[str, np.ndarray],
    block_size: int,
    step_id: int,
    request_id_of: Optional[Callable[[int], str]] = None,
) -> StepRequest:
    """Fill the input arrays for `plan` and return the header that describes them.

    With `request_id_of` (seq id -> request id) the header names each sampled row's logits file.
    """
    width = max(len(item.seq.block_ids) for item in plan.scheduled)
    block_tables = arrays["block_tables"][: len(plan.scheduled) * width].reshape(len(plan.scheduled), width)
    token_pos = 0
    num_sample = 0
    is_all_greedy = True
    for row, item in enumerate(plan.scheduled):
        seq, start, count = item.seq, item.seq.num_computed, item.num_new_tokens
        end = start + count
        blocks = seq.block_ids
        block_tables[row, : len(blocks)] = blocks
        if count == 1:
            arrays["input_ids"][token_pos] = seq.token_ids[start]
            arrays["positions"][token_pos] = start
            arrays["slot_mapping"][token_pos] = blocks[start // block_size] * block_size + start % block_size
        else:
            positions = np.arange(start, end)
            arrays["input_ids"][token_pos : token_pos + count] = seq.token_ids[start:end]
            arrays["positions"][token_pos : token_pos + count] = positions
            block_ids = np.asarray(blocks, dtype=np.int64)[positions // block_size]
            arrays["slot_mapping"][token_pos : token_pos + count] = block_ids * block_size + positions % block_size
        arrays["query_lens"][row] = count
        arrays["context_lens"][row] = end
        token_pos += count
        if item.samples:
            _write_sampling_row(arrays, num_sample, seq, token_pos - 1)
            is_all_greedy = is_all_greedy and seq.params.is_greedy
            num_sample += 1
    return StepRequest(
        step_id=step_id,
        num_tokens=token_pos,
        num_seqs=len(plan.scheduled),
        num_sample=num_sample,
        block_table_width=width,
        is_all_greedy=is_all_greedy,
        dump_names=None if request_id_of is None else _dump_names(plan, request_id_of),
    )


def _dump_names(plan: StepPlan, request_id_of: Callable[[int], str]) -> list[str]:
    """File names of the sampled rows, in row order; the position is the index of the token being chosen."""
    return [
        logits_file_name(request_id_of(item.seq.seq_id), item.seq.num_output_tokens)
        for item in plan.scheduled
        if item.samples
    ]


def _write_sampling_row(arrays: dict[str, np.ndarray], row: int, seq, token_index: int) -> None:
    params = seq.params
    arrays["logits_indices"][row] = token_index
    arrays["temperature"][row] = params.agent_temperature
    arrays["top_k"][row] = params.top_k
    arrays["top_p"][row] = params.top_p
    arrays["seeds"][row] = NO_SEED if params.seed is None else params.seed
    arrays["seed_offsets"][row] = seq.num_output_tokens
