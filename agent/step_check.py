"""Checks that a step fits the arrays and the KV pool before the agent runs it.

A step that fails here is answered with an error for that step; the agent keeps
serving. The header is checked against the capacity in Python; of the arrays,
only what numpy and torch would not refuse on their own: negative indices wrap
around silently, and a write through a wrapped slot would corrupt another
sequence's KV blocks (a few microseconds at decode batch sizes).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmserve.common.protocol import ProtocolError, StepRequest, is_safe_file_name
from llmserve.common.step_arrays import STEP_BUFFERS, StepCapacity, StepInputs


@dataclass(frozen=True)
class PoolShape:
    """What the indices of a step may address on this agent."""

    num_blocks: int
    block_size: int
    vocab_size: int


def check_header(header: StepRequest, capacity: StepCapacity) -> None:
    """Raise ProtocolError when the header's counts do not fit the step arrays."""
    counts = (
        ("num_tokens", header.num_tokens, capacity.max_num_tokens),
        ("num_seqs", header.num_seqs, capacity.max_num_seqs),
        ("num_sample", header.num_sample, capacity.num_rows),
        ("num_new_blocks", header.num_new_blocks, capacity.max_num_seqs * capacity.max_blocks_per_seq),
        ("num_block_copies", header.num_block_copies, capacity.max_num_seqs),
        ("num_prompt_positions", header.num_prompt_positions, header.num_tokens),
        ("prompt_num_top", header.prompt_num_top, capacity.topk_width),
        ("draft_width", header.draft_width, capacity.draft_width),
        ("buffer", header.buffer, STEP_BUFFERS - 1),
    )
    for name, value, most in counts:
        if not 0 <= value <= most:
            raise ProtocolError(f"step {header.step_id}: {name} {value} is outside 0..{most}")
    if header.num_seqs == 0 or header.num_tokens < header.num_seqs:
        raise ProtocolError(f"step {header.step_id}: {header.num_tokens} tokens for {header.num_seqs} sequences")
    masked = header.masked_rows
    if masked and (header.mask_width != capacity.mask_width or len(masked) > header.num_sample
                   or any(not 0 <= row < header.num_sample for row in masked) or len(set(masked)) != len(masked)):
        raise ProtocolError(f"step {header.step_id}: masked_rows must be distinct sampled rows, with mask_width "
                            f"{capacity.mask_width}")
    if header.masks_follow and not masked:
        raise ProtocolError(f"step {header.step_id}: masks follow, but no row is masked")
    names = header.dump_names
    if names is not None and (len(names) != header.num_sample or not all(map(is_safe_file_name, names))):
        raise ProtocolError(f"step {header.step_id}: dump_names must be one plain file name per sampled row")


def check_inputs(batch: StepInputs, pool: PoolShape) -> None:
    """Raise ProtocolError when the step's block indices point outside the KV pool.

    torch refuses other out-of-range indices by itself (token ids); what it takes silently
    is a negative index, which wraps: through the slot mapping, the block copies and the block tables' new ids a
    step would write or read another sequence's KV blocks, and through a sampled row's indices sample with
    another row's logits or parameters.
    """
    _within("slot_mapping", batch.slot_mapping, pool.num_blocks * pool.block_size - 1)
    _within("new_block_ids", batch.new_block_ids, pool.num_blocks - 1)
    _within("block_copies", batch.block_copies, pool.num_blocks - 1)
    _within("prompt_positions", batch.prompt_positions, len(batch.input_ids) - 1)
    _within("prompt_targets", batch.prompt_targets, pool.vocab_size - 1)
    _within("positions", batch.positions, MAX_POSITION)  # a draft model addresses its blocks through them
    _within("logits_indices", batch.logits_indices, len(batch.input_ids) - 1)  # a sampled row's position too
    _within("row_seqs", batch.row_seqs, len(batch.seq_ids) - 1)  # a row's parameters are its sequence's
    _within("row_samples", batch.row_samples, MAX_POSITION)
    _within("history_ids", batch.history_ids, pool.vocab_size - 1)
    if not ((batch.num_draft_tokens >= 0) & (batch.num_draft_tokens < batch.query_lens)).all():
        raise ProtocolError("num_draft_tokens: each sequence's proposals are fewer than its tokens")


MAX_POSITION = 2**31 - 1


def _within(name: str, values: np.ndarray, high: int) -> None:
    # Small arrays (decode steps) in Python: a numpy reduction costs ~20 us with the caches cold after a forward.
    if values.size <= SMALL:
        items = values.ravel().tolist()
        if items and (min(items) < 0 or max(items) > high):
            raise ProtocolError(f"{name}: values from {min(items)} to {max(items)} are outside 0..{high}")
    elif values.view(UNSIGNED[values.dtype.itemsize]).max() > high:  # one reduction: negative values are huge
        raise ProtocolError(f"{name}: values from {int(values.min())} to {int(values.max())} are outside 0..{high}")


SMALL = 256
UNSIGNED = {4: np.uint32, 8: np.uint64}
