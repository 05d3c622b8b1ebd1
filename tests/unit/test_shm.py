"""Shared-memory segments: what the master writes the agent reads, and unlink leaves nothing."""
from __future__ import annotations

import os

import numpy as np

from llmserve.common.shm import SharedArrays
from llmserve.common.step_arrays import StepCapacity, input_layout


def test_attached_views_see_the_owners_writes_and_unlink_removes_the_segment():
    layout = input_layout(StepCapacity(max_num_tokens=32, max_num_seqs=4, max_blocks_per_seq=8))
    owner = SharedArrays.create("test", layout)
    try:
        reader = SharedArrays.attach(owner.name, layout)
        owner.arrays["input_ids"][:3] = [5, 6, 7]
        owner.arrays["top_p"][0] = 0.5
        assert reader.arrays["input_ids"][:3].tolist() == [5, 6, 7]
        assert reader.arrays["top_p"][0] == np.float32(0.5)
        reader.close()
        assert os.path.exists(f"/dev/shm/{owner.name}")
    finally:
        owner.close()
    assert not os.path.exists(f"/dev/shm/{owner.name}")


def test_arrays_are_aligned_and_disjoint():
    layout = input_layout(StepCapacity(max_num_tokens=7, max_num_seqs=3, max_blocks_per_seq=5))
    segment = SharedArrays.create("test", layout)
    try:
        starts = []
        for array in segment.arrays.values():
            address = array.__array_interface__["data"][0]
            assert address % 64 == 0
            starts.append((address, address + array.nbytes))
        starts.sort()
        assert all(end <= next_start for (_, end), (next_start, _) in zip(starts, starts[1:]))
    finally:
        segment.close()
