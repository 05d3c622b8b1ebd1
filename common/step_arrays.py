"""The arrays of one step: their layout in shared memory and per-step views.

The master fills the first rows of each input array and the agent reads the
same rows; a StepRequest header carries the row counts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from llmserve.common.protocol import StepRequest
from llmserve.common.sampling import SamplingParams


@dataclass(frozen=True)
class StepCapacity:
    """The most a single step can hold; sizes the shared-memory segments."""

    max_num_tokens: int
    max_num_seqs: int
    max_blocks_per_seq: int
    history_capacity: int = 0  # prompt+output tokens of the rows that need them (penalties, n-gram bans)
    topk_width: int = 1  # top log-probabilities / beam candidates returned per sampled row
    suppress_width: int = 1  # token ids a row may mask (end tokens before min_new_tokens)
    max_num_rows: int = 0  # sampled rows (a row per verified position with speculation); 0: max_num_seqs
    draft_width: int = 0  # tokens a draft model proposes per sequence at most (speculative_config method draft)

    @property
    def num_rows(self) -> int:
        return self.max_num_rows or self.max_num_seqs


@dataclass(frozen=True)
class Column:
    """One array of a step: its dtype, its elements in shared memory (from the capacity), and the elements a
    step uses (from the header and the row width: suppress_width for inputs, topk_width for outputs)."""

    dtype: type
    size: Callable[[StepCapacity], int]
    used: Optional[Callable[[StepRequest, int], int]]  # None: found from the data (history)
    rows: Optional[Callable[[StepRequest, int], tuple[int, int]]] = None  # the view's 2-D shape, when it has one


def column(dtype: type, size: Callable[[StepCapacity], int], used: Optional[Callable[[StepRequest, int], int]],
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
    """Views of one step's sampled rows, as the sampler reads them. Neutral values (temperature 0, top_k 0,
    top_p 1, penalties off) cost nothing."""

    temperature: np.ndarray = column(np.float32, _rows, _sampled)  # 0 means greedy
    top_k: np.ndarray = column(np.int32, _rows, _sampled)  # 0 means no top-k
    top_p: np.ndarray = column(np.float32, _rows, _sampled)
    min_p: np.ndarray = column(np.float32, _rows, _sampled)
    typical_p: np.ndarray = column(np.float32, _rows, _sampled)
    repetition_penalty: np.ndarray = column(np.float32, _rows, _sampled)  # multiplicative, prompt and output (transformers)
    presence_penalty: np.ndarray = column(np.float32, _rows, _sampled)  # additive, over output tokens (OpenAI)
    frequency_penalty: np.ndarray = column(np.float32, _rows, _sampled)
    no_repeat_ngram_size: np.ndarray = column(np.int32, _rows, _sampled)
    seeds: np.ndarray = column(np.int64, _rows, _sampled)  # NO_SEED means the agent's own generator
    seed_offsets: np.ndarray = column(np.int64, _rows, _sampled)  # (sample index, tokens generated) folded
    num_logprobs: np.ndarray = column(np.int32, _rows, _sampled)  # -1: none; else the top-N raw log-probabilities
    beam_candidates: np.ndarray = column(np.int32, _rows, _sampled)  # 0: not a beam; else this many continuations
    history_starts: np.ndarray = column(np.int64, _rows, _sampled)  # where the row's tokens start in `history`
    history_lens: np.ndarray = column(np.int32, _rows, _sampled)  # 0 when the row needs no history
    history_prompt_lens: np.ndarray = column(np.int32, _rows, _sampled)  # the first this-many are the prompt
    num_suppress: np.ndarray = column(np.int32, _rows, _sampled)  # ids masked in suppress_ids[row]
    # prompt + output tokens of the rows that need them (penalties, n-gram bans): the whole flat buffer
    history: np.ndarray = column(np.int32, lambda cap: max(cap.history_capacity, 1), None)
    suppress_ids: np.ndarray = column(  # [rows, suppress_width]
        np.int32, lambda cap: cap.num_rows * cap.suppress_width, lambda h, width: h.num_sample * width,
        lambda h, width: (h.num_sample, width))

    @property
    def num_rows(self) -> int:
        return len(self.temperature)

    def subset(self, selected: np.ndarray) -> "SamplingRows":
        """The rows `selected` (copies of the per-row values; the history buffer is shared)."""
        values = {name: getattr(self, name)[selected] for name in PER_ROW_FIELDS}
        return SamplingRows(**values, history=self.history, suppress_ids=self.suppress_ids[selected])


@dataclass
class StepInputs:
    """Master -> agent: views of the rows one step uses (no copies); `sampling`'s arrays travel with them."""

    input_ids: np.ndarray = column(np.int64, _tokens, lambda h, width: h.num_tokens)
    positions: np.ndarray = column(np.int64, _tokens, lambda h, width: h.num_tokens)
    slot_mapping: np.ndarray = column(np.int64, _tokens, lambda h, width: h.num_tokens)
    query_lens: np.ndarray = column(np.int32, _seqs, lambda h, width: h.num_seqs)
    context_lens: np.ndarray = column(np.int32, _seqs, lambda h, width: h.num_seqs)
    # block tables as deltas: each sequence's table from block_starts[row] on is its next block_counts[row]
    # ids of new_block_ids (the agent keeps the tables; agent/block_tables.py)
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
    logits_indices: np.ndarray = column(np.int64, _rows, _sampled)  # per sampled row; n samples share one
    prompt_positions: np.ndarray = column(np.int64, _tokens, _scored)  # step tokens whose logits score prompt_targets
    prompt_targets: np.ndarray = column(np.int64, _tokens, _scored)  # the next prompt token of each
    sampling: SamplingRows = None


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


STEP_COLUMNS, SAMPLING_COLUMNS = _columns(StepInputs), _columns(SamplingRows)
INPUT_COLUMNS = STEP_COLUMNS + SAMPLING_COLUMNS
OUTPUT_COLUMNS = _columns(StepOutputs)
PER_ROW_FIELDS = [name for name, col in SAMPLING_COLUMNS if col.used is _sampled]


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
        array, used, rows = arrays[name], col.used, col.rows
        if used is not None:
            array = array[: used(header, width)]
        views[name] = array if rows is None else array.reshape(rows(header, width))
    return views


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
    drafts: Sequence[int] = ()  # proposed tokens after token_ids that this row follows (speculation)


def write_sampling_rows(arrays: dict[str, np.ndarray], rows: Sequence[SampleRow], suppress_width: int) -> bool:
    """Fill the sampled rows' arrays; return whether every row is greedy (the agent's fast path).

    A penalised row that follows the previous row's tokens plus one more proposal (the next verified position
    of the same sequence) shares its history: one more token is written, not the whole sequence again."""
    history_end = 0
    history = arrays["history"]
    previous = None  # the last history written: (token_ids, drafts, start)
    for row, spec in enumerate(rows):
        params = spec.params
        num_output = len(spec.token_ids) + len(spec.drafts) - spec.num_prompt_tokens
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
            count = len(spec.token_ids) + len(spec.drafts)
            extends = (previous is not None and previous[0] is spec.token_ids and previous[2] + count - 1 == history_end
                       and list(previous[1]) == list(spec.drafts[:-1]))
            start = previous[2] if extends else history_end
            if start + count > len(history):
                raise ValueError(f"the step's penalised rows hold more than {len(history)} tokens")
            if extends:
                history[history_end] = spec.drafts[-1]
            else:
                history[start : start + len(spec.token_ids)] = spec.token_ids
                history[start + len(spec.token_ids) : start + count] = spec.drafts
            history_end = start + count
            previous = (spec.token_ids, spec.drafts, start)
            arrays["history_starts"][row] = start
            arrays["history_lens"][row] = count
        else:
            arrays["history_lens"][row] = 0
        suppress = spec.suppress[:suppress_width]
        arrays["num_suppress"][row] = len(suppress)
        arrays["suppress_ids"][row * suppress_width : row * suppress_width + len(suppress)] = suppress
    return all(spec.params.is_greedy for spec in rows)


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
    the history its penalised rows use (copies of those arrays when any is pending)."""
    batch.input_ids = take_pending_tokens(batch.input_ids, sampled)
    rows = batch.sampling
    if len(rows.history_lens) and rows.history_lens.max() > 0:
        end = int((rows.history_starts + rows.history_lens).max())
        view = rows.history[:end]
        used = take_pending_tokens(view, sampled)
        if used is not view:
            rows.history = used


SEED_STRIDE = 1 << 32  # sample i of a seeded request draws from offsets i * SEED_STRIDE + position


def step_inputs(arrays: dict[str, np.ndarray], header: StepRequest, suppress_width: int) -> StepInputs:
    """Views of the input arrays' rows one step uses."""
    sampling = SamplingRows(**_views(arrays, SAMPLING_COLUMNS, header, suppress_width))
    return StepInputs(**_views(arrays, STEP_COLUMNS, header, suppress_width), sampling=sampling)


def sampling_rows(arrays: dict[str, np.ndarray], num_rows: int, suppress_width: int) -> SamplingRows:
    """Views of the first `num_rows` sampled rows."""
    header = StepRequest(step_id=0, num_tokens=0, num_seqs=0, num_sample=num_rows, num_new_blocks=0, is_all_greedy=False)
    return SamplingRows(**_views(arrays, SAMPLING_COLUMNS, header, suppress_width))


def step_outputs(arrays: dict[str, np.ndarray], header: StepRequest, topk_width: int) -> StepOutputs:
    """Views of what the agent returned for one step."""
    return StepOutputs(**_views(arrays, OUTPUT_COLUMNS, header, topk_width))


# ---------------------------------------------------------------- the inline transport (agents on other hosts)


def input_lengths(arrays: dict[str, np.ndarray], header: StepRequest, suppress_width: int) -> dict[str, int]:
    """How many leading elements of each input array one step uses."""
    n = header.num_sample
    ends = arrays["history_starts"][:n] + arrays["history_lens"][:n]
    return {**row_lengths(header, suppress_width), "history": int(ends.max()) if n else 0}


def row_lengths(header: StepRequest, suppress_width: int) -> dict[str, int]:
    """`input_lengths` of every array but `history`: they follow from the header alone."""
    return {name: col.used(header, suppress_width) for name, col in INPUT_COLUMNS if col.used is not None}


def output_lengths(header: StepRequest, topk_width: int) -> dict[str, int]:
    """How many leading elements of each output array one step fills."""
    return {name: col.used(header, topk_width) for name, col in OUTPUT_COLUMNS}


def pack_arrays(arrays: dict[str, np.ndarray], layout: list, lengths: dict[str, int]) -> list[memoryview]:
    """One message frame per array of `layout`: its used elements, not copied."""
    return [memoryview(arrays[name][: lengths[name]]) for name, _, _ in layout]


def unpack_arrays(frames: list, layout: list) -> dict[str, np.ndarray]:
    """The arrays of `pack_arrays`' frames (read-only views of the message)."""
    return {name: np.frombuffer(frame, dtype) for (name, dtype, _), frame in zip(layout, frames, strict=True)}
