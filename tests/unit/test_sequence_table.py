"""The agent's sequence table follows the master's sequences through the deltas of each step (block tables,
sampling parameters sent once, token histories), and refuses deltas that do not fit before anything changes."""
from __future__ import annotations

import numpy as np
import pytest

from llmserve.agent.sequence_table import SequenceTable
from llmserve.common.protocol import ProtocolError, StepRequest
from llmserve.common.sampling import SamplingParams
from llmserve.common.step_arrays import (
    SEED_STRIDE, StepCapacity, StepInputs, input_layout, step_inputs, write_sequence_params,
)

CAPACITY = StepCapacity(max_num_tokens=16, max_num_seqs=8, max_blocks_per_seq=8, history_capacity=64)


def BlockTables(max_blocks_per_seq: int, num_rows: int = 64) -> SequenceTable:
    """A sequence table holding up to 32 tokens per sequence."""
    return SequenceTable(max_blocks_per_seq, max_tokens=32, num_rows=num_rows)


def step(deltas: list[tuple[int, int, list[int]]], released: tuple[int, ...] = (), params: dict = None,
         history: dict = None, sampled: list[tuple[int, int, int]] = ()) -> tuple[StepRequest, StepInputs]:
    """A step's header and views: (seq id, first block index sent, block ids) per sequence, one token each;
    `params` {seq id: SamplingParams} for the sequences it brings (default: every sequence whose first block
    index is 0); `history` {seq id: (first position, ids)}; `sampled` (step row, position, sample) per row."""
    arrays = {name: np.zeros(n, dtype) for name, dtype, n in input_layout(CAPACITY)}
    new_ids = [block for _, _, ids in deltas for block in ids]
    if params is None:
        params = {seq_id: SamplingParams() for seq_id, start, _ in deltas if start == 0}
    for at, (seq_id, p) in enumerate(params.items()):
        write_sequence_params(arrays, at, seq_id, p, prompt_len=2)
    history_ids = []
    for row, (seq_id, start, ids) in enumerate(deltas):
        arrays["seq_ids"][row], arrays["block_starts"][row], arrays["block_counts"][row] = seq_id, start, len(ids)
        first, tokens = (history or {}).get(seq_id, (0, []))
        arrays["history_starts"][row], arrays["history_counts"][row] = first, len(tokens)
        history_ids += tokens
    arrays["new_block_ids"][: len(new_ids)] = new_ids
    arrays["history_ids"][: len(history_ids)] = history_ids
    for index, (row, position, sample) in enumerate(sampled):
        arrays["positions"][index], arrays["logits_indices"][index] = position, index
        arrays["row_seqs"][index], arrays["row_samples"][index] = row, sample
    header = StepRequest(step_id=1, num_tokens=max(len(deltas), len(sampled)), num_seqs=len(deltas),
                         num_sample=len(sampled), num_new_blocks=len(new_ids), is_all_greedy=True,
                         released_seq_ids=list(released), num_new_params=len(params),
                         num_history_ids=len(history_ids))
    return header, step_inputs(arrays, header, CAPACITY.suppress_width)


def test_new_blocks_copy_on_write_and_released_tables_follow_the_deltas():
    tables = BlockTables(max_blocks_per_seq=8)
    header, batch = step([(1, 0, [4, 5]), (2, 0, [6])])
    tables.check(header, batch)
    assert tables.apply(header, batch).tolist() == [[4, 5], [6, 0]]
    header, batch = step([(1, 2, [7]), (2, 1, [])])  # a new block for 1; 2 unchanged (a decode within its block)
    tables.check(header, batch)
    assert tables.apply(header, batch).tolist() == [[4, 5, 7], [6, 0, 0]]
    header, batch = step([(1, 1, [9, 7])])  # copy-on-write replaced block 5 at index 1
    tables.check(header, batch)
    assert tables.apply(header, batch).tolist() == [[4, 9, 7]] and tables.held(2) == [6]
    header, batch = step([(2, 0, [3])], released=(1, 2))  # 1 finished; 2 preempted and back with a new table
    tables.check(header, batch)
    assert tables.apply(header, batch).tolist() == [[3]] and tables.held(1) == [] and tables.held(2) == [3]


@pytest.mark.parametrize("deltas, released, problem", [
    ([(1, 3, [8])], (), "do not follow the 2 held"),  # a gap after the held entries
    ([(1, 1, [8])], (1,), "do not follow the 0 held"),  # released in this very step: nothing held any more
    ([(5, 0, [1] * 9)], (), "at most 8"),
    ([(1, 2, [8]), (1, 2, [9])], (), "appears twice"),
    ([(7, 0, [])], (), "do not follow"),  # a sequence with no table at all
    ([(1, 0, [])], (), "do not follow"),  # a table may not become empty (only a release drops it)
])
def test_deltas_that_do_not_fit_the_held_tables_are_refused_before_anything_changes(deltas, released, problem):
    tables = BlockTables(max_blocks_per_seq=8)
    header, batch = step([(1, 0, [4, 5])])
    tables.apply(header, batch)
    header, batch = step(deltas, released)
    with pytest.raises(ProtocolError, match=problem):
        tables.check(header, batch)
    assert tables.held(1) == [4, 5]


def test_a_table_cut_back_keeps_its_first_entries_and_grows_again():
    tables = BlockTables(max_blocks_per_seq=8)
    header, batch = step([(1, 0, [4, 5, 6]), (2, 0, [7, 8])])
    tables.apply(header, batch)
    header, batch = step([(1, 1, []), (2, 2, [])])  # the master took back 1's blocks past index 1 (rejected proposals')
    tables.check(header, batch)
    assert tables.apply(header, batch)[1].tolist() == [7, 8]  # 1's row past its one entry is never read
    assert tables.held(1) == [4] and tables.held(2) == [7, 8]
    header, batch = step([(1, 1, [9])])
    tables.check(header, batch)
    assert tables.apply(header, batch).tolist() == [[4, 9]]


def test_more_live_sequences_than_rows_grow_the_table():
    tables = BlockTables(max_blocks_per_seq=4, num_rows=2)
    header, batch = step([(seq_id, 0, [seq_id, seq_id + 10]) for seq_id in range(5)])
    tables.check(header, batch)
    assert tables.apply(header, batch).tolist() == [[i, i + 10] for i in range(5)]


def test_block_counts_must_add_up_to_the_header():
    tables = BlockTables(max_blocks_per_seq=8)
    header, batch = step([(1, 0, [4, 5])])
    header.num_new_blocks = 3
    with pytest.raises(ProtocolError, match="num_new_blocks"):
        tables.check(header, batch)


def test_sampling_parameters_come_once_and_stay_until_the_sequence_is_released():
    table = BlockTables(max_blocks_per_seq=8)
    plain, penalised = SamplingParams(do_sample=True, temperature=0.5), SamplingParams(do_sample=True, repetition_penalty=1.3,
                                                                                       top_k=5, seed=7)
    header, batch = step([(1, 0, [4]), (2, 0, [5])], params={1: plain, 2: penalised},
                         history={2: (0, [9, 8, 7])}, sampled=[(0, 0, 0), (1, 2, 0), (1, 2, 1)])
    table.check(header, batch)
    table.apply(header, batch)
    rows = table.sampling_rows(batch)
    assert rows.temperature.tolist() == [0.5, 1.0, 1.0] and rows.top_k.tolist() == [0, 5, 5]
    assert rows.seeds.tolist()[1:] == [7, 7] and rows.repetition_penalty[1] == pytest.approx(1.3)
    # tokens generated so far (3 held, prompt 2) and the sample index fold into each row's seed offset
    assert rows.seed_offsets.tolist()[1:] == [1, SEED_STRIDE + 1]
    assert rows.history_lens.tolist() == [0, 3, 3] and table.history(2) == [9, 8, 7]
    header, batch = step([(2, 1, [])], params={}, history={2: (3, [6])}, sampled=[(0, 3, 0)])  # a decode step
    table.check(header, batch)
    table.apply(header, batch)
    rows = table.sampling_rows(batch)
    assert rows.top_k.tolist() == [5] and rows.history_lens.tolist() == [4] and table.history(2) == [9, 8, 7, 6]
    history = rows.history[rows.history_starts[0] : rows.history_starts[0] + 4]
    assert history.tolist() == [9, 8, 7, 6]
    header, batch = step([(2, 0, [3])], released=(2,), params={})  # preempted and back: parameters again
    with pytest.raises(ProtocolError, match="without sampling parameters"):
        table.check(header, batch)


@pytest.mark.parametrize("kwargs, problem", [
    ({"params": {3: SamplingParams()}}, "not in the step"),
    ({"history": {2: (4, [1])}}, "do not follow the 3 held"),  # a gap after the held tokens
    ({"history": {2: (30, [1, 2, 3])}}, "at most 32"),
])
def test_parameter_and_history_deltas_that_do_not_fit_are_refused(kwargs, problem):
    table = BlockTables(max_blocks_per_seq=8)
    header, batch = step([(2, 0, [5])], params={2: SamplingParams(presence_penalty=0.5)}, history={2: (0, [9, 8, 7])})
    table.apply(header, batch)
    header, batch = step([(2, 1, [])], **{"params": {}, **kwargs})
    with pytest.raises(ProtocolError, match=problem):
        table.check(header, batch)
    assert table.history(2) == [9, 8, 7]


def test_a_row_whose_history_does_not_reach_its_token_is_refused():
    table = BlockTables(max_blocks_per_seq=8)
    header, batch = step([(2, 0, [5])], params={2: SamplingParams(frequency_penalty=0.5)}, history={2: (0, [9, 8])},
                         sampled=[(0, 4, 0)])  # samples after position 4, but 2 tokens are held
    table.check(header, batch)
    table.apply(header, batch)
    with pytest.raises(ProtocolError, match="does not reach"):
        table.sampling_rows(batch)
