"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models, /tokenize and /detokenize.

Each body maps onto the engine's SamplingParams; one engine request per prompt,
choices numbered prompt-major (`prompt_index * n + sample_index`) as OpenAI does.
"""
from __future__ import annotations

import dataclasses
import time
import uuid
from typing import AsyncIterator, Optional, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from llmserve.common.errors import ModelNotFound, RequestError
from llmserve.common.sampling import ParamNames, SamplingParams
from llmserve.master.api_errors import error_response
from llmserve.master.api_schema import stream_response
from llmserve.master.chat_template import ChatTemplate
from llmserve.master.engine import Engine, RequestHandle, TokenEvent
from llmserve.master.openai_models import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from llmserve.master.outputs import GenerationOutput
from llmserve.master.sequence import Sequence, TokenLogprobs
from llmserve.master.streams import RequestStream, events_of, sse, wait_finished
from llmserve.master.tokenizer import token_bytes
from llmserve.master.tool_calls import ToolCallStream, ToolReply, parser_for

FINISH_REASONS = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 404, 503)}
DONE = "data: [DONE]\n\n"


def openai_router(engine: Engine, chat_template: ChatTemplate) -> APIRouter:
    """The routes, bound to one engine and the chat template it uses."""
    router = APIRouter(tags=["openai"])
    served = engine.config.model_config.model_name
    card = ModelCard(id=served, created=int(time.time()), max_model_len=engine.model.max_seq_len)
    tool_parser = parser_for(engine.config.model_config.tool_call_parser, chat_template.text)

    def check_model(model: Optional[str]) -> None:
        if model is not None and model != served:
            raise ModelNotFound(f"the model '{model}' does not exist; this server serves '{served}'")

    @router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models() -> JSONResponse:
        """The served model."""
        return JSONResponse({"object": "list", "data": [card.model_dump()]})

    @router.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
    async def get_model(model: str) -> JSONResponse:
        check_model(model)
        return JSONResponse(card.model_dump())

    @router.post(
        "/v1/completions", response_model=CompletionResponse,
        responses=stream_response(CompletionResponse, CompletionResponse, ERROR_RESPONSES, end_marker="[DONE]"),
    )
    async def completions(body: CompletionRequest, request: Request):
        """Text completion of one prompt or a batch (strings or token ids)."""
        check_model(body.model)
        _check_prompt_logprobs(body)
        prompts = await _prompts(engine, body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        echo_scores = body.logprobs if body.logprobs is not None else (0 if max_tokens == 0 else None)
        params = body.sampling_params(max_tokens, body.logprobs, echo_scores if body.echo else None)
        await engine.prepare(params)
        job = CompletionJob(engine, request, body, served)
        job.submit([ids for ids, _ in prompts], params, body.param_names())
        if body.echo:  # token-id prompts are decoded only now that the engine has checked their ids
            job.prompt_texts = [await engine.text_worker.decode(ids) if text is None else text for ids, text in prompts]
        return await job.answer(request)

    @router.post(
        "/v1/chat/completions", response_model=ChatCompletionResponse,
        responses=stream_response(ChatCompletionResponse, ChatCompletionChunk, ERROR_RESPONSES, end_marker="[DONE]"),
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """The assistant's reply to `messages`, rendered with the model's chat template."""
        check_model(body.model)
        _check_prompt_logprobs(body)
        tools = body.tool_reply(tool_parser)
        prompt_ids = await engine.text_worker.encode(await _render(engine, chat_template, body), "messages", False)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = body.sampling_params(1 if max_tokens is None else max_tokens, body.num_logprobs())
        if max_tokens is None:
            params = dataclasses.replace(params, max_new_tokens=_room_for_answer(engine, prompt_ids, params))
        await engine.prepare(params)
        job = ChatJob(engine, request, body, served, tools)
        job.submit([prompt_ids], params, body.param_names())
        return await job.answer(request)

    @router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        """Token ids of a prompt, or of chat messages after the chat template."""
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise RequestError("prompt: give either prompt or messages", "prompt")
        field = "prompt" if body.messages is None else "messages"
        text = body.prompt if body.messages is None else await _render(engine, chat_template, body)
        add_special = body.add_special_tokens if body.add_special_tokens is not None else body.messages is None
        ids = await engine.text_worker.encode(text, field, add_special)
        answer = {"count": len(ids), "max_model_len": engine.model.max_seq_len, "tokens": ids}
        if body.return_token_strs:
            answer["token_strs"] = [engine.tokenizer.id_to_token(i) for i in ids]
        return JSONResponse(answer)

    @router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        """The text of token ids (special tokens included)."""
        check_model(body.model)
        vocab = engine.tokenizer.get_vocab_size(with_added_tokens=True)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"tokens: {bad[0]} is not a token id of this tokenizer (0 to {vocab - 1})", "tokens")
        return JSONResponse({"prompt": await engine.text_worker.run(engine.tokenizer.decode, body.tokens, False)})

    return router


async def _render(engine: Engine, chat_template: ChatTemplate, body: Union[ChatCompletionRequest, TokenizeRequest]) -> str:
    """The prompt text of the body's messages (fields the client did not send are left out, as in its JSON)."""
    messages = [message.model_dump(exclude_unset=True) for message in body.messages]
    return await engine.text_worker.run(
        chat_template.render, messages, body.add_generation_prompt, body.continue_final_message, body.chat_template_kwargs,
        body.tool_dicts(),
    )


def _check_prompt_logprobs(body: Union[CompletionRequest, ChatCompletionRequest]) -> None:
    if body.prompt_logprobs is not None and body.stream:
        raise RequestError("prompt_logprobs: not with stream: true (they come with the whole answer)", "prompt_logprobs")


def _room_for_answer(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> int:
    """Chat without max tokens: as many as the context and the KV cache leave for every sample."""
    room = engine.room_for_output(len(prompt_ids), params.num_samples)
    if room < 1:
        raise RequestError(
            f"messages: the prompt has {len(prompt_ids)} tokens, which leaves no room for an answer within the "
            f"model's {engine.model.max_seq_len} tokens and the KV cache", "messages",
        )
    return room


async def _prompts(engine: Engine, prompt: Union[str, list]) -> list[tuple[list[int], Optional[str]]]:
    """(token ids, text or None for token-id prompts) of each prompt of a completion request (never empty)."""
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        prompt = [prompt]
    return [(await engine.text_worker.encode(p, "prompt"), p) if isinstance(p, str) else (p, None) for p in prompt]


class OpenAIJob:
    """One OpenAI request in flight: its engine requests, and the answer or the stream built from them."""

    object_name = ""
    chunk_object = ""
    id_prefix = ""

    def __init__(self, engine: Engine, request: Request, body: Union[CompletionRequest, ChatCompletionRequest], model: str):
        self.engine = engine
        self.body = body
        self.model = model
        self.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        self.id = f"{self.id_prefix}-{self.request_id}"
        self.created = int(time.time())
        self.handles: list[RequestHandle] = []

    def submit(self, prompts: list[list[int]], params: SamplingParams, names: ParamNames) -> None:
        """One engine request per prompt; none stays queued if any is refused."""
        try:
            for i, prompt_ids in enumerate(prompts):
                request_id = self.request_id if len(prompts) == 1 else f"{self.request_id}-{i}"
                self.handles.append(self.engine.submit(request_id, prompt_ids, params, self.body.stream, names,
                                                       cache_salt=self.body.cache_salt))
        except Exception:
            for handle in self.handles:
                self.engine.withdraw(handle)
            raise

    async def answer(self, request: Request):
        if self.body.stream:
            return RequestStream(self.stream(), self.engine, self.handles)
        path = request.url.path
        finished = await wait_finished(self.engine, self.handles, request)
        if finished is None:
            return error_response(path, 499, "client_disconnected", "the client closed the connection before the answer was complete")
        error = next((event.error for event in finished if event.error), None)
        if error:
            return error_response(path, 503, "generation_failed", error)
        for handle in self.handles:
            await self.engine.decode_outputs(handle)
        choices = [self.choice(i * self.body.n + out.index, i, out) for i, h in enumerate(self.handles) for out in h.outputs]
        return JSONResponse({"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                             "choices": choices, "usage": self.usage(), **self.response_extras()})

    async def stream(self) -> AsyncIterator[str]:
        """The chunks, an error event if the model failed, the usage chunk when asked for, then [DONE].

        RequestStream aborts the requests when the client leaves first.
        """
        for choice in self.opening_choices():
            yield sse(self.chunk(choice))
        async for handle_index, event in events_of(self.handles):
            for choice in self.late_opening_choices(handle_index) if not getattr(event, "error", None) else ():
                yield sse(self.chunk(choice))
            if isinstance(event, TokenEvent):
                choice = self.token_choice(handle_index * self.body.n + event.index, event)
                if choice is not None:
                    yield sse(self.chunk(choice))
            elif event.error:
                yield sse({"error": {"message": event.error, "type": "server_error", "param": None, "code": "generation_failed"}})
                break
        else:
            if self.body.include_usage:
                yield sse({**self.chunk(None), "choices": [], "usage": self.usage()})
        yield DONE

    def chunk(self, choice: Optional[dict]) -> dict:
        chunk = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                 "choices": [choice]}
        if self.body.include_usage:
            chunk["usage"] = None
        return chunk

    def usage(self) -> dict:
        prompt = sum(handle.seq.num_prompt_tokens for handle in self.handles)
        completion = sum(len(out.output_ids) for handle in self.handles for out in handle.outputs)
        cached = sum(handle.seq.num_cached_tokens for handle in self.handles)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def opening_choices(self) -> list[dict]:
        return []

    def late_opening_choices(self, handle_index: int) -> list[dict]:
        """Chunks sent before a prompt's first event: what needs its prompt computed (echo with logprobs)."""
        return []

    def response_extras(self) -> dict:
        return {}

    def choice(self, index: int, handle_index: int, output: GenerationOutput) -> dict:
        raise NotImplementedError

    def token_choice(self, index: int, event: TokenEvent) -> Optional[dict]:
        """The chunk choice of one step's tokens (one chunk however many); None when it carries no text, finish
        or logprobs."""
        finish = FINISH_REASONS.get(event.finish_reason) if event.finish_reason else None
        if not event.text and finish is None and event.logprobs is None:
            return None
        return self.token_delta(index, event, finish)

    def token_delta(self, index: int, event: TokenEvent, finish: Optional[str]) -> dict:
        raise NotImplementedError


class CompletionJob(OpenAIJob):
    object_name = chunk_object = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, engine: Engine, request: Request, body: CompletionRequest, model: str):
        super().__init__(engine, request, body, model)
        self.prompt_texts: list[str] = []  # set with echo
        self.offsets: dict[int, int] = {}  # choice -> characters of token text so far (logprobs' text_offset)
        self.opened: set[int] = set()  # prompts whose echo (with its log-probabilities) was streamed

    def choice(self, index: int, handle_index: int, output: GenerationOutput) -> dict:
        prefix = self.prompt_texts[handle_index] if self.body.echo else ""
        seq, logprobs = self.handles[handle_index].seq, None
        if self.body.logprobs is not None:
            token_ids, entries = output.output_ids, list(output.logprobs)
            if self.body.echo:
                token_ids, entries = seq.prompt_ids + token_ids, [*self.echoed_logprobs(seq), *entries]
            logprobs = _completion_logprobs(self.engine, token_ids, entries, 0)
        choice = {"index": index, "text": prefix + output.text, "logprobs": logprobs,
                  "finish_reason": FINISH_REASONS.get(output.finish_reason)}
        if self.body.prompt_logprobs is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(self.engine, seq, self.body.prompt_logprobs)
        return choice

    def echoed_logprobs(self, seq: Sequence) -> list[Optional[TokenLogprobs]]:
        """The echoed prompt's entries: none for the first token, then `logprobs` top ones each (the engine
        computed as many as the larger of logprobs and prompt_logprobs)."""
        top = self.body.logprobs or 0
        return [None, *(TokenLogprobs(entry.logprob, entry.top[:top], entry.rank) for entry in seq.prompt_logprobs)]

    @property
    def echoes_logprobs(self) -> bool:
        return bool(self.body.echo) and self.body.logprobs is not None

    def opening_choices(self) -> list[dict]:
        if not self.body.echo or self.echoes_logprobs:
            return []
        return [
            {"index": i * self.body.n + j, "text": text, "logprobs": None, "finish_reason": None}
            for i, text in enumerate(self.prompt_texts) for j in range(self.body.n)
        ]

    def late_opening_choices(self, handle_index: int) -> list[dict]:
        if not self.echoes_logprobs or handle_index in self.opened:
            return []
        self.opened.add(handle_index)
        seq = self.handles[handle_index].seq
        logprobs = _completion_logprobs(self.engine, seq.prompt_ids, self.echoed_logprobs(seq), 0)
        first, echoed_chars = handle_index * self.body.n, sum(map(len, logprobs["tokens"]))
        for index in range(first, first + self.body.n):
            self.offsets[index] = echoed_chars
        return [{"index": index, "text": self.prompt_texts[handle_index], "logprobs": logprobs, "finish_reason": None}
                for index in range(first, first + self.body.n)]

    def token_delta(self, index: int, event: TokenEvent, finish: Optional[str]) -> dict:
        logprobs = None
        if event.logprobs is not None:
            start = self.offsets.get(index, 0)
            logprobs = _completion_logprobs(self.engine, event.token_ids, event.logprobs, start)
            self.offsets[index] = start + sum(map(len, logprobs["tokens"]))
        return {"index": index, "text": event.text, "logprobs": logprobs, "finish_reason": finish}


class ChatJob(OpenAIJob):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, engine: Engine, request: Request, body: ChatCompletionRequest, model: str,
                 tools: Optional[ToolReply]):
        super().__init__(engine, request, body, model)
        self.tools = tools  # None: the reply is all content
        self.tool_streams: dict[int, ToolCallStream] = {}  # choice -> its streamed reply, with tools

    def choice(self, index: int, handle_index: int, output: GenerationOutput) -> dict:
        logprobs = None
        if self.body.logprobs:
            logprobs = self.chat_logprobs(output.output_ids, output.logprobs)
        message = {"role": "assistant", "content": output.text, "refusal": None}
        finish = FINISH_REASONS.get(output.finish_reason)
        if self.tools is not None:
            message["content"], calls = self.tools.parse(output.text)
            if calls:
                message["tool_calls"] = [call.as_openai() for call in calls]
            finish = self.tools.finish_reason(calls, finish)
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}

    def chat_logprobs(self, token_ids: list[int], entries: list[TokenLogprobs]) -> dict:
        return {"content": [_chat_logprob(self.engine, t, lp) for t, lp in zip(token_ids, entries)], "refusal": None}

    def opening_choices(self) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(self.body.n)]

    def response_extras(self) -> dict:
        if self.body.prompt_logprobs is None:
            return {}
        return {"prompt_logprobs": vllm_prompt_logprobs(self.engine, self.handles[0].seq, self.body.prompt_logprobs)}

    def token_choice(self, index: int, event: TokenEvent) -> Optional[dict]:
        if self.tools is None:
            return super().token_choice(index, event)
        stream = self.tool_streams.setdefault(index, ToolCallStream(self.tools))
        finish = FINISH_REASONS.get(event.finish_reason) if event.finish_reason else None
        delta, finish = stream.delta(event.text or "", finish)
        if not delta and finish is None and event.logprobs is None:
            return None  # held for the calls
        return self.chunk_choice(index, event, delta, finish)

    def token_delta(self, index: int, event: TokenEvent, finish: Optional[str]) -> dict:
        delta = {"content": event.text} if event.text or finish is None else {}
        return self.chunk_choice(index, event, delta, finish)

    def chunk_choice(self, index: int, event: TokenEvent, delta: dict, finish: Optional[str]) -> dict:
        logprobs = None if event.logprobs is None else self.chat_logprobs(event.token_ids, event.logprobs)
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def _completion_logprobs(engine: Engine, token_ids: list[int], logprobs: list[Optional[TokenLogprobs]],
                         offset: int) -> dict:
    """The legacy completions format: parallel lists, top alternatives as {token text: logprob}; None entries
    (an echoed prompt's first token) are nulls."""
    tokens = [token_string(engine, t)[0] for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    tops: list[Optional[dict[str, float]]] = []
    for entry in logprobs:
        top: Optional[dict[str, float]] = None if entry is None else {}
        for token_id, logprob in entry.top if entry is not None else ():
            top.setdefault(token_string(engine, token_id)[0], logprob)  # tokens with the same text keep the likeliest
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [None if entry is None else entry.logprob for entry in logprobs],
            "top_logprobs": tops, "text_offset": offsets}


def vllm_prompt_logprobs(engine: Engine, seq: Sequence, num_top: int) -> list[Optional[dict]]:
    """vLLM's prompt_logprobs: None for the first prompt token, then {token id: logprob, rank, decoded token}
    for each token and its `num_top` top alternatives."""
    entries: list[Optional[dict]] = [None]
    for token_id, logprobs in zip(seq.prompt_ids[1:], seq.prompt_logprobs):
        entry = {str(token_id): _prompt_logprob(engine, token_id, logprobs.logprob, logprobs.rank)}
        for rank, (top_id, logprob) in enumerate(logprobs.top[:num_top], start=1):
            entry.setdefault(str(top_id), _prompt_logprob(engine, top_id, logprob, rank))
        entries.append(entry)
    return entries


def _prompt_logprob(engine: Engine, token_id: int, logprob: float, rank: int) -> dict:
    return {"logprob": logprob, "rank": rank, "decoded_token": token_string(engine, token_id)[0]}


def _chat_logprob(engine: Engine, token_id: int, logprobs: TokenLogprobs) -> dict:
    entry = _token_logprob(engine, token_id, logprobs.logprob)
    entry["top_logprobs"] = [_token_logprob(engine, i, lp) for i, lp in logprobs.top]
    return entry


def _token_logprob(engine: Engine, token_id: int, logprob: float) -> dict:
    text, raw = token_string(engine, token_id)
    return {"token": text, "logprob": logprob, "bytes": list(raw)}


def token_string(engine: Engine, token_id: int) -> tuple[str, bytes]:
    """A token's text and bytes; a token holding part of a character reads `bytes:\\xNN...`, as in vLLM."""
    raw = token_bytes(engine.tokenizer, token_id)
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw
