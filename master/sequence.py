"""A sequence: one request's tokens and its place in the KV cache."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from llmserve.common.sampling import SamplingParams

if TYPE_CHECKING:
    from llmserve.master.groups import BeamGroup


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    EOS = "eos_token"
    STOP = "stop_sequence"  # a stop string or one of stop_token_ids
    ABORT = "abort"
    ERROR = "error"


@dataclass
class TokenLogprobs:
    """A generated token's raw log-probability and the top alternatives asked for."""

    logprob: float
    top: list[tuple[int, float]]
    rank: Optional[int] = None  # among the whole vocabulary, 1 the most likely (prompt tokens)


@dataclass(eq=False)
class Sequence:
    """Prompt plus generated tokens; `num_computed` of them have KV in the cache."""

    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    max_seq_len: int
    arrival_time: float = 0.0
    first_scheduled_time: Optional[float] = None  # when it left the queue the first time
    token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix caching: the names of its first full blocks
    num_computed: int = 0
    num_pending: int = 0  # last tokens of token_ids still being sampled by a step in flight (placeholders)
    agent_blocks: int = 0  # leading block_ids the agents hold right in their copy of the table (sent as deltas)
    agent_tokens: int = 0  # leading token_ids the agents hold right, when it keeps a history (penalties)
    on_agents: bool = False  # the agents hold its table and parameters (to drop when it is freed)
    num_cached_tokens: int = 0  # prompt tokens the prefix cache held at its first admission
    cache_salt: Optional[str] = None  # shares prefix-cache blocks only with sequences of the same salt
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: Optional[FinishReason] = None
    num_preemptions: int = 0
    sample_index: int = 0  # which of the request's samples (n / best_of) or beams
    pending_forks: int = 0  # more samples to draw at the first token, each becoming a sequence
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # prompt tokens 1.. (params.prompt_logprobs)
    cumulative_logprob: float = 0.0
    token_logprobs: list[float] = field(default_factory=list)  # each output token's, when the agent returned them
    beam: Optional["BeamGroup"] = None
    matcher: Optional[Any] = None  # structured output: its grammar state (master/structured.py), fed every token

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_settled(self) -> int:
        """Tokens whose ids are known: all but those a step in flight is still sampling."""
        return len(self.token_ids) - self.num_pending

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def num_prompt_positions_to_score(self) -> int:
        """Prompt positions whose next token's log-probability is still to come: from the last one scored
        to the one before the last prompt token (which predicts the first generated token)."""
        if self.params.prompt_logprobs is None:
            return 0
        return max(0, self.num_prompt_tokens - 1 - len(self.prompt_logprobs))

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_slots(self) -> int:
        """Decode slots this sequence holds: itself, plus the samples or beams it will become."""
        if self.beam is not None and self.beam.beams and self.beam.beams[0] is self:
            return max(self.params.num_beams - len(self.beam.beams) + 1, 1)
        return 1 + self.pending_forks

    @property
    def num_tokens_left(self) -> int:
        """Tokens it may still generate: up to max_new_tokens, within the context."""
        return max(0, min(self.params.max_new_tokens - self.num_output_tokens, self.max_seq_len - self.num_tokens))

    def suppressed_after(self, num_more: int) -> tuple[int, ...]:
        """Ids that may not be drawn once `num_more` more tokens are out (0 now; more for the rows after proposed
        tokens): the end tokens until min_new_tokens are out."""
        if self.num_output_tokens + num_more >= self.params.min_new_tokens:
            return ()
        eos = () if self.params.ignore_eos else tuple(sorted(self.eos_token_ids))
        return eos + self.params.stop_token_ids

    def add_pending(self, placeholder: int) -> None:
        """A step in flight samples this sequence's next token: `placeholder` (negative) stands for it until
        append_token puts the id in its place. A step built meanwhile feeds it to the agent, which reads the id
        from the samples of the step before (overlapped scheduling)."""
        self.token_ids.append(placeholder)
        self.num_pending += 1

    def drop_pending(self) -> None:
        """Forget the tokens still being sampled (the sequence ended before them)."""
        if self.num_pending:
            del self.token_ids[-self.num_pending :]
            self.num_pending = 0

    def append_token(self, token_id: int, logprobs: Optional[TokenLogprobs] = None) -> Optional[FinishReason]:
        """Add a generated token (in the place of the first pending one, if any); return why the sequence is now
        done, if it is."""
        if self.params.max_new_tokens == 0:  # it wanted its prompt's log-probabilities only: the token is dropped
            self.drop_pending()
            return FinishReason.LENGTH
        if self.num_pending:
            self.token_ids[self.num_settled] = token_id
            self.num_pending -= 1
        else:
            self.token_ids.append(token_id)
        if self.matcher is not None:
            self.matcher.consume_token(token_id)  # a token it did not allow leaves it in an error state (ends)
        if logprobs is not None:
            self.cumulative_logprob += logprobs.logprob
            self.token_logprobs.append(logprobs.logprob)
            if self.params.logprobs is not None:
                self.logprobs.append(logprobs)
        if token_id in self.eos_token_ids and not self.params.ignore_eos:
            return FinishReason.EOS
        if token_id in self.params.stop_token_ids:
            return FinishReason.STOP
        settled = self.num_settled
        if settled - self.num_prompt_tokens >= self.params.max_new_tokens or settled >= self.max_seq_len:
            return FinishReason.LENGTH
        return None

    def truncate(self, num_tokens: int) -> None:
        """Drop the tokens past the first `num_tokens` (a stop string ended the text before them): the output,
        its log-probabilities and their sum are what decoding one token at a time stops at."""
        num_output = num_tokens - self.num_prompt_tokens
        self.num_pending = 0  # the cut is within the settled tokens
        del self.token_ids[num_tokens:], self.logprobs[num_output:], self.token_logprobs[num_output:]
        self.cumulative_logprob = 0.0
        for logprob in self.token_logprobs:  # summed in the same order as append_token did
            self.cumulative_logprob += logprob

    def fork(self, seq_id: int, sample_index: int) -> "Sequence":
        """A copy that shares this sequence's blocks (the caller adds the references)."""
        return Sequence(
            seq_id=seq_id,
            prompt_ids=self.prompt_ids,
            params=self.params,
            eos_token_ids=self.eos_token_ids,
            max_seq_len=self.max_seq_len,
            arrival_time=self.arrival_time,
            first_scheduled_time=self.first_scheduled_time,
            token_ids=list(self.token_ids),
            block_ids=list(self.block_ids),
            block_hashes=list(self.block_hashes),
            num_computed=self.num_computed,
            cache_salt=self.cache_salt,
            status=self.status,
            sample_index=sample_index,
            logprobs=list(self.logprobs),
            token_logprobs=list(self.token_logprobs),
            prompt_logprobs=self.prompt_logprobs,  # complete once a sequence forks; never changed after
            cumulative_logprob=self.cumulative_logprob,
            beam=self.beam,
            matcher=None if self.matcher is None else self.matcher.deep_copy(),
        )
