"""Builds a sampler's input rows the way the master does: SamplingParams in, SamplingRows out."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from llmserve.common.sampling import SamplingParams
from llmserve.common.step_arrays import SampleRow, StepCapacity, input_layout, sampling_rows, write_sampling_rows

SUPPRESS_WIDTH = 8


def make_rows(
    params: Sequence[SamplingParams],
    histories: Optional[Sequence[Sequence[int]]] = None,
    prompt_lens: Optional[Sequence[int]] = None,
    suppress: Optional[Sequence[Sequence[int]]] = None,
    sample_indexes: Optional[Sequence[int]] = None,
    beam_candidates: Optional[Sequence[int]] = None,
):
    """(SamplingRows, is_all_greedy) for one row per params; histories are prompt + output token ids."""
    num_rows = len(params)
    histories = histories or [[0]] * num_rows
    capacity = StepCapacity(
        max_num_tokens=1,
        max_num_seqs=num_rows,
        max_blocks_per_seq=1,
        history_capacity=sum(len(h) for h in histories),
        topk_width=1,
        suppress_width=SUPPRESS_WIDTH,
    )
    arrays = {name: np.zeros(size, dtype) for name, dtype, size in input_layout(capacity)}
    rows = [
        SampleRow(
            logits_index=i,
            params=p,
            token_ids=list(histories[i]),
            num_prompt_tokens=prompt_lens[i] if prompt_lens else len(histories[i]),
            sample_index=sample_indexes[i] if sample_indexes else 0,
            suppress=tuple(suppress[i]) if suppress else (),
            beam_candidates=beam_candidates[i] if beam_candidates else 0,
        )
        for i, p in enumerate(params)
    ]
    is_all_greedy = write_sampling_rows(arrays, rows, SUPPRESS_WIDTH)
    return sampling_rows(arrays, num_rows, SUPPRESS_WIDTH), is_all_greedy
