"""Sampling parameters of one request, as every API, the scheduler and the agents see them.

One type for all front ends: each API maps its body onto SamplingParams and
calls `validate`, which names the offending parameter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

from llmserve.common.errors import RequestError

MAX_SEED = 2**53 - 1  # JSON's exact integers (a larger one may arrive rounded as a float); seeds travel as int64
MAX_INT32 = 2**31 - 1  # top_k, n-gram sizes, token ids and counts travel as int32
MAX_TOP_K = MAX_INT32
MAX_FLOAT32 = 3.4028234663852886e38  # temperature, top_p, penalties travel as float32: larger values would be inf


@dataclass(frozen=True)
class SamplingLimits:
    """Server-wide bounds a request's parameters must respect."""

    max_logprobs: int = 20
    max_num_beams: int = 8
    max_n: int = 16
    max_stop_token_ids: int = 16


@dataclass(frozen=True)
class ParamNames:
    """How one API spells the parameters and the prompt, so that errors name what the client sent."""

    prefix: str = ""
    aliases: Mapping[str, str] = field(default_factory=dict)
    prompt: str = "inputs"

    def __call__(self, name: str) -> str:
        return self.prefix + self.aliases.get(name, name)


STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the output: `kind` json (value: a JSON schema, as JSON text), json_object (any JSON
    object), regex, choice (value: a JSON list of the strings allowed) or grammar (a Lark grammar, as llguidance
    takes it). `name` is the request field it came from, for errors."""

    kind: str
    value: str = ""
    name: str = "structured_outputs"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token, how many sequences to return, and when to stop."""

    max_new_tokens: int = 16
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    seed: Optional[int] = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    best_of: Optional[int] = None
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None  # each prompt token's log-probability (after the first) and this many top ones
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    speculative: bool = True  # with the server's speculative_config on: verify proposed tokens (same output, faster)
    structured: Optional[StructuredOutput] = None  # each token is drawn among those the constraint allows

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0 or self.top_k == 1

    @property
    def agent_temperature(self) -> float:
        """Temperature as sent to the agent, where 0 means greedy."""
        return 0.0 if self.is_greedy else self.temperature

    @property
    def needs_history(self) -> bool:
        """The agent needs the sequence's tokens (prompt and output) to transform the logits."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.no_repeat_ngram_size > 0
        )

    @property
    def num_samples(self) -> int:
        """Sequences generated from the prompt: best_of (default n), or the beams."""
        if self.is_beam_search:
            return self.num_beams
        return self.best_of if self.best_of is not None else self.n

    @property
    def agent_num_logprobs(self) -> int:
        """Top log-probabilities the agent returns per token: -1 none, 0 only the chosen token's (best_of ranks by it)."""
        if self.logprobs is not None:
            return self.logprobs
        return 0 if self.num_samples > self.n and not self.is_beam_search else -1

    @property
    def scores_prompt_only(self) -> bool:
        """max_new_tokens 0: the request only wants its prompt's log-probabilities (lm-eval's loglikelihood)."""
        return self.max_new_tokens == 0 and self.prompt_logprobs is not None and not self.is_beam_search

    @property
    def is_beam_search(self) -> bool:
        return self.num_beams > 1

    def validate(self, limits: SamplingLimits, names: ParamNames = ParamNames()) -> None:
        """Raise RequestError("<parameter>: <problem>") for the first invalid value, spelled by `names`."""
        for name, ok, problem in self._checks(limits, names):
            if not ok:
                raise RequestError(f"{names(name)}: {problem}", param=names(name))

    def _checks(self, limits: SamplingLimits, names: ParamNames):
        yield "max_new_tokens", (1 if not self.scores_prompt_only else 0) <= self.max_new_tokens <= MAX_INT32, (
            f"must be between 1 and {MAX_INT32} (0 only with the prompt's log-probabilities, without beams)"
        )
        yield "min_new_tokens", 0 <= self.min_new_tokens <= self.max_new_tokens, f"must be between 0 and {names('max_new_tokens')}"
        yield "temperature", 0.0 <= self.temperature <= MAX_FLOAT32, f"must be between 0 and {MAX_FLOAT32:g} (float32)"
        yield "top_k", 0 <= self.top_k <= MAX_TOP_K, f"must be between 0 (all tokens) and {MAX_TOP_K}"
        yield "top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"
        yield "min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"
        yield "typical_p", 0.0 < self.typical_p <= 1.0, "must be in (0, 1]"
        yield "repetition_penalty", 0.0 < self.repetition_penalty <= MAX_FLOAT32, (
            f"must be > 0 (1 means none) and at most {MAX_FLOAT32:g} (float32)"
        )
        yield "presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be between -2 and 2"
        yield "frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be between -2 and 2"
        yield "no_repeat_ngram_size", 0 <= self.no_repeat_ngram_size <= MAX_INT32, (
            f"must be between 0 (off) and {MAX_INT32}"
        )
        yield "seed", self.seed is None or 0 <= self.seed <= MAX_SEED, f"must be between 0 and {MAX_SEED}"
        yield "stop", all(self.stop), "stop strings must not be empty"
        yield "stop_token_ids", len(self.stop_token_ids) <= limits.max_stop_token_ids, (
            f"at most {limits.max_stop_token_ids} ids"
        )
        yield "stop_token_ids", all(0 <= i <= MAX_INT32 for i in self.stop_token_ids), (
            f"ids must be between 0 and {MAX_INT32}"
        )
        yield "n", 1 <= self.n <= limits.max_n, f"must be between 1 and {limits.max_n}"
        best_of = self.n if self.best_of is None else self.best_of
        yield "best_of", self.n <= best_of <= limits.max_n, f"must be between {names('n')} and {limits.max_n}"
        yield "best_of", best_of == self.n or not self.is_greedy or self.is_beam_search, (
            f"greedy decoding gives the same output every time; sample (do_sample, temperature > 0) with best_of > {names('n')}"
        )
        yield "logprobs", self.logprobs is None or 0 <= self.logprobs <= limits.max_logprobs, (
            f"must be between 0 and {limits.max_logprobs}"
        )
        yield "prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= limits.max_logprobs, (
            f"must be between 0 and {limits.max_logprobs}"
        )
        yield "num_beams", 1 <= self.num_beams <= limits.max_num_beams, f"must be between 1 and {limits.max_num_beams}"
        yield "num_beams", not (self.is_beam_search and self.do_sample), "beam search here is deterministic; do not sample with it"
        yield "n", not self.is_beam_search or self.n <= self.num_beams, f"must be <= {names('num_beams')} with beam search"
        yield "best_of", not (self.is_beam_search and self.best_of is not None), "does not apply to beam search"
        yield "stop", not (self.is_beam_search and self.stop), f"stop strings do not apply to beam search; use {names('stop_token_ids')}"
        yield "length_penalty", -MAX_FLOAT32 <= self.length_penalty <= MAX_FLOAT32, (
            f"must be a number between -{MAX_FLOAT32:g} and {MAX_FLOAT32:g} (float32)"
        )
        yield "early_stopping", self.early_stopping in (True, False, "never"), "must be true, false or \"never\""
