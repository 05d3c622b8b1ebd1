"""A step whose counts or indices do not fit is refused before it reaches the model; a real step passes."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from llmserve.agent.step_check import PoolShape, check_header, check_inputs
from llmserve.common.protocol import ProtocolError, StepRequest
from llmserve.common.sampling import SamplingParams
from llmserve.common.step_arrays import StepCapacity, input_layout, step_inputs, write_sequence_params

CAPACITY = StepCapacity(max_num_tokens=16, max_num_seqs=4, max_blocks_per_seq=4, history_capacity=32, topk_width=2, suppress_width=2)
POOL = PoolShape(num_blocks=8, block_size=4, vocab_size=100)
HEADER = StepRequest(step_id=3, num_tokens=6, num_seqs=2, num_sample=2, num_new_blocks=3, is_all_greedy=False,
                     num_new_params=2, num_history_ids=3)


def two_sequence_step() -> dict[str, np.ndarray]:
    """A 5-token prefill in blocks (3, 1) and a decode at position 2 of block 6, the second with a penalty."""
    arrays = {name: np.zeros(n, dtype) for name, dtype, n in input_layout(CAPACITY)}
    arrays["input_ids"][:6] = [11, 12, 13, 14, 15, 42]
    arrays["positions"][:6] = [0, 1, 2, 3, 4, 2]
    arrays["slot_mapping"][:6] = [12, 13, 14, 15, 4, 26]
    arrays["query_lens"][:2] = [5, 1]
    arrays["context_lens"][:2] = [5, 3]
    arrays["seq_ids"][:2], arrays["block_starts"][:2], arrays["block_counts"][:2] = [10, 11], [0, 0], [2, 1]
    arrays["new_block_ids"][:3] = [3, 1, 6]
    write_sequence_params(arrays, 0, 10, SamplingParams(), 5)
    write_sequence_params(arrays, 1, 11, SamplingParams(repetition_penalty=1.2), 2)
    arrays["history_starts"][:2], arrays["history_counts"][:2], arrays["history_ids"][:3] = [5, 0], [0, 3], [7, 8, 42]
    arrays["logits_indices"][:2], arrays["row_seqs"][:2] = [4, 5], [0, 1]
    arrays["num_suppress"][1], arrays["suppress_ids"][2] = 1, 2
    return arrays


def check(arrays: dict[str, np.ndarray], header: StepRequest = HEADER) -> None:
    check_header(header, CAPACITY)
    check_inputs(step_inputs(arrays, header, CAPACITY.suppress_width), POOL)


def test_a_real_step_passes():
    check(two_sequence_step())


@pytest.mark.parametrize("field, value", [
    ("num_tokens", 17), ("num_seqs", 5), ("num_sample", 5), ("num_new_blocks", 17), ("num_block_copies", 5),
    ("num_tokens", -1), ("num_seqs", 0), ("num_tokens", 1),
])
def test_counts_beyond_the_arrays_are_refused(field, value):
    with pytest.raises(ProtocolError):
        check_header(dataclasses.replace(HEADER, **{field: value}), CAPACITY)


@pytest.mark.parametrize("names", [["a.npy"], ["../x.npy", "b.npy"], ["a/b.npy", "c.npy"]])
def test_dump_names_must_be_one_plain_name_per_row(names):
    with pytest.raises(ProtocolError, match="dump_names"):
        check_header(dataclasses.replace(HEADER, dump_names=names), CAPACITY)


@pytest.mark.parametrize("name, index, value", [
    ("slot_mapping", 5, -1),  # would wrap to the pool's last slot: another sequence's KV
    ("slot_mapping", 0, 32),
    ("new_block_ids", 2, -3),
    ("new_block_ids", 1, 8),
])
def test_indices_outside_the_kv_pool_are_refused(name, index, value):
    arrays = two_sequence_step()
    arrays[name][index] = value
    with pytest.raises(ProtocolError, match=name):
        check(arrays)


def test_block_copies_stay_in_the_pool():
    arrays = two_sequence_step()
    arrays["block_copies"][:2] = [1, -1]
    with pytest.raises(ProtocolError, match="block_copies"):
        check(arrays, dataclasses.replace(HEADER, num_block_copies=1))


@pytest.mark.parametrize("change, problem", [
    (dict(masked_rows=[0, 0], mask_width=4), "masked_rows"),
    (dict(masked_rows=[2], mask_width=4), "masked_rows"),
    (dict(masked_rows=[1], mask_width=3), "masked_rows"),
    (dict(masks_follow=True), "no row is masked"),
])
def test_masked_rows_must_be_sampled_rows_of_the_agreed_width(change, problem):
    capacity = dataclasses.replace(CAPACITY, mask_width=4)
    check_header(dataclasses.replace(HEADER, masked_rows=[1, 0], mask_width=4, masks_follow=True), capacity)
    with pytest.raises(ProtocolError, match=problem):
        check_header(dataclasses.replace(HEADER, **change), capacity)
