"""Request bodies of the HTTP API, validated by pydantic (strict types, unknown fields rejected)."""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from llmserve.common.errors import RequestError
from llmserve.common.sampling import MAX_FLOAT32, MAX_TOP_K, SamplingParams, StructuredOutput
from llmserve.master.api_schema import (
    ABSENT, BEAM_SEARCH, INTEGRAL, NOT_TRUE, AtLeastOne, Answer, Count, NonNegative, PositiveCount, Seed, StopString,
    TokenId, fields, when,
)
from llmserve.master.structured import json_constraint

TopK = Annotated[int, Field(ge=0, le=MAX_TOP_K), INTEGRAL]  # 0 means all


class Grammar(BaseModel):
    """A constraint on the generated text, as TGI spells it (json and regex), with choice and grammar added."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["json", "json_object", "regex", "choice", "grammar"] = Field(
        description="json: value is a JSON schema (object or JSON text); json_object: any JSON object (no value); "
                    "regex: a regular expression; choice: a list of strings; grammar: a Lark grammar (llguidance's).")
    value: Union[dict[str, Any], list[str], str, None] = Field(
        None, description="The schema, expression, choices or grammar.")

    def constraint(self) -> StructuredOutput:
        name, value = "parameters.grammar", self.value
        if self.type == "json_object":
            return StructuredOutput("json_object", "", name)
        if self.type == "json" and isinstance(value, (dict, str)):
            return json_constraint(value, f"{name}.value")
        if self.type == "choice" and isinstance(value, list) and value:
            return StructuredOutput("choice", json.dumps(value), f"{name}.value")
        if self.type in ("regex", "grammar") and isinstance(value, str):
            return StructuredOutput(self.type, value, f"{name}.value")
        takes = {"json": "a JSON schema", "choice": "a non-empty list of strings"}.get(self.type, "a string")
        raise RequestError(f"{name}.value: type {self.type} takes {takes}", f"{name}.value")


class GenerateParameters(BaseModel):
    """The `parameters` object of a generate request.

    The schema states each field's range; SamplingParams.validate checks them again with the
    cross-field rules and the server's limits (max_n, max_num_beams, max_logprobs, ...).
    """

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=when(
        BEAM_SEARCH, fields(do_sample=NOT_TRUE, best_of=ABSENT, stop={"maxItems": 0})
    ))

    max_new_tokens: PositiveCount = Field(16, description="Tokens to generate at most.")
    min_new_tokens: Count = Field(0, description="End tokens and stop strings are ignored before this many tokens.")
    do_sample: bool = Field(False, description="Sample instead of taking the most likely token.")
    temperature: float = Field(
        1.0, ge=0.0, le=MAX_FLOAT32, allow_inf_nan=False, description="Softmax temperature when sampling; 0 means greedy."
    )
    top_k: TopK = Field(0, description="Sample among the k most likely tokens; 0 means all.")
    top_p: float = Field(
        1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="Sample among the smallest set with this much probability."
    )
    min_p: float = Field(
        0.0, ge=0.0, le=1.0, allow_inf_nan=False, description="Drop tokens less likely than min_p x the most likely one."
    )
    typical_p: float = Field(
        1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="Locally typical sampling mass; 1 means off."
    )
    repetition_penalty: float = Field(
        1.0, gt=0.0, le=MAX_FLOAT32, allow_inf_nan=False,
        description="Divide positive / multiply negative logits of tokens already in prompt or output; 1 means none.",
    )
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, allow_inf_nan=False, description="Subtracted once from tokens already generated."
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, allow_inf_nan=False, description="Subtracted per occurrence in the output."
    )
    no_repeat_ngram_size: Count = Field(0, description="Never repeat an n-gram of this size; 0 means off.")
    seed: Optional[Seed] = Field(None, description="Same seed and parameters give the same output.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")
    stop: list[StopString] = Field(
        default_factory=list, description="Stop before any of these strings; not part of the output."
    )
    stop_token_ids: list[TokenId] = Field(
        default_factory=list, description="Stop after any of these tokens (at most serving_config.max_stop_token_ids)."
    )
    n: AtLeastOne = Field(1, description="Sequences to return (they share the prompt's KV blocks); at most max_n.")
    best_of: Optional[AtLeastOne] = Field(None, description="Sample this many (n to max_n) and return the n most likely.")
    logprobs: Optional[NonNegative] = Field(
        None, description="Return each token's log-probability and this many top ones (at most max_logprobs)."
    )
    num_beams: AtLeastOne = Field(
        1, description="Beam search with this many beams (not with do_sample); at most max_num_beams."
    )
    length_penalty: float = Field(
        1.0, ge=-MAX_FLOAT32, le=MAX_FLOAT32, allow_inf_nan=False,
        description="Beam scores are divided by length ** length_penalty.",
    )
    early_stopping: Union[bool, Literal["never"]] = Field(
        False, description="Beam search stops: true when num_beams are done, false by heuristic, \"never\"."
    )
    speculative: bool = Field(
        True, description="With the server's speculative_config on: verify proposed tokens in each step (the same "
                          "output in fewer steps); false decodes this request one token per step.",
    )
    grammar: Optional[Grammar] = Field(None, description="Constrain the text to a JSON schema, regex, choice or grammar.")
    return_full_text: bool = Field(False, description="Prepend the prompt to generated_text.")
    decoder_input_details: bool = Field(
        False, description="Return the prompt's tokens with their log-probabilities in details.prefill (TGI's name)."
    )
    prompt_logprobs: Optional[NonNegative] = Field(
        None, description="details.prefill with each prompt token's log-probability and this many top ones (vLLM's name)."
    )

    def sampling_params(self) -> SamplingParams:
        fields = self.model_dump(exclude={"return_full_text", "decoder_input_details", "grammar"})
        fields["structured"] = None if self.grammar is None else self.grammar.constraint()
        if self.decoder_input_details and self.prompt_logprobs is None:
            fields["prompt_logprobs"] = 0
        fields["stop"] = tuple(fields["stop"])
        fields["stop_token_ids"] = tuple(fields["stop_token_ids"])
        return SamplingParams(**fields)


class GenerateRequest(BaseModel):
    """Body of POST /models/{name}/generate."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=when(
        {"required": ["parameters"], "properties": {"parameters": BEAM_SEARCH}}, fields(stream=NOT_TRUE)
    ))

    inputs: str = Field(description="The prompt.")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = Field(False, description="Stream tokens as server-sent events.")
    cache_salt: Optional[str] = Field(
        None, min_length=1, max_length=256,
        description="Prompts share prefix-cache blocks only with requests of the same salt (tenant isolation).",
    )


# ---------------------------------------------------------------- responses (for the OpenAPI schema and the tests)


class TopToken(Answer):
    id: int
    text: str
    logprob: float


class TokenInfo(Answer):
    """A generated token; `logprob` and `top_logprobs` only when `logprobs` was asked for."""

    id: int
    text: str
    logprob: Optional[float] = None
    top_logprobs: Optional[list[TopToken]] = None


class PrefillToken(Answer):
    """A prompt token; the first has no log-probability (nothing before it predicts it)."""

    id: int
    text: str
    logprob: Optional[float] = None
    top_logprobs: Optional[list[TopToken]] = Field(None, description="With prompt_logprobs > 0.")


class SequenceDetails(Answer):
    """One of the n returned sequences (n > 1 or beam search)."""

    index: int
    generated_text: str
    token_ids: list[int]
    finish_reason: str
    generated_tokens: int
    cumulative_logprob: Optional[float] = None
    score: Optional[float] = None
    logprobs: Optional[list[TokenInfo]] = None


class GenerateDetails(Answer):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    prompt_tokens: int
    generated_tokens: int
    first_token_time: Optional[float] = Field(description="Seconds from arrival to the first token.")
    res_time: float = Field(description="Seconds from arrival to the end.")
    logprobs: Optional[list[TokenInfo]] = None
    sequences: Optional[list[SequenceDetails]] = None
    prefill: Optional[list[PrefillToken]] = Field(None, description="With decoder_input_details or prompt_logprobs.")


class GenerateResponse(Answer):
    """The answer without `stream`."""

    generated_text: str
    details: GenerateDetails


class GenerateStreamEvent(Answer):
    """One server-sent event of a streamed generate: a token, or (last) the whole text with details."""

    index: Optional[int] = Field(None, description="Which of the n sequences the token extends.")
    token: Optional[TokenInfo] = None
    generated_text: Optional[str] = None
    details: Optional[GenerateDetails] = None


class NativeError(Answer):
    """Errors of the /models/... routes."""

    error: str
    error_type: str


class ProcessInfo(Answer):
    """A process of this server on this host (agents on other hosts are not listed)."""

    process: str = Field(description="`master` or `agent<rank>`.")
    pid: int
    rss_bytes: int = Field(description="Resident memory.")
    cpu_seconds: float = Field(description="User + system CPU time since the process started.")


class ResetPrefixCacheResponse(Answer):
    forgotten_blocks: int = Field(description="Cached blocks no sequence held, now forgotten (held ones stay).")


class HealthResponse(Answer):
    status: Literal["ok", "unhealthy"]
    reason: Optional[str] = None
    num_running: int
    num_waiting: int
    num_preemptions: int
    kv_blocks_total: int
    kv_blocks_free: int
    kv_cache_tokens: int = Field(description="Tokens the KV cache holds: kv_blocks_total x the block size.")
    prefix_cache_queries: int = Field(description="Prompt tokens looked up in the prefix cache since the start.")
    prefix_cache_hits: int = Field(description="Prompt tokens found there: their KV blocks were reused, not computed.")
    kv_cache_dtype: str = Field(description="What the KV cache stores: auto (the model's dtype) or int8 (pa_config.kv_cache_dtype).")
    agent_restarts: int = Field(description="Times dead agents were replaced (serving_config.agent_restart_limit).")
    processes: list[ProcessInfo] = Field(description="Memory and CPU time of the master and of the agents on its host.")
    kernels: dict[str, str] = Field(description="What the agents compute with: attention backend, linear kernels.")
    spec_drafts: Optional[int] = Field(None, description="With speculative_config on: decode steps of a sequence that "
                                                         "verified proposed tokens.")
    spec_draft_tokens: Optional[int] = Field(None, description="Proposed tokens verified.")
    spec_accepted_tokens: Optional[int] = Field(None, description="Proposed tokens accepted.")
    spec_accepted_per_position: Optional[list[int]] = Field(
        None, description="Per position (0 the first proposed token): drafts whose token there was accepted.")
