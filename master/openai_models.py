"""Bodies of the OpenAI-compatible API: requests (validated strictly) and responses (for the schema and the tests).

Requests accept OpenAI's fields plus our sampling extras (top_k, min_p,
repetition_penalty, ...) as extra body fields; a field nobody knows is a 400,
so a typo never silently changes the output.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from llmserve.common.errors import RequestError
from llmserve.common.sampling import MAX_FLOAT32, MAX_TOP_K, ParamNames, SamplingParams, StructuredOutput
from llmserve.master.api_schema import (
    ABSENT, BEAM_SEARCH, INTEGRAL, NOT_TRUE, AtLeastOne, Answer, Count, NonNegative, PositiveCount, Seed, StopString,
    TokenId, equals, fields, is_set, when,
)
from llmserve.master.structured import json_constraint
from llmserve.master.tool_calls import ToolReply, forced_constraint

STRICT = ConfigDict(extra="forbid", strict=True)
TopK = Annotated[int, Field(ge=-1, le=MAX_TOP_K), INTEGRAL]  # 0 and -1 mean all
# What SamplingFields.sampling_params and SamplingParams.validate refuse, as far as JSON Schema can say it.
SAMPLING_RULES = [
    when(is_set("stream_options"), equals("stream", True)),
    when(BEAM_SEARCH, fields(best_of=ABSENT, stop={"anyOf": [ABSENT, {"type": "array", "maxItems": 0}]}, stream=NOT_TRUE)),
]


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = Field(False, description="Send one last chunk with `usage` (and empty `choices`) before [DONE].")


class StructuredOutputs(BaseModel):
    """Extra (vLLM's structured outputs): exactly one constraint on the output."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    json_schema: Optional[Union[dict[str, Any], str]] = Field(
        None, alias="json", description="A JSON schema (an object, or its JSON text) the output must follow.")
    regex: Optional[str] = Field(None, description="A regular expression the whole output must match.")
    choice: Optional[list[str]] = Field(None, min_length=1, description="The output is one of these strings.")
    grammar: Optional[str] = Field(None, description="A Lark grammar (llguidance's dialect) the output must follow.")

    def constraint(self, name: str = "structured_outputs") -> StructuredOutput:
        fields = (("json", self.json_schema), ("regex", self.regex), ("choice", self.choice), ("grammar", self.grammar))
        given = {kind: value for kind, value in fields if value is not None}
        if len(given) != 1:
            raise RequestError(f"{name}: give exactly one of json, regex, choice, grammar", name)
        (kind, value), = given.items()
        if kind == "json":
            return json_constraint(value, f"{name}.json")
        if kind == "choice":
            return StructuredOutput("choice", json.dumps(value), f"{name}.choice")
        return StructuredOutput(kind, value, f"{name}.{kind}")


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
    """Fields both endpoints share: OpenAI's, then the extras vLLM users know.

    The schema states each field's range; SamplingParams.validate checks them again with the
    cross-field rules and the server's limits (max_n, max_num_beams, max_logprobs, ...).
    """

    model: Optional[str] = Field(None, description="The served model's name (GET /v1/models); defaults to it.")
    n: Optional[AtLeastOne] = Field(1, description="Choices to return for each prompt (at most serving_config.max_n).")
    stream: Optional[bool] = Field(False, description="Stream server-sent events `data: {chunk}`, ending with `data: [DONE]`.")
    stream_options: Optional[StreamOptions] = Field(None, description="Only with stream: true.")
    temperature: Optional[float] = Field(
        None, ge=0.0, le=MAX_FLOAT32, allow_inf_nan=False, description="Sampling temperature (default 1); 0 means greedy."
    )
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0, allow_inf_nan=False, description="Nucleus sampling mass.")
    stop: Union[StopString, list[StopString], None] = Field(
        None, description="Stop before any of these strings (not returned)."
    )
    seed: Optional[Seed] = Field(None, description="Same seed and parameters give the same output.")
    presence_penalty: Optional[float] = Field(
        None, ge=-2.0, le=2.0, allow_inf_nan=False, description="Subtracted once from generated tokens."
    )
    frequency_penalty: Optional[float] = Field(
        None, ge=-2.0, le=2.0, allow_inf_nan=False, description="Subtracted per occurrence."
    )
    logit_bias: Optional[dict[str, float]] = Field(None, max_length=0, description="Not supported: must be absent or empty.")
    user: Optional[str] = Field(None, description="Accepted and ignored.")
    # extras (not in OpenAI's API)
    cache_salt: Optional[str] = Field(
        None, min_length=1, max_length=256,
        description="Extra: prompts share prefix-cache blocks only with requests of the same salt (tenant isolation).",
    )
    top_k: Optional[TopK] = Field(0, description="Extra: sample among the k most likely tokens; 0 or -1 means all.")
    min_p: Optional[float] = Field(
        0.0, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Extra: drop tokens less likely than min_p x the most likely one.",
    )
    typical_p: Optional[float] = Field(
        1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="Extra: locally typical sampling mass; 1 means off."
    )
    repetition_penalty: Optional[float] = Field(
        1.0, gt=0.0, le=MAX_FLOAT32, allow_inf_nan=False,
        description="Extra: transformers' multiplicative penalty over prompt and output; 1 means none.",
    )
    no_repeat_ngram_size: Optional[Count] = Field(0, description="Extra: never repeat an n-gram of this size.")
    min_tokens: Optional[Count] = Field(
        0, description="Extra: end tokens and stop strings are ignored before this many tokens."
    )
    ignore_eos: Optional[bool] = Field(False, description="Extra: keep generating past the end-of-sequence token.")
    stop_token_ids: Optional[list[TokenId]] = Field(
        default_factory=list,
        description="Extra: stop after any of these token ids of the model's vocabulary (at most max_stop_token_ids).",
    )
    best_of: Optional[AtLeastOne] = Field(
        None, description="Sample this many per prompt (n to max_n); return the n most likely."
    )
    num_beams: Optional[AtLeastOne] = Field(1, description="Extra: beam search with this many beams (not streamable).")
    length_penalty: Optional[float] = Field(
        1.0, ge=-MAX_FLOAT32, le=MAX_FLOAT32, allow_inf_nan=False,
        description="Extra: beam scores are divided by length ** length_penalty.",
    )
    early_stopping: Union[bool, Literal["never"], None] = Field(False, description="Extra: beam search stopping rule.")
    prompt_logprobs: Optional[NonNegative] = Field(
        None, description="Extra: each prompt token's log-probability and this many top ones, in prompt_logprobs.",
    )
    speculative: Optional[bool] = Field(
        True, description="Extra: with the server's speculative_config on, verify proposed tokens in each step (same "
                          "output, fewer steps); false decodes one token per step.",
    )
    structured_outputs: Optional[StructuredOutputs] = Field(
        None, description="Extra: constrain the output to a JSON schema, a regular expression, a choice of strings, "
                          "or a Lark grammar (one of them).",
    )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_new_tokens: int, logprobs: Optional[int],
                        prompt_logprobs: Optional[int] = None) -> SamplingParams:
        """The engine's parameters for one prompt; `prompt_logprobs` when the endpoint asks for more than the field."""
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
            prompt_logprobs=_most(self.prompt_logprobs, prompt_logprobs),
            num_beams=self.num_beams,
            length_penalty=self.length_penalty,
            early_stopping=self.early_stopping,
            speculative=self.speculative is not False,
            structured=self.structured_output(),
        )

    def structured_output(self) -> Optional[StructuredOutput]:
        """The request's constraint on the output, if any."""
        return None if self.structured_outputs is None else self.structured_outputs.constraint()


def _most(*counts: Optional[int]) -> Optional[int]:
    given = [count for count in counts if count is not None]
    return max(given) if given else None


def _prompt_kind(value: Any) -> str:
    """Which form of prompt the client sent, so a bad one is reported against that form only."""
    if not isinstance(value, list):
        return "str"
    first = value[0] if value else ""
    return {str: "list[str]", list: "list[list[int]]"}.get(type(first), "list[int]")


# A completion prompt: text, texts, token ids, or lists of token ids; never empty.
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Prompt = Annotated[
    Union[
        Annotated[str, Tag("str")],
        Annotated[list[str], Field(min_length=1), Tag("list[str]")],
        Annotated[TokenIds, Tag("list[int]")],
        Annotated[list[TokenIds], Field(min_length=1), Tag("list[list[int]]")],
    ],
    Discriminator(_prompt_kind),
]


class CompletionRequest(SamplingFields):
    """Body of POST /v1/completions."""

    model_config = ConfigDict(
        json_schema_extra={"allOf": SAMPLING_RULES}
    )

    prompt: Prompt = Field(description="A prompt, a batch of prompts, or the same as token ids.")
    max_tokens: Optional[Count] = Field(
        16, description="Tokens to generate at most per choice; 0 only with echo or prompt_logprobs (score the prompt).",
    )
    echo: Optional[bool] = Field(
        False, description="Put the prompt before each choice's text; with logprobs, its tokens' log-probabilities too.",
    )
    logprobs: Optional[NonNegative] = Field(
        None, description="Return the chosen token's and this many top log-probabilities (at most max_logprobs)."
    )

    def param_names(self) -> ParamNames:
        return ParamNames(aliases={"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}, prompt="prompt")


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str


class FunctionCall(BaseModel):
    model_config = STRICT

    name: str
    arguments: str = Field(description="The arguments object, as JSON text.")


class ToolCallEntry(BaseModel):
    model_config = STRICT

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One message of the conversation, handed to the chat template."""

    model_config = ConfigDict(**STRICT, json_schema_extra={"allOf": [
        {"anyOf": [is_set("content"), {"allOf": [equals("role", "assistant"), is_set("tool_calls")]}]},
        when(is_set("tool_calls"), equals("role", "assistant")),
    ]})

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = Field(
        None, description="The text, or text parts (joined with newlines); may be absent or null only in an "
                          "assistant message with tool_calls.")
    name: Optional[str] = Field(None, description="The author's name, for templates that use it.")
    tool_calls: Optional[list[ToolCallEntry]] = Field(
        None, min_length=1, description="An assistant message's calls of the tools; the template gets each call's "
                                        "arguments as an object when they are a JSON object.")
    tool_call_id: Optional[str] = Field(None, description="A tool message: the call its content answers.")
    refusal: Optional[str] = Field(None, description="An assistant message's, as the API answered it; accepted so "
                                                     "that a returned message can be sent back.")

    @model_validator(mode="after")
    def _content_or_calls(self) -> "ChatMessage":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content: required, except in an assistant message with tool_calls")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls: only an assistant message has them, not a {self.role} message")
        return self


class FunctionDefinition(BaseModel):
    model_config = STRICT

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = Field(None, description="A JSON schema of the arguments object.")
    strict: Optional[bool] = Field(None, description="Accepted; forced calls always follow the schema.")


class ToolDefinition(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = STRICT

    name: str


class NamedToolChoice(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: NamedFunction


class ToolsField(BaseModel):
    """The `tools` of a chat request (and of /tokenize, which renders them the same way)."""

    tools: Optional[list[ToolDefinition]] = Field(
        None, max_length=128,
        description="Functions the model may call; the chat template renders them (whatever tool_choice is).")

    def tool_dicts(self) -> list[dict]:
        """The tools as the chat template and the forced-call constraint take them."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools or ()]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(description="The schema's name (not used).")
    description: Optional[str] = Field(None, description="What the schema is for (not used).")
    json_schema: Optional[dict[str, Any]] = Field(
        None, alias="schema", description="The JSON schema; absent: any JSON object.")
    strict: Optional[bool] = Field(None, description="Accepted; the output always follows the schema.")


class ResponseFormat(BaseModel):
    model_config = STRICT

    type: Literal["text", "json_object", "json_schema"] = Field(
        description="text (no constraint), json_object (any JSON object) or json_schema (follow json_schema.schema).")
    json_schema: Optional[JsonSchemaFormat] = Field(None, description="With type json_schema: the schema.")

    def constraint(self) -> Optional[StructuredOutput]:
        if self.type == "text":
            return None
        if self.type == "json_schema" and self.json_schema is None:
            name = "response_format.json_schema"
            raise RequestError(f"{name}: required with type json_schema", name)
        if self.type == "json_object" or self.json_schema.json_schema is None:
            return StructuredOutput("json_object", "", "response_format")
        return json_constraint(self.json_schema.json_schema, "response_format.json_schema.schema")


class ChatCompletionRequest(SamplingFields, ToolsField):
    """Body of POST /v1/chat/completions."""

    model_config = ConfigDict(json_schema_extra={"allOf": [
        *SAMPLING_RULES,
        when(is_set("top_logprobs"), equals("logprobs", True)),
        when(equals("continue_final_message", True), equals("add_generation_prompt", False)),
    ]})

    messages: list[ChatMessage] = Field(
        min_length=1, description="The conversation, rendered with the model's chat template."
    )
    max_completion_tokens: Optional[PositiveCount] = Field(
        None, description="Tokens to generate at most; default: up to the context."
    )
    max_tokens: Optional[PositiveCount] = Field(None, description="Older name of max_completion_tokens.")
    logprobs: Optional[bool] = Field(False, description="Return each content token's log-probability.")
    top_logprobs: Optional[NonNegative] = Field(
        None, description="With logprobs: this many most likely tokens per position (at most max_logprobs)."
    )
    response_format: Optional[ResponseFormat] = Field(
        None, description="text, json_object or json_schema: the reply's content is JSON that follows the schema.")
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = Field(
        None, description="none, auto (the default with tools: the model decides), required (one call or more), or "
                          "{\"type\": \"function\", \"function\": {\"name\": ...}} (that function).")
    parallel_tool_calls: Optional[bool] = Field(
        None, description="false: one call at most (required: the constraint allows one; auto: the first found).")
    store: Optional[bool] = Field(None, description="Accepted and ignored.")
    metadata: Optional[dict[str, str]] = Field(None, description="Accepted and ignored.")
    add_generation_prompt: Optional[bool] = Field(
        True, description="Extra: end the prompt where the assistant's reply starts."
    )
    continue_final_message: Optional[bool] = Field(
        False, description="Extra: continue the last message instead of answering it (needs add_generation_prompt false)."
    )
    chat_template_kwargs: Optional[dict[str, Any]] = Field(None, description="Extra: more variables for the template.")

    def structured_output(self) -> Optional[StructuredOutput]:
        constraint = None if self.response_format is None else self.response_format.constraint()
        if constraint is not None and self.structured_outputs is not None:
            raise RequestError("response_format: give it or structured_outputs, not both", "response_format")
        constraint = constraint or super().structured_output()
        if self.tool_mode() not in ("required", "named"):
            return constraint
        if constraint is not None:
            raise RequestError("tool_choice: a forced call cannot be combined with response_format or "
                               "structured_outputs", "tool_choice")
        return forced_constraint(self.tool_dicts(), self.named_tool(), self.parallel_tool_calls is not False)

    def tool_mode(self) -> str:
        """none, auto, required or named: what the reply may be."""
        choice = self.tool_choice
        mode = "named" if isinstance(choice, NamedToolChoice) else choice or ("auto" if self.tools else "none")
        if mode != "none" and not self.tools:
            raise RequestError(f"tool_choice: {mode} needs tools", "tool_choice")
        return mode

    def named_tool(self) -> Optional[str]:
        """The function tool_choice names (one of the tools), or None."""
        if not isinstance(self.tool_choice, NamedToolChoice):
            return None
        name = self.tool_choice.function.name
        if name not in [tool.function.name for tool in self.tools or ()]:
            raise RequestError(f"tool_choice: no tool is named {name!r}", "tool_choice")
        return name

    def tool_reply(self, parser: Optional[str]) -> Optional[ToolReply]:
        """How the replies read under the tools (None: tool_choice none, all content); `parser` is the server's
        parser for free text (None: the chat template has no tool format and none was configured)."""
        mode = self.tool_mode()
        if mode == "none":
            return None
        if mode == "auto" and parser is None:
            raise RequestError(
                "tool_choice: auto needs a tool-call format, and this server's chat template has none; serve with a "
                "template that renders tools, or set model_config.tool_call_parser, or use tool_choice required or "
                "a named function", "tool_choice")
        return ToolReply(mode, self.named_tool(), parser if mode == "auto" else None,
                         frozenset(tool.function.name for tool in self.tools), self.parallel_tool_calls is not False)

    def param_names(self) -> ParamNames:
        max_name = "max_tokens" if self.max_completion_tokens is None and self.max_tokens is not None else "max_completion_tokens"
        aliases = {"max_new_tokens": max_name, "min_new_tokens": "min_tokens", "logprobs": "top_logprobs"}
        return ParamNames(aliases=aliases, prompt="messages")

    def num_logprobs(self) -> Optional[int]:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs: needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


# ---------------------------------------------------------------- responses


class PromptTokensDetails(Answer):
    cached_tokens: int = Field(description="Prompt tokens whose KV blocks the prefix cache held (not computed again).")


class Usage(Answer):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(Answer):
    """Parallel lists; with echo they start with the prompt's tokens, whose first has null log-probabilities."""

    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class PromptLogprob(Answer):
    logprob: float
    rank: int = Field(description="Among the whole vocabulary; 1 is the most likely.")
    decoded_token: str


PromptLogprobs = Optional[list[Optional[dict[str, PromptLogprob]]]]
PROMPT_LOGPROBS_DESCRIPTION = (
    "With prompt_logprobs: per prompt token (null for the first), {token id: ...} for the token and the top ones."
)


FinishReasonField = Optional[Literal["stop", "length"]]
ChatFinishReason = Optional[Literal["stop", "length", "tool_calls"]]


class CompletionChoice(Answer):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: FinishReasonField = None
    prompt_logprobs: PromptLogprobs = Field(None, description=PROMPT_LOGPROBS_DESCRIPTION)


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


class FunctionCallAnswer(Answer):
    name: str
    arguments: str = Field(description="The arguments object as JSON text (cut short if the reply was).")


class ToolCallAnswer(Answer):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallAnswer


class AssistantMessage(Answer):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = Field(None, description="The reply's text; null when it is all tool calls.")
    refusal: Optional[str] = None
    tool_calls: Optional[list[ToolCallAnswer]] = Field(None, description="With tools: the calls found or forced.")


class ChatChoice(Answer):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: ChatFinishReason = Field(
        None, description="tool_calls when the model called tools (auto, required); a named call ends with stop.")


class ChatCompletionResponse(Answer):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs = Field(None, description=PROMPT_LOGPROBS_DESCRIPTION)


class FunctionCallDelta(Answer):
    name: Optional[str] = None
    arguments: Optional[str] = None


class ToolCallDelta(Answer):
    index: int
    id: Optional[str] = Field(None, description="In a call's first delta, with its type and name.")
    type: Optional[Literal["function"]] = None
    function: FunctionCallDelta


class Delta(Answer):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCallDelta]] = Field(
        None, description="A named call's arguments stream as they come; other calls come whole when the reply ends.")


class ChatChunkChoice(Answer):
    index: int
    delta: Delta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: ChatFinishReason = None


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


class TokenizeRequest(OpenAIRequest, ToolsField):
    """Body of POST /tokenize: a `prompt`, or chat `messages` rendered with the chat template first."""

    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"oneOf": [is_set("prompt"), is_set("messages")]},
        when(
            {"allOf": [equals("continue_final_message", True), is_set("messages")]}, equals("add_generation_prompt", False)
        ),
    ]})

    model: Optional[str] = None
    prompt: Optional[str] = Field(None, description="Text to tokenize (give this or messages).")
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1, description="A conversation to render and tokenize.")
    add_special_tokens: Optional[bool] = Field(
        None, description="Add the tokenizer's special tokens (BOS); default true for prompt, false for messages."
    )
    add_generation_prompt: Optional[bool] = True
    continue_final_message: Optional[bool] = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    return_token_strs: Optional[bool] = Field(False, description="Also return each token's text.")


class TokenizeResponse(Answer):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(OpenAIRequest):
    """Body of POST /detokenize."""

    model: Optional[str] = None
    tokens: list[TokenId] = Field(description="Ids of the tokenizer's vocabulary.")


class DetokenizeResponse(Answer):
    prompt: str


class VersionResponse(Answer):
    version: str
