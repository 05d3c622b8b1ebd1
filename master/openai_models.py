"""Bodies of the OpenAI-compatible API: requests (validated strictly) and responses (for the schema and the tests).

Requests accept OpenAI's fields plus our sampling extras (top_k, min_p,
repetition_penalty, ...) as extra body fields; a field nobody knows is a 400,
so a typo never silently changes the output.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.errors import RequestError
from common.sampling import ParamNames, SamplingParams
from master.api_schema import Answer

STRICT = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = Field(False, description="Send one last chunk with `usage` (and empty `choices`) before [DONE].")


class OpenAIRequest(BaseModel):
    """A request body in which, as in OpenAI's API, null for any field means its default."""

    model_config = STRICT

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None or key not in cls.model_fields}
        return data


class SamplingFields(OpenAIRequest):
    """Fields both endpoints share: OpenAI's, then the extras vLLM users know."""

    model: Optional[str] = Field(None, description="The served model's name (GET /v1/models); defaults to it.")
    n: Optional[int] = Field(1, description="Choices to return for each prompt.")
    stream: Optional[bool] = Field(False, description="Stream server-sent events `data: {chunk}`, ending with `data: [DONE]`.")
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(None, description="Sampling temperature (default 1); 0 means greedy.")
    top_p: Optional[float] = Field(None, description="Nucleus sampling mass, in (0, 1].")
    stop: Union[str, list[str], None] = Field(None, description="Stop before any of these strings (not returned).")
    seed: Optional[int] = Field(None, description="Same seed and parameters give the same output.")
    presence_penalty: Optional[float] = Field(None, description="In [-2, 2]; subtracted once from generated tokens.")
    frequency_penalty: Optional[float] = Field(None, description="In [-2, 2]; subtracted per occurrence.")
    logit_bias: Optional[dict[str, float]] = Field(None, description="Not supported: must be absent or empty.")
    user: Optional[str] = Field(None, description="Accepted and ignored.")
    # extras (not in OpenAI's API)
    top_k: int = Field(0, description="Extra: sample among the k most likely tokens; 0 or -1 means all.")
    min_p: float = Field(0.0, description="Extra: drop tokens less likely than min_p x the most likely one.")
    typical_p: float = Field(1.0, description="Extra: locally typical sampling mass, in (0, 1].")
    repetition_penalty: float = Field(1.0, description="Extra: transformers' multiplicative penalty over prompt and output.")
    no_repeat_ngram_size: int = Field(0, description="Extra: never repeat an n-gram of this size.")
    min_tokens: int = Field(0, description="Extra: end tokens and stop strings are ignored before this many tokens.")
    ignore_eos: bool = Field(False, description="Extra: keep generating past the end-of-sequence token.")
    stop_token_ids: list[int] = Field(default_factory=list, description="Extra: stop after any of these token ids.")
    best_of: Optional[int] = Field(None, description="Sample this many per prompt and return the n most likely.")
    num_beams: int = Field(1, description="Extra: beam search with this many beams (not streamable).")
    length_penalty: float = Field(1.0, description="Extra: beam scores are divided by length ** length_penalty.")
    early_stopping: Union[bool, Literal["never"]] = Field(False, description="Extra: beam search stopping rule.")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_new_tokens: int, logprobs: Optional[int]) -> SamplingParams:
        """The engine's parameters for one prompt."""
        if self.logit_bias:
            raise RequestError("logit_bias: not supported by this server", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options: only allowed with stream: true", "stream_options")
        temperature = 1.0 if self.temperature is None else self.temperature
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            min_new_tokens=self.min_tokens,
            do_sample=temperature > 0 and self.num_beams == 1,
            temperature=temperature,
            top_k=0 if self.top_k == -1 else self.top_k,
            top_p=1.0 if self.top_p is None else self.top_p,
            min_p=self.min_p,
            typical_p=self.typical_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            stop_token_ids=tuple(self.stop_token_ids),
            n=self.n,
            best_of=self.best_of,
            logprobs=logprobs,
            num_beams=self.num_beams,
            length_penalty=self.length_penalty,
            early_stopping=self.early_stopping,
        )


class CompletionRequest(SamplingFields):
    """Body of POST /v1/completions."""

    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        description="A prompt, a batch of prompts, or the same as token ids."
    )
    max_tokens: Optional[int] = Field(16, description="Tokens to generate at most per choice.")
    echo: Optional[bool] = Field(False, description="Put the prompt before each choice's text.")
    logprobs: Optional[int] = Field(None, description="Return the chosen token's and this many top log-probabilities.")
    suffix: Optional[str] = Field(None, description="Not supported: must be absent.")

    def param_names(self) -> ParamNames:
        return ParamNames(aliases={"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}, prompt="prompt")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: str = Field(description="Only 'text' parts are supported.")
    text: Optional[str] = None


class ChatMessage(BaseModel):
    """One message; fields beyond these are passed to the chat template as they are."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: str = Field(description="system, developer, user, assistant or tool.")
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: str = Field(description="Only 'text' is supported.")


class ChatCompletionRequest(SamplingFields):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(description="The conversation, rendered with the model's chat template.")
    max_completion_tokens: Optional[int] = Field(None, description="Tokens to generate at most; default: up to the context.")
    max_tokens: Optional[int] = Field(None, description="Older name of max_completion_tokens.")
    logprobs: Optional[bool] = Field(False, description="Return each content token's log-probability.")
    top_logprobs: Optional[int] = Field(None, description="With logprobs: this many most likely tokens per position.")
    response_format: Optional[ResponseFormat] = Field(None, description="Only {\"type\": \"text\"}.")
    tools: Optional[list[dict[str, Any]]] = Field(None, description="Not supported: must be absent or empty.")
    tool_choice: Optional[Union[str, dict[str, Any]]] = Field(None, description="Only 'none' (tools are not supported).")
    parallel_tool_calls: Optional[bool] = Field(None, description="Accepted and ignored.")
    store: Optional[bool] = Field(None, description="Accepted and ignored.")
    metadata: Optional[dict[str, str]] = Field(None, description="Accepted and ignored.")
    add_generation_prompt: bool = Field(True, description="Extra: end the prompt where the assistant's reply starts.")
    continue_final_message: bool = Field(False, description="Extra: continue the last message instead of answering it.")
    chat_template_kwargs: Optional[dict[str, Any]] = Field(None, description="Extra: more variables for the template.")

    def param_names(self) -> ParamNames:
        max_name = "max_tokens" if self.max_completion_tokens is None and self.max_tokens is not None else "max_completion_tokens"
        aliases = {"max_new_tokens": max_name, "min_new_tokens": "min_tokens", "logprobs": "top_logprobs"}
        return ParamNames(aliases=aliases, prompt="messages")

    def num_logprobs(self) -> Optional[int]:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs: needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def check_supported(self) -> None:
        """Refuse, by name, the OpenAI features this server does not implement."""
        if self.tools:
            raise RequestError("tools: tool calling is not supported by this server", "tools")
        if self.tool_choice not in (None, "none"):
            raise RequestError("tool_choice: only 'none' is supported (no tool calling)", "tool_choice")
        if self.response_format is not None and self.response_format.type != "text":
            raise RequestError("response_format: only {\"type\": \"text\"} is supported", "response_format")


# ---------------------------------------------------------------- responses


class Usage(Answer):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(Answer):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


FinishReasonField = Optional[Literal["stop", "length"]]


class CompletionChoice(Answer):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: FinishReasonField = None


class CompletionResponse(Answer):
    """The answer of /v1/completions; streamed, each chunk has this shape with the new text only."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class TopLogprob(Answer):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Answer):
    content: Optional[list[TokenLogprob]] = None
    refusal: Optional[list[TokenLogprob]] = None


class AssistantMessage(Answer):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    refusal: Optional[str] = None


class ChatChoice(Answer):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: FinishReasonField = None


class ChatCompletionResponse(Answer):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(Answer):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(Answer):
    index: int
    delta: Delta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: FinishReasonField = None


class ChatCompletionChunk(Answer):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(Answer):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmserve"
    max_model_len: int


class ModelList(Answer):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(Answer):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(Answer):
    """Every error of the OpenAI-compatible endpoints (and 401s), in OpenAI's shape."""

    error: ErrorDetail


# ---------------------------------------------------------------- tokenize


class TokenizeRequest(OpenAIRequest):
    """Body of POST /tokenize: a `prompt`, or chat `messages` rendered with the chat template first."""

    model: Optional[str] = None
    prompt: Optional[str] = Field(None, description="Text to tokenize (give this or messages).")
    messages: Optional[list[ChatMessage]] = Field(None, description="A conversation to render and tokenize.")
    add_special_tokens: Optional[bool] = Field(
        None, description="Add the tokenizer's special tokens (BOS); default true for prompt, false for messages."
    )
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    return_token_strs: bool = Field(False, description="Also return each token's text.")


class TokenizeResponse(Answer):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(OpenAIRequest):
    """Body of POST /detokenize."""

    model: Optional[str] = None
    tokens: list[int]


class DetokenizeResponse(Answer):
    prompt: str


class VersionResponse(Answer):
    version: str
