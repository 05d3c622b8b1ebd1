"""The arrays of one step: their layout in shared memory and per-step views.

The master fills the first rows of each input array and the agent reads the
same rows; a StepRequest header carries the row counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.protocol import StepRequest


@dataclass(frozen=True)
class StepCapacity:
    """The most a single step can hold; sizes the shared-memory segments."""

    max_num_tokens: int
    max_num_seqs: int
    max_blocks_per_seq: int


def input_layout(cap: StepCapacity) -> list[tuple[str, type, int]]:
    """Master -> agent arrays."""
    tokens, seqs = cap.max_num_tokens, cap.max_num_seqs
    return [
        ("input_ids", np.int64, tokens),
        ("positions", np.int64, tokens),
        ("slot_mapping", np.int64, tokens),
        ("query_lens", np.int32, seqs),
        ("context_lens", np.int32, seqs),
        ("block_tables", np.int32, seqs * cap.max_blocks_per_seq),
        ("logits_indices", np.int64, seqs),
        ("temperature", np.float32, seqs),
        ("top_k", np.int32, seqs),
        ("top_p", np.float32, seqs),
        ("seeds", np.int64, seqs),
        ("seed_offsets", np.int64, seqs),
    ]


def output_layout(cap: StepCapacity) -> list[tuple[str, type, int]]:
    """Agent -> master arrays."""
    return [("sampled_ids", np.int64, cap.max_num_seqs)]


NO_SEED = -1


@dataclass
class StepInputs:
    """Views of the rows one step uses (no copies)."""

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    query_lens: np.ndarray
    context_lens: np.ndarray
    block_tables: np.ndarray  # [num_seqs, block_table_width]
    logits_indices: np.ndarray
    temperature: np.ndarray  # 0 means greedy
    top_k: np.ndarray  # 0 means no top-k
    top_p: np.ndarray
    seeds: np.ndarray  # NO_SEED means the agent's own generator
    seed_offsets: np.ndarray  # tokens generated so far, so a seeded draw depends on (seed, position) only


def step_inputs(arrays: dict[str, np.ndarray], header: StepRequest) -> StepInputs:
    """Slice the used rows of the input arrays for one step."""
    t, s, n, w = header.num_tokens, header.num_seqs, header.num_sample, header.block_table_width
    return StepInputs(
        input_ids=arrays["input_ids"][:t],
        positions=arrays["positions"][:t],
        slot_mapping=arrays["slot_mapping"][:t],
        query_lens=arrays["query_lens"][:s],
        context_lens=arrays["context_lens"][:s],
        block_tables=arrays["block_tables"][: s * w].reshape(s, w),
        logits_indices=arrays["logits_indices"][:n],
        temperature=arrays["temperature"][:n],
        top_k=arrays["top_k"][:n],
        top_p=arrays["top_p"][:n],
        seeds=arrays["seeds"][:n],
        seed_offsets=arrays["seed_offsets"][:n],
    )
