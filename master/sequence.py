"""A sequence: one request's tokens and its place in the KV cache."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from common.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    EOS = "eos_token"
    ABORT = "abort"
    ERROR = "error"


@dataclass(eq=False)
class Sequence:
    """Prompt plus generated tokens; `num_computed` of them have KV in the cache."""

    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    max_seq_len: int
    arrival_time: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: Optional[FinishReason] = None
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

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
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> Optional[FinishReason]:
        """Add a generated token; return why the sequence is now done, if it is."""
        self.token_ids.append(token_id)
        if token_id in self.eos_token_ids and not self.params.ignore_eos:
            return FinishReason.EOS
        if self.num_output_tokens >= self.params.max_new_tokens or self.num_tokens >= self.max_seq_len:
            return FinishReason.LENGTH
        return None
