"""The arrays of one step: their layout in shared memory and per-step views.

The master fills the first rows of each input array and the agent reads the
same rows; a StepRequest header carries the row counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from llmserve.common.protocol import StepRequest
from llmserve.common.sampling import SamplingParams


@dataclass(frozen=True)
class StepCapacity:
    """The most a single step can hold; sizes the shared-memory segments."""

    max_num_tokens: int
    max_num_seqs: int  # also the most sampled rows in a step
    max_blocks_per_seq: int
    history_capacity: int = 0  # prompt+output tokens of the rows that need them (penalties, n-gram bans)
    topk_width: int = 1  # top log-probabilities / beam candidates returned per sampled row
    suppress_width: int = 1  # token ids a row may mask (end tokens before min_new_tokens)


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
        ("block_copies", np.int64, 2 * seqs),  # (source, destination) pairs copied before the step runs
        ("logits_indices", np.int64, seqs),
        *((name, dtype, seqs) for name, dtype in SAMPLING_ROW_FIELDS),
        ("history", np.int32, max(cap.history_capacity, 1)),
        ("suppress_ids", np.int32, seqs * cap.suppress_width),
        ("prompt_positions", np.int64, tokens),  # step tokens whose logits score the next prompt token
        ("prompt_targets", np.int64, tokens),  # that next prompt token
    ]


def output_layout(cap: StepCapacity) -> list[tuple[str, type, int]]:
    """Agent -> master arrays."""
    seqs, tokens = cap.max_num_seqs, cap.max_num_tokens
    return [
        ("sampled_ids", np.int64, seqs),
        ("sampled_logprobs", np.float32, seqs),
        ("topk_ids", np.int32, seqs * cap.topk_width),
        ("topk_logprobs", np.float32, seqs * cap.topk_width),
        ("prompt_logprobs", np.float32, tokens),  # raw log-probability of each prompt_targets token
        ("prompt_ranks", np.int32, tokens),  # its rank among the vocabulary, 1 the most likely
        ("prompt_topk_ids", np.int32, tokens * cap.topk_width),
        ("prompt_topk_logprobs", np.float32, tokens * cap.topk_width),
    ]


NO_SEED = -1

# One value per sampled row. Neutral values (temperature 0, top_k 0, top_p 1, penalties off) cost nothing.
SAMPLING_ROW_FIELDS = [
    ("temperature", np.float32),  # 0 means greedy
    ("top_k", np.int32),  # 0 means no top-k
    ("top_p", np.float32),
    ("min_p", np.float32),
    ("typical_p", np.float32),
    ("repetition_penalty", np.float32),  # multiplicative, over prompt and output tokens (transformers)
    ("presence_penalty", np.float32),  # additive, over output tokens (OpenAI)
    ("frequency_penalty", np.float32),
    ("no_repeat_ngram_size", np.int32),
    ("seeds", np.int64),  # NO_SEED means the agent's own generator
    ("seed_offsets", np.int64),  # (sample index, tokens generated) folded, so a seeded draw ignores the batch
    ("num_logprobs", np.int32),  # -1: none; else the top-N raw log-probabilities to return
    ("beam_candidates", np.int32),  # 0: not a beam; else return this many best continuations (processed log-probs)
    ("history_starts", np.int64),  # where the row's tokens start in `history`
    ("history_lens", np.int32),  # 0 when the row needs no history
    ("history_prompt_lens", np.int32),  # the first this-many history tokens are the prompt
    ("num_suppress", np.int32),  # ids masked in suppress_ids[row * suppress_width :]
]


@dataclass
class SamplingRows:
    """Views of one step's sampled rows, as the sampler reads them."""

    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    min_p: np.ndarray
    typical_p: np.ndarray
    repetition_penalty: np.ndarray
    presence_penalty: np.ndarray
    frequency_penalty: np.ndarray
    no_repeat_ngram_size: np.ndarray
    seeds: np.ndarray
    seed_offsets: np.ndarray
    num_logprobs: np.ndarray
    beam_candidates: np.ndarray
    history_starts: np.ndarray
    history_lens: np.ndarray
    history_prompt_lens: np.ndarray
    num_suppress: np.ndarray
    history: np.ndarray  # the whole flat buffer
    suppress_ids: np.ndarray  # [rows, suppress_width]

    @property
    def num_rows(self) -> int:
        return len(self.temperature)

    def subset(self, selected: np.ndarray) -> "SamplingRows":
        """The rows `selected` (copies of the per-row values; the history buffer is shared)."""
        fields = {name: getattr(self, name)[selected] for name, _ in SAMPLING_ROW_FIELDS}
        return SamplingRows(**fields, history=self.history, suppress_ids=self.suppress_ids[selected])


def sampling_rows(arrays: dict[str, np.ndarray], num_rows: int, suppress_width: int) -> SamplingRows:
    """Views of the first `num_rows` sampled rows."""
    fields = {name: arrays[name][:num_rows] for name, _ in SAMPLING_ROW_FIELDS}
    suppress = arrays["suppress_ids"][: num_rows * suppress_width].reshape(num_rows, suppress_width)
    return SamplingRows(**fields, history=arrays["history"], suppress_ids=suppress)


@dataclass
class SampleRow:
    """What the master knows about one row to sample: its parameters and the sequence it extends."""

    logits_index: int
    params: SamplingParams
    token_ids: Sequence[int]  # prompt + output so far
    num_prompt_tokens: int
    sample_index: int = 0  # which of the request's n / best_of samples
    suppress: Sequence[int] = ()  # ids that must not be drawn now
    beam_candidates: int = 0


def write_sampling_rows(arrays: dict[str, np.ndarray], rows: Sequence[SampleRow], suppress_width: int) -> bool:
    """Fill the sampled rows' arrays; return whether every row is greedy (the agent's fast path)."""
    history_end = 0
    history = arrays["history"]
    for row, spec in enumerate(rows):
        params = spec.params
        num_output = len(spec.token_ids) - spec.num_prompt_tokens
        arrays["logits_indices"][row] = spec.logits_index
        arrays["temperature"][row] = params.agent_temperature
        arrays["top_k"][row] = params.top_k
        arrays["top_p"][row] = params.top_p
        arrays["min_p"][row] = params.min_p
        arrays["typical_p"][row] = params.typical_p
        arrays["repetition_penalty"][row] = params.repetition_penalty
        arrays["presence_penalty"][row] = params.presence_penalty
        arrays["frequency_penalty"][row] = params.frequency_penalty
        arrays["no_repeat_ngram_size"][row] = params.no_repeat_ngram_size
        arrays["seeds"][row] = NO_SEED if params.seed is None else params.seed
        arrays["seed_offsets"][row] = spec.sample_index * SEED_STRIDE + num_output
        arrays["num_logprobs"][row] = params.agent_num_logprobs
        arrays["beam_candidates"][row] = spec.beam_candidates
        arrays["history_starts"][row] = history_end
        arrays["history_prompt_lens"][row] = spec.num_prompt_tokens
        if params.needs_history:
            count = len(spec.token_ids)
            if history_end + count > len(history):
                raise ValueError(f"the step's penalised rows hold more than {len(history)} tokens")
            history[history_end : history_end + count] = spec.token_ids
            history_end += count
            arrays["history_lens"][row] = count
        else:
            arrays["history_lens"][row] = 0
        suppress = spec.suppress[:suppress_width]
        arrays["num_suppress"][row] = len(suppress)
        arrays["suppress_ids"][row * suppress_width : row * suppress_width + len(suppress)] = suppress
    return all(spec.params.is_greedy for spec in rows)


SEED_STRIDE = 1 << 32  # sample i of a seeded request draws from offsets i * SEED_STRIDE + position


@dataclass
class StepInputs:
    """Views of the rows one step uses (no copies)."""

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    query_lens: np.ndarray
    context_lens: np.ndarray
    block_tables: np.ndarray  # [num_seqs, block_table_width]
    block_copies: np.ndarray  # [num_block_copies, 2]: (source, destination) KV blocks
    logits_indices: np.ndarray  # one per sampled row; rows may share an index (n samples of one prompt)
    sampling: SamplingRows
    prompt_positions: np.ndarray  # step tokens whose logits score prompt_targets
    prompt_targets: np.ndarray


def step_inputs(arrays: dict[str, np.ndarray], header: StepRequest, suppress_width: int) -> StepInputs:
    """Slice the used rows of the input arrays for one step."""
    t, s, n, w = header.num_tokens, header.num_seqs, header.num_sample, header.block_table_width
    return StepInputs(
        input_ids=arrays["input_ids"][:t],
        positions=arrays["positions"][:t],
        slot_mapping=arrays["slot_mapping"][:t],
        query_lens=arrays["query_lens"][:s],
        context_lens=arrays["context_lens"][:s],
        block_tables=arrays["block_tables"][: s * w].reshape(s, w),
        block_copies=arrays["block_copies"][: 2 * header.num_block_copies].reshape(-1, 2),
        logits_indices=arrays["logits_indices"][:n],
        sampling=sampling_rows(arrays, n, suppress_width),
        prompt_positions=arrays["prompt_positions"][: header.num_prompt_positions],
        prompt_targets=arrays["prompt_targets"][: header.num_prompt_positions],
    )


# ---------------------------------------------------------------- the inline transport (agents on other hosts)


def input_lengths(arrays: dict[str, np.ndarray], header: StepRequest, suppress_width: int) -> dict[str, int]:
    """How many leading elements of each input array one step uses."""
    n = header.num_sample
    ends = arrays["history_starts"][:n] + arrays["history_lens"][:n]
    return {**row_lengths(header, suppress_width), "history": int(ends.max()) if n else 0}


def row_lengths(header: StepRequest, suppress_width: int) -> dict[str, int]:
    """`input_lengths` of every array but `history`: they follow from the header alone."""
    t, s, n = header.num_tokens, header.num_seqs, header.num_sample
    lengths = {
        "input_ids": t, "positions": t, "slot_mapping": t, "query_lens": s, "context_lens": s,
        "block_tables": s * header.block_table_width, "block_copies": 2 * header.num_block_copies,
        "logits_indices": n, "suppress_ids": n * suppress_width,
        "prompt_positions": header.num_prompt_positions, "prompt_targets": header.num_prompt_positions,
    }
    lengths.update((name, n) for name, _ in SAMPLING_ROW_FIELDS)
    return lengths


def output_lengths(num_rows: int, topk_width: int, num_scored: int = 0) -> dict[str, int]:
    """How many leading elements of each output array a step with `num_rows` sampled rows and `num_scored`
    prompt positions fills."""
    return {"sampled_ids": num_rows, "sampled_logprobs": num_rows, "topk_ids": num_rows * topk_width,
            "topk_logprobs": num_rows * topk_width, "prompt_logprobs": num_scored, "prompt_ranks": num_scored,
            "prompt_topk_ids": num_scored * topk_width, "prompt_topk_logprobs": num_scored * topk_width}


def pack_arrays(arrays: dict[str, np.ndarray], layout: list, lengths: dict[str, int]) -> list[memoryview]:
    """One message frame per array of `layout`: its used elements, not copied."""
    return [memoryview(arrays[name][: lengths[name]]) for name, _, _ in layout]


def unpack_arrays(frames: list, layout: list) -> dict[str, np.ndarray]:
    """The arrays of `pack_arrays`' frames (read-only views of the message)."""
    return {name: np.frombuffer(frame, dtype) for (name, dtype, _), frame in zip(layout, frames, strict=True)}
