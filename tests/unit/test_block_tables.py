"""The agent's block tables follow the master's through the deltas of each step, and refuse deltas that do not fit."""
from __future__ import annotations

import numpy as np
import pytest

from llmserve.agent.block_tables import BlockTables
from llmserve.common.protocol import ProtocolError, StepRequest
from llmserve.common.step_arrays import StepInputs


def step(deltas: list[tuple[int, int, list[int]]], released: tuple[int, ...] = ()) -> tuple[StepRequest, StepInputs]:
    """A step's header and the block-delta views: (seq id, first index sent, ids) per sequence."""
    new_ids = [block for _, _, ids in deltas for block in ids]
    header = StepRequest(step_id=1, num_tokens=len(deltas), num_seqs=len(deltas), num_sample=0,
                         num_new_blocks=len(new_ids), is_all_greedy=True, released_seq_ids=list(released))
    batch = StepInputs(*[np.zeros(0)] * 5, seq_ids=np.array([d[0] for d in deltas]),
                       block_starts=np.array([d[1] for d in deltas], dtype=np.int32),
                       block_counts=np.array([len(d[2]) for d in deltas], dtype=np.int32),
                       new_block_ids=np.array(new_ids, dtype=np.int32), block_copies=np.zeros((0, 2)),
                       num_draft_tokens=np.zeros(len(deltas)), propose_counts=np.zeros(len(deltas)),
                       logits_indices=np.zeros(0), prompt_positions=np.zeros(0), prompt_targets=np.zeros(0))
    return header, batch


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
