"""Turns a StepPlan into the rows of the shared step arrays and its header."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from llmserve.common.protocol import StepRequest, logits_file_name
from llmserve.common.step_arrays import write_sequence_params
from llmserve.master.scheduler import ScheduledSeq, StepPlan
from llmserve.master.sequence import Sequence
from llmserve.master.structured import fill_draft_masks, fill_mask


def write_step(
    plan: StepPlan,
    arrays: dict[str, np.ndarray],
    block_size: int,
    step_id: int,
    request_id_of: Optional[Callable[[int], str]] = None,
    suppress_width: int = 1,
    draft_width: int = 0,
    mask_width: int = 0,
    masks_follow: bool = False,
) -> StepRequest:
    """Fill the input arrays for `plan` and return the header that describes them.

    With `request_id_of` (seq id -> request id) the header names each sampled row's logits file.
    `draft_width`: the most tokens the agent's draft model proposes per sequence (0 without one).
    `mask_width`: words of a row's token mask (the rows of constrained sequences get theirs).
    `masks_follow`: the step is planned while the one before runs, so the masks wait for its tokens: the header
    says they follow (`late_masks(plan, ...)` makes them once the tokens are in).
    """
    token_pos = num_scored = prompt_num_top = num_new_blocks = num_sample = num_params = num_history = 0
    is_all_greedy = True
    masked_rows: list[int] = []
    for row, item in enumerate(plan.scheduled):
        seq, start, count = item.seq, item.seq.num_computed, item.num_new_tokens
        end = start + count
        blocks = seq.block_ids
        if not seq.on_agents:  # new to the agents: its sampling parameters, once
            _write_params(arrays, num_params, seq)
            num_params += 1
        num_new_blocks += _write_table_delta(arrays, row, seq, num_new_blocks)
        num_history += _write_history_delta(arrays, row, seq, item.draft_ids, end, num_history)
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
        if item.num_rows:
            _write_sample_rows(arrays, num_sample, row, item, token_pos - 1, suppress_width)
            if seq.matcher is not None:
                masked_rows += range(num_sample, num_sample + item.num_rows)
            num_sample += item.num_rows
            is_all_greedy &= seq.params.is_greedy
    if masked_rows and not masks_follow:
        fill_masks(plan, arrays["token_masks"], mask_width)
    copies = plan.block_copies
    arrays["block_copies"][: 2 * len(copies)] = np.asarray(copies, dtype=np.int64).ravel() if copies else []
    return StepRequest(
        step_id=step_id,
        num_tokens=token_pos,
        num_seqs=len(plan.scheduled),
        num_sample=num_sample,
        num_new_blocks=num_new_blocks,
        is_all_greedy=is_all_greedy,
        num_block_copies=len(copies),
        dump_names=None if request_id_of is None else _dump_names(plan, request_id_of),
        num_prompt_positions=num_scored,
        prompt_num_top=prompt_num_top,
        released_seq_ids=plan.released,
        draft_width=draft_width,
        num_new_params=num_params,
        num_history_ids=num_history,
        masked_rows=masked_rows,
        mask_width=mask_width if masked_rows else 0,
        masks_follow=masks_follow and bool(masked_rows),
    )


def late_masks(plan: StepPlan, mask_width: int) -> np.ndarray:
    """The token masks of `plan`'s step, sent with masks_follow, now that the tokens of the step before are in
    (a sequence that ended meanwhile gets any mask: its row's token is dropped)."""
    num_rows = sum(item.num_rows for item in plan.scheduled if item.seq.matcher is not None)
    masks = np.empty(num_rows * mask_width, dtype=np.int32)
    fill_masks(plan, masks, mask_width)
    return masks


def fill_masks(plan: StepPlan, out: np.ndarray, width: int) -> None:
    """The masks of the constrained sequences' sampled rows, in row order (StepRequest.masked_rows), into `out`."""
    at = 0
    for item in plan.scheduled:
        if item.num_rows and item.seq.matcher is not None:
            fill_row_masks(item, out[at : at + item.num_rows * width], width)
            at += item.num_rows * width


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


def _write_params(arrays: dict[str, np.ndarray], at: int, seq: Sequence) -> None:
    """The sampling parameters of a sequence new to the agents (they keep them until it is released)."""
    beam = seq.beam
    write_sequence_params(arrays, at, seq.seq_id, seq.params, seq.num_prompt_tokens, seq.sample_index,
                          0 if beam is None else beam.search.candidates_per_beam)


def _write_history_delta(arrays: dict[str, np.ndarray], row: int, seq: Sequence, drafts: list[int], end: int,
                         at: int) -> int:
    """Row `row`'s history delta when its sequence keeps one (penalties, n-gram bans): its tokens up to `end`
    (the step's last, proposals included) from the first one the agents do not hold right; how many."""
    start = seq.agent_tokens if seq.params.needs_history else end
    arrays["history_starts"][row], arrays["history_counts"][row] = start, end - start
    if end > start:
        tokens = seq.token_ids[start:end] + drafts[: end - len(seq.token_ids)] if drafts else seq.token_ids[start:end]
        if at + len(tokens) > len(arrays["history_ids"]):
            raise ValueError(f"the step's history deltas hold more than {len(arrays['history_ids'])} tokens")
        arrays["history_ids"][at : at + len(tokens)] = tokens
        seq.agent_tokens = min(end, len(seq.token_ids))  # proposals are sent again once accepted
    return end - start


def _write_sample_rows(arrays: dict[str, np.ndarray], at: int, row: int, item: ScheduledSeq, last: int,
                       width: int) -> None:
    """The rows `item` samples: with proposals, a row per verified position, each after the proposed tokens
    before it; else its num_rows samples (forks of one sequence at the end of its prompt) after its last token."""
    count, seq = item.num_rows, item.seq
    rows = slice(at, at + count)
    if item.draft_ids:
        arrays["logits_indices"][rows] = np.arange(last - count + 1, last + 1)
        arrays["row_samples"][rows] = 0
    else:
        arrays["logits_indices"][rows] = last
        arrays["row_samples"][rows] = np.arange(count)
    arrays["row_seqs"][rows] = row
    for index in range(count):
        suppress = seq.suppressed_after(index if item.draft_ids else 0)[:width]
        arrays["num_suppress"][at + index] = len(suppress)
        if suppress:
            arrays["suppress_ids"][(at + index) * width : (at + index) * width + len(suppress)] = suppress


def fill_row_masks(item: ScheduledSeq, out: np.ndarray, width: int) -> None:
    """The allowed tokens of `item`'s rows into `out`, from its sequence's grammar state: its samples all
    follow its last token; with proposals, a verified position's row follows the proposals before it."""
    seq = item.seq
    if seq.is_finished:
        out[:] = -1
        return
    if item.draft_ids:
        fill_draft_masks(seq.matcher, item.draft_ids, out, width, sorted(seq.eos_token_ids))
        return
    fill_mask(seq.matcher, out[:width], sorted(seq.eos_token_ids))
    for offset in range(1, item.num_rows):
        out[offset * width : (offset + 1) * width] = out[:width]


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
