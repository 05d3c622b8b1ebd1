"""The arrays of one step: their layout in shared memory and per-step views.

The master fills the first rows of each input array and the agent reads the
same rows; a StepRequest header carries the row counts. What stays the same
for a sequence (its sampling parameters, its token history) is sent once and
then as deltas: the agent keeps it (agent/sequence_table.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from llmserve.common.protocol import StepRequest
from llmserve.common.sampling import SamplingParams


@dataclass(frozen=True)
class StepCapacity:
    """The most a single step can hold; sizes the shared-memory segments."""

    max_num_tokens: int
    max_num_seqs: int
    max_blocks_per_seq: int
    history_capacity: int = 0  # history tokens one step sends (deltas of the sequences with penalties, n-gram bans)
    topk_width: int = 1  # top log-probabilities / beam candidates returned per sampled row
    suppress_width: int = 1  # token ids a row may mask (end tokens before min_new_tokens)
    max_num_rows: int = 0  # sampled rows (a row per verified position with speculation); 0: max_num_seqs
    draft_width: int = 0  # tokens a draft model proposes per sequence at most (speculative_config method draft)
    mask_width: int = 0  # 32-bit words of one row's token mask (structured output): ceil(vocab size / 32)

    @property
    def num_rows(self) -> int:
        return self.max_num_rows or self.max_num_seqs


@dataclass(frozen=True)
class Column:
    """One array of a step: its dtype, its elements in shared memory (from the capacity), and the elements a
    step uses (from the header and the row width: suppress_width for inputs, topk_width for outputs)."""

    dtype: type
    size: Callable[[StepCapacity], int]
    used: Callable[[StepRequest, int], int]
    rows: Optional[Callable[[StepRequest, int], tuple[int, int]]] = None  # the view's 2-D shape, when it has one


def column(dtype: type, size: Callable[[StepCapacity], int], used: Callable[[StepRequest, int], int],
           rows: Optional[Callable[[StepRequest, int], tuple[int, int]]] = None):
    """A dataclass field that is one array of the step layout."""
    return field(metadata={"column": Column(dtype, size, used, rows)})


def _tokens(cap: StepCapacity) -> int:
    return cap.max_num_tokens


def _seqs(cap: StepCapacity) -> int:
    return cap.max_num_seqs


def _rows(cap: StepCapacity) -> int:
    return cap.num_rows


def _sampled(header: StepRequest, width: int) -> int:
    return header.num_sample


def _scored(header: StepRequest, width: int) -> int:
    return header.num_prompt_positions


NO_SEED = -1
STEP_BUFFERS = 2  # pairs of input and output arrays: a step is built in one while the agents run the other's


@dataclass
class SamplingRows:
    """One step's sampled rows as the sampler reads them: a row's parameters are its sequence's (kept by the
    agent; agent/sequence_table.py), the rest comes from the step. Neutral values (temperature 0, top_k 0,
    top_p 1, penalties off) cost nothing."""

    temperature: np.ndarray  # 0 means greedy
    top_k: np.ndarray  # 0 means no top-k
    top_p: np.ndarray
    min_p: np.ndarray
    typical_p: np.ndarray
    repetition_penalty: np.ndarray  # multiplicative, prompt and output (transformers)
    presence_penalty: np.ndarray  # additive, over output tokens (OpenAI)
    frequency_penalty: np.ndarray
    no_repeat_ngram_size: np.ndarray
    seeds: np.ndarray  # NO_SEED means the agent's own generator
    seed_offsets: np.ndarray  # (sample index, tokens generated) folded
    num_logprobs: np.ndarray  # -1: none; else the top-N raw log-probabilities
    beam_candidates: np.ndarray  # 0: not a beam; else this many continuations
    history_starts: np.ndarray  # where the row's tokens start in `history`
    history_lens: np.ndarray  # 0 when the row needs no history
    history_prompt_lens: np.ndarray  # the first this-many are the prompt
    num_suppress: np.ndarray  # ids masked in suppress_ids[row]
    history: np.ndarray  # prompt + output tokens of the rows that need them (penalties, n-gram bans), flat
    suppress_ids: np.ndarray  # [rows, suppress_width]

    @property
    def num_rows(self) -> int:
        return len(self.temperature)

    def subset(self, selected: np.ndarray) -> "SamplingRows":
        """The rows `selected` (copies of the per-row values; the history buffer is shared)."""
        values = {name: getattr(self, name)[selected] for name in PER_ROW_FIELDS}
        return SamplingRows(**values, history=self.history, suppress_ids=self.suppress_ids[selected])


def _new_params(header: StepRequest, width: int) -> int:
    return header.num_new_params


@dataclass
class SequenceParams:
    """Master -> agent: the sampling parameters of the step's sequences that are new to the agents, sent once;
    the agent keeps them in its table until the sequence is released."""

    param_seq_ids: np.ndarray = column(np.int64, _seqs, _new_params)
    temperature: np.ndarray = column(np.float32, _seqs, _new_params)
    top_k: np.ndarray = column(np.int32, _seqs, _new_params)
    top_p: np.ndarray = column(np.float32, _seqs, _new_params)
    min_p: np.ndarray = column(np.float32, _seqs, _new_params)
    typical_p: np.ndarray = column(np.float32, _seqs, _new_params)
    repetition_penalty: np.ndarray = column(np.float32, _seqs, _new_params)
    presence_penalty: np.ndarray = column(np.float32, _seqs, _new_params)
    frequency_penalty: np.ndarray = column(np.float32, _seqs, _new_params)
    no_repeat_ngram_size: np.ndarray = column(np.int32, _seqs, _new_params)
    seeds: np.ndarray = column(np.int64, _seqs, _new_params)
    num_logprobs: np.ndarray = column(np.int32, _seqs, _new_params)
    beam_candidates: np.ndarray = column(np.int32, _seqs, _new_params)
    sample_indexes: np.ndarray = column(np.int64, _seqs, _new_params)  # which of the request's n / best_of samples
    prompt_lens: np.ndarray = column(np.int32, _seqs, _new_params)
    keeps_history: np.ndarray = column(np.bool_, _seqs, _new_params)  # its tokens follow as history deltas


def write_sequence_params(arrays: dict[str, np.ndarray], at: int, seq_id: int, params: SamplingParams,
                          prompt_len: int, sample_index: int = 0, beam_candidates: int = 0) -> None:
    """Entry `at` of the SequenceParams arrays: sequence `seq_id`'s parameters."""
    arrays["param_seq_ids"][at] = seq_id
    for name, value in sequence_param_values(params, prompt_len, sample_index, beam_candidates).items():
        arrays[name][at] = value


def sequence_param_values(params: SamplingParams, prompt_len: int, sample_index: int = 0,
                          beam_candidates: int = 0) -> dict:
    """A sequence's SequenceParams values (all but its id), as the agent keeps them."""
    return {
        "temperature": params.agent_temperature, "top_k": params.top_k, "top_p": params.top_p, "min_p": params.min_p,
        "typical_p": params.typical_p, "repetition_penalty": params.repetition_penalty,
        "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty,
        "no_repeat_ngram_size": params.no_repeat_ngram_size, "seeds": NO_SEED if params.seed is None else params.seed,
        "num_logprobs": params.agent_num_logprobs, "beam_candidates": beam_candidates, "sample_indexes": sample_index,
        "prompt_lens": prompt_len, "keeps_history": params.needs_history,
    }


@dataclass
class StepInputs:
    """Master -> agent: views of the rows one step uses (no copies); `sampling`'s arrays travel with them."""

    input_ids: np.ndarray = column(np.int64, _tokens, lambda h, width: h.num_tokens)
    positions: np.ndarray = column(np.int64, _tokens, lambda h, width: h.num_tokens)
    slot_mapping: np.ndarray = column(np.int64, _tokens, lambda h, width: h.num_tokens)
    query_lens: np.ndarray = column(np.int32, _seqs, lambda h, width: h.num_seqs)
    context_lens: np.ndarray = column(np.int32, _seqs, lambda h, width: h.num_seqs)
    # block tables as deltas: each sequence's table from block_starts[row] on is its next block_counts[row]
    # ids of new_block_ids (the agent keeps the tables; agent/sequence_table.py)
    seq_ids: np.ndarray = column(np.int64, _seqs, lambda h, width: h.num_seqs)
    block_starts: np.ndarray = column(np.int32, _seqs, lambda h, width: h.num_seqs)
    block_counts: np.ndarray = column(np.int32, _seqs, lambda h, width: h.num_seqs)
    new_block_ids: np.ndarray = column(
        np.int32, lambda cap: cap.max_num_seqs * cap.max_blocks_per_seq, lambda h, width: h.num_new_blocks)
    block_copies: np.ndarray = column(  # [num_block_copies, 2]: (source, destination) KV blocks, copied first
        np.int64, lambda cap: 2 * cap.max_num_seqs, lambda h, width: 2 * h.num_block_copies,
        lambda h, width: (h.num_block_copies, 2))
    # speculation: how many of each sequence's tokens are proposals (at its end), and how many tokens the
    # agent's draft model should propose after this step (-1: it skips the sequence)
    num_draft_tokens: np.ndarray = column(np.int32, _seqs, lambda h, width: h.num_seqs)
    propose_counts: np.ndarray = column(np.int32, _seqs, lambda h, width: h.num_seqs)
    prompt_positions: np.ndarray = column(np.int64, _tokens, _scored)  # step tokens whose logits score prompt_targets
    prompt_targets: np.ndarray = column(np.int64, _tokens, _scored)  # the next prompt token of each
    # sampled rows: the token whose logits each samples (n samples share one), the step sequence it extends (an
    # index into seq_ids), which of that sequence's samples it is (n / best_of forks at the end of a prompt; else
    # 0), and the ids it must not draw now (end tokens before min_new_tokens)
    logits_indices: np.ndarray = column(np.int64, _rows, _sampled)
    row_seqs: np.ndarray = column(np.int32, _rows, _sampled)
    row_samples: np.ndarray = column(np.int32, _rows, _sampled)
    num_suppress: np.ndarray = column(np.int32, _rows, _sampled)
    suppress_ids: np.ndarray = column(  # [rows, suppress_width]
        np.int32, lambda cap: cap.num_rows * cap.suppress_width, lambda h, width: h.num_sample * width,
        lambda h, width: (h.num_sample, width))
    # token histories of the sequences that keep one (penalties, n-gram bans), as deltas: a sequence's tokens from
    # position history_starts[row] on are its next history_counts[row] ids of history_ids (none for the others)
    history_starts: np.ndarray = column(np.int32, _seqs, lambda h, width: h.num_seqs)
    history_counts: np.ndarray = column(np.int32, _seqs, lambda h, width: h.num_seqs)
    history_ids: np.ndarray = column(
        np.int32, lambda cap: max(cap.history_capacity, 1), lambda h, width: h.num_history_ids)
    # structured output: the allowed tokens of each of header.masked_rows, a bit per token id
    token_masks: np.ndarray = column(
        np.int32, lambda cap: max(cap.num_rows * cap.mask_width, 1), lambda h, width: len(h.masked_rows) * h.mask_width,
        lambda h, width: (len(h.masked_rows), h.mask_width))
    params: SequenceParams = None


@dataclass
class StepOutputs:
    """Agent -> master: views of what rank 0 returns for one step's sampled rows and scored prompt positions."""

    sampled_ids: np.ndarray = column(np.int64, _rows, _sampled)
    sampled_logprobs: np.ndarray = column(np.float32, _rows, _sampled)  # raw log-probability of each id
    topk_ids: np.ndarray = column(  # [rows, topk_width]: top raw log-probabilities, or a beam row's candidates
        np.int32, lambda cap: cap.num_rows * cap.topk_width, lambda h, width: h.num_sample * width,
        lambda h, width: (h.num_sample, width))
    topk_logprobs: np.ndarray = column(
        np.float32, lambda cap: cap.num_rows * cap.topk_width, lambda h, width: h.num_sample * width,
        lambda h, width: (h.num_sample, width))
    draft_ids: np.ndarray = column(  # [num_seqs, draft_width]: the draft model's proposals, -1 past each row's
        np.int32, lambda cap: max(cap.max_num_seqs * cap.draft_width, 1), lambda h, width: h.num_seqs * h.draft_width,
        lambda h, width: (h.num_seqs, h.draft_width))
    # the step whose ids sampled_ids holds, written after them: the other ranks of a host wait on it to take a
    # step's pending tokens from it (overlapped scheduling with tensor parallelism)
    sampled_step: np.ndarray = column(np.int64, lambda cap: 1, lambda h, width: 1)
    prompt_logprobs: np.ndarray = column(np.float32, _tokens, _scored)  # raw log-probability of each prompt target
    prompt_ranks: np.ndarray = column(np.int32, _tokens, _scored)  # its rank in the vocabulary, 1 the most likely
    prompt_topk_ids: np.ndarray = column(
        np.int32, lambda cap: cap.max_num_tokens * cap.topk_width, lambda h, width: h.num_prompt_positions * width,
        lambda h, width: (h.num_prompt_positions, width))
    prompt_topk_logprobs: np.ndarray = column(
        np.float32, lambda cap: cap.max_num_tokens * cap.topk_width, lambda h, width: h.num_prompt_positions * width,
        lambda h, width: (h.num_prompt_positions, width))


def _columns(cls: type) -> list[tuple[str, Column]]:
    return [(f.name, f.metadata["column"]) for f in dataclasses.fields(cls) if "column" in f.metadata]


STEP_COLUMNS, PARAM_COLUMNS = _columns(StepInputs), _columns(SequenceParams)
INPUT_COLUMNS = STEP_COLUMNS + PARAM_COLUMNS
OUTPUT_COLUMNS = _columns(StepOutputs)
PER_ROW_FIELDS = [f.name for f in dataclasses.fields(SamplingRows) if f.name not in ("history", "suppress_ids")]
# what a sampled row takes from its sequence's parameters as they are
ROW_PARAM_FIELDS = [name for name, _ in PARAM_COLUMNS if name in PER_ROW_FIELDS]


def input_layout(cap: StepCapacity) -> list[tuple[str, type, int]]:
    """Master -> agent arrays: (name, dtype, elements) in shared-memory order."""
    return [(name, col.dtype, col.size(cap)) for name, col in INPUT_COLUMNS]


def output_layout(cap: StepCapacity) -> list[tuple[str, type, int]]:
    """Agent -> master arrays."""
    return [(name, col.dtype, col.size(cap)) for name, col in OUTPUT_COLUMNS]


def _views(arrays: dict[str, np.ndarray], columns: list[tuple[str, Column]], header: StepRequest,
           width: int) -> dict[str, np.ndarray]:
    """The used rows of each array, shaped as declared."""
    views = {}
    for name, col in columns:
        array = arrays[name][: col.used(header, width)]
        views[name] = array if col.rows is None else array.reshape(col.rows(header, width))
    return views


def take_pending_tokens(ids: np.ndarray, sampled: Optional[np.ndarray]) -> np.ndarray:
    """`ids` with each placeholder of a pending token, -1 - r, replaced by `sampled[r]` (the sampled ids of the
    step it follows; a copy when any is there). ValueError for a placeholder with nothing to fill it."""
    pending = ids < 0
    if not pending.any():
        return ids
    rows = -1 - ids[pending]
    if sampled is None:
        raise ValueError("a token id is negative (a pending token) in a step that follows no other")
    if int(rows.max()) >= len(sampled):
        raise ValueError(f"a pending token names sampled row {int(rows.max())} of a step that sampled {len(sampled)}")
    ids = ids.copy()
    ids[pending] = sampled[rows]
    return ids


def fill_pending_tokens(batch: StepInputs, sampled: Optional[np.ndarray]) -> None:
    """Put the ids of the step before (`sampled`) in place of the pending tokens of `batch`'s input ids and of
    its history deltas (copies of those arrays when any is pending)."""
    batch.input_ids = take_pending_tokens(batch.input_ids, sampled)
    batch.history_ids = take_pending_tokens(batch.history_ids, sampled)


SEED_STRIDE = 1 << 32  # sample i of a seeded request draws from offsets i * SEED_STRIDE + position


def step_inputs(arrays: dict[str, np.ndarray], header: StepRequest, suppress_width: int) -> StepInputs:
    """Views of the input arrays' rows one step uses."""
    params = SequenceParams(**_views(arrays, PARAM_COLUMNS, header, suppress_width)) if header.num_new_params else NO_PARAMS
    return StepInputs(**_views(arrays, STEP_COLUMNS, header, suppress_width), params=params)


NO_PARAMS = SequenceParams(**{name: np.zeros(0, col.dtype) for name, col in PARAM_COLUMNS})  # most steps bring none


def step_outputs(arrays: dict[str, np.ndarray], header: StepRequest, topk_width: int) -> StepOutputs:
    """Views of what the agent returned for one step."""
    return StepOutputs(**_views(arrays, OUTPUT_COLUMNS, header, topk_width))


# ---------------------------------------------------------------- the inline transport (agents on other hosts)


def input_lengths(header: StepRequest, suppress_width: int) -> dict[str, int]:
    """How many leading elements of each input array one step uses."""
    return {name: col.used(header, suppress_width) for name, col in INPUT_COLUMNS}


def output_lengths(header: StepRequest, topk_width: int) -> dict[str, int]:
    """How many leading elements of each output array one step fills."""
    return {name: col.used(header, topk_width) for name, col in OUTPUT_COLUMNS}


def pack_arrays(arrays: dict[str, np.ndarray], layout: list, lengths: dict[str, int]) -> list[memoryview]:
    """One message frame per array of `layout`: its used elements, not copied."""
    return [memoryview(arrays[name][: lengths[name]]) for name, _, _ in layout]


def unpack_arrays(frames: list, layout: list) -> dict[str, np.ndarray]:
    """The arrays of `pack_arrays`' frames (read-only views of the message)."""
    return {name: np.frombuffer(frame, dtype) for (name, dtype, _), frame in zip(layout, frames, strict=True)}
