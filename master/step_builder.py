"""Turns a StepPlan into the rows of the shared step arrays and its header."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from llmserve.common.protocol import StepRequest, logits_file_name
from llmserve.common.step_arrays import SampleRow, write_sampling_rows
from llmserve.master.scheduler import ScheduledSeq, StepPlan
from llmserve.master.sequence import Sequence


def write_step(
    plan: StepPlan,
    arrays: dict[str, np.ndarray],
    block_size: int,
    step_id: int,
    request_id_of: Optional[Callable[[int], str]] = None,
    suppress_width: int = 1,
    draft_width: int = 0,
) -> StepRequest:
    """Fill the input arrays for `plan` and return the header that describes them.

    With `request_id_of` (seq id -> request id) the header names each sampled row's logits file.
    `draft_width`: the most tokens the agent's draft model proposes per sequence (0 without one).
    """
    token_pos = num_scored = prompt_num_top = num_new_blocks = 0
    sample_rows: list[SampleRow] = []
    for row, item in enumerate(plan.scheduled):
        seq, start, count = item.seq, item.seq.num_computed, item.num_new_tokens
        end = start + count
        blocks = seq.block_ids
        num_new_blocks += _write_table_delta(arrays, row, seq, num_new_blocks)
        if count == 1:
            arrays["input_ids"][token_pos] = seq.token_ids[start]
            arrays["positions"][token_pos] = start
            arrays["slot_mapping"][token_pos] = blocks[start // block_size] * block_size + start % block_size
        else:
            positions = np.arange(start, end)
            tokens = seq.token_ids[start:] + item.draft_ids if item.draft_ids else seq.token_ids[start:end]
            arrays["input_ids"][token_pos : token_pos + count] = tokens
            arrays["positions"][token_pos : token_pos + count] = positions
            block_ids = np.asarray(blocks, dtype=np.int64)[positions // block_size]
            arrays["slot_mapping"][token_pos : token_pos + count] = block_ids * block_size + positions % block_size
        arrays["query_lens"][row] = count
        arrays["context_lens"][row] = end
        arrays["num_draft_tokens"][row] = len(item.draft_ids)
        arrays["propose_counts"][row] = item.propose_count
        if item.num_scored:
            _write_scored(arrays, num_scored, item, token_pos - start)
            num_scored += item.num_scored
            prompt_num_top = max(prompt_num_top, seq.params.prompt_logprobs)
        token_pos += count
        if item.draft_ids:  # a row per verified position, each after the proposed tokens before it
            first = token_pos - count
            sample_rows += [_sample_row(seq, first + i, 0, item.draft_ids[:i]) for i in range(count)]
        else:
            sample_rows += [_sample_row(seq, token_pos - 1, sample) for sample in range(item.num_rows)]
    copies = plan.block_copies
    arrays["block_copies"][: 2 * len(copies)] = np.asarray(copies, dtype=np.int64).ravel() if copies else []
    is_all_greedy = write_sampling_rows(arrays, sample_rows, suppress_width)
    return StepRequest(
        step_id=step_id,
        num_tokens=token_pos,
        num_seqs=len(plan.scheduled),
        num_sample=len(sample_rows),
        num_new_blocks=num_new_blocks,
        is_all_greedy=is_all_greedy,
        num_block_copies=len(copies),
        dump_names=None if request_id_of is None else _dump_names(plan, request_id_of),
        num_prompt_positions=num_scored,
        prompt_num_top=prompt_num_top,
        released_seq_ids=plan.released,
        draft_width=draft_width,
    )


def _write_table_delta(arrays: dict[str, np.ndarray], row: int, seq: Sequence, at: int) -> int:
    """Row `row`'s block-table delta: the ids from the first one the agents do not hold; how many."""
    start, blocks = seq.agent_blocks, seq.block_ids
    count = len(blocks) - start
    arrays["seq_ids"][row], arrays["block_starts"][row], arrays["block_counts"][row] = seq.seq_id, start, count
    if count == 1:
        arrays["new_block_ids"][at] = blocks[start]
    elif count:
        arrays["new_block_ids"][at : at + count] = blocks[start:]
    seq.agent_blocks, seq.on_agents = len(blocks), True
    return count


def _write_scored(arrays: dict[str, np.ndarray], at: int, item: ScheduledSeq, offset: int) -> None:
    """The prompt positions `item` scores (step token index = position + `offset`) and the tokens after them."""
    first, count = item.first_scored, item.num_scored
    arrays["prompt_positions"][at : at + count] = np.arange(first, first + count) + offset
    arrays["prompt_targets"][at : at + count] = item.seq.token_ids[first + 1 : first + 1 + count]


def _sample_row(seq: Sequence, logits_index: int, sample: int, drafts: list[int] = ()) -> SampleRow:
    """Row `sample` of `seq`: 0 is the sequence itself, later ones the samples it forks into; with `drafts`,
    the row that follows those proposed tokens."""
    beam = seq.beam
    return SampleRow(
        logits_index=logits_index,
        params=seq.params,
        token_ids=seq.token_ids,
        num_prompt_tokens=seq.num_prompt_tokens,
        sample_index=seq.sample_index + sample,
        suppress=seq.suppressed_after(len(drafts)),
        beam_candidates=0 if beam is None else beam.search.candidates_per_beam,
        drafts=drafts,
    )


def _dump_names(plan: StepPlan, request_id_of: Callable[[int], str]) -> list[str]:
    """File names of the sampled rows, in row order; the position is the index of the token being chosen."""
    names = []
    for item in plan.scheduled:
        for row in range(item.num_rows):
            sample, position = (0, row) if item.draft_ids else (row, 0)  # verified positions follow each other
            request_id = request_id_of(item.seq.seq_id)
            if item.seq.sample_index + sample:
                request_id = f"{request_id}.{item.seq.sample_index + sample}"
            names.append(logits_file_name(request_id, item.seq.num_output_tokens + position))
    return names
