"""The HTTP application: our `/models/{name}/generate`, the OpenAI-compatible routes, health, version and metrics."""
from __future__ import annotations

import uuid
from importlib import metadata
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from llmserve.common.errors import ModelNotFound
from llmserve.common.sampling import ParamNames
from llmserve.master.api_errors import NATIVE_PREFIX, ApiKeyMiddleware, BodyLimit, error_response, install_error_handlers
from llmserve.master.api_schema import finish_openapi, stream_response
from llmserve.master.api_models import (
    GenerateRequest, GenerateResponse, GenerateStreamEvent, HealthResponse, NativeError, ResetPrefixCacheResponse,
)
from llmserve.master.chat_template import ChatTemplate, load_chat_template
from llmserve.master.engine import Engine, FinishEvent, RequestHandle, TokenEvent
from llmserve.master.openai_api import openai_router
from llmserve.master.openai_models import ChatCompletionChunk, ErrorResponse, VersionResponse
from llmserve.master.outputs import GenerationOutput
from llmserve.master.sequence import Sequence, TokenLogprobs
from llmserve.master.streams import RequestStream, sse, wait_finished

NATIVE_NAMES = ParamNames(prefix="parameters.")


def version() -> str:
    try:
        return metadata.version("llmserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def create_app(engine: Engine, chat_template: Optional[ChatTemplate] = None) -> FastAPI:
    """The FastAPI application serving `engine`; the chat template defaults to the model's."""
    max_body = engine.config.serving_config.max_request_body_bytes
    app = FastAPI(
        title="llmserve",
        version=version(),
        description="LLM serving: our generate API, the OpenAI-compatible API, health, version and Prometheus metrics.",
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=max_body)
    api_key = engine.config.serving_config.api_key
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.include_router(openai_router(engine, chat_template or load_chat_template(engine.config.model_config)))
    _add_server_routes(app, engine)
    _add_generate_route(app, engine)
    key_error = (lambda path: NativeError if path.startswith(NATIVE_PREFIX) else ErrorResponse) if api_key else None
    finish_openapi(app, (ChatCompletionChunk, GenerateStreamEvent), key_error, request_limits(engine))
    return app


def request_limits(engine: Engine) -> dict[str, dict[str, dict]]:
    """Bounds on request fields from the config and the model, for the schema; the engine checks the same."""
    limits = engine.limits
    batch = engine.config.scheduler_config.decode_batch_size  # every sample or beam of a request decodes at once
    samples, beams, logprobs = min(limits.max_n, batch), min(limits.max_num_beams, batch), limits.max_logprobs
    last_id = engine.model.vocab_size - 1
    sampling = {
        "n": {"maximum": samples}, "best_of": {"maximum": samples}, "num_beams": {"maximum": beams},
        "stop_token_ids": {"maximum": last_id, "max_items": limits.max_stop_token_ids},
        "prompt_logprobs": {"maximum": logprobs},
    }
    return {
        "GenerateParameters": {**sampling, "logprobs": {"maximum": logprobs}},
        "CompletionRequest": {**sampling, "logprobs": {"maximum": logprobs}, "prompt": {"maximum": last_id}},
        "ChatCompletionRequest": {**sampling, "top_logprobs": {"maximum": logprobs}},
        "DetokenizeRequest": {"tokens": {"maximum": engine.tokenizer.get_vocab_size(with_added_tokens=True) - 1}},
    }


def _add_server_routes(app: FastAPI, engine: Engine) -> None:
    @app.get("/health", tags=["server"], response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health() -> JSONResponse:
        """200 while every agent is alive, else 503 with the reason; both with the engine's counts. Never needs the API key."""
        stats = engine.stats()
        if engine.is_healthy:
            return JSONResponse({"status": "ok", **stats})
        reason = engine.failure or engine.transport.failure()
        return JSONResponse({"status": "unhealthy", "reason": reason, **stats}, 503)

    @app.post("/reset_prefix_cache", response_model=ResetPrefixCacheResponse, tags=["server"])
    async def reset_prefix_cache() -> JSONResponse:
        """Forget the prefix cache's blocks no running sequence holds (needs the API key when one is set)."""
        return JSONResponse({"forgotten_blocks": engine.block_manager.reset_cache()})

    @app.get("/version", response_model=VersionResponse, tags=["server"])
    async def get_version() -> JSONResponse:
        """The llmserve version."""
        return JSONResponse({"version": version()})

    @app.get("/metrics", tags=["server"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def metrics() -> Response:
        """Prometheus metrics, all named `llmserve_*` (see the README for the list)."""
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _add_generate_route(app: FastAPI, engine: Engine) -> None:
    model_name = engine.config.model_config.model_name

    errors = {status: {"model": NativeError} for status in (400, 404, 503)}

    @app.post("/models/{name}/generate", tags=["llmserve"], response_model=GenerateResponse,
              responses=stream_response(GenerateResponse, GenerateStreamEvent, errors))
    async def generate(name: str, body: GenerateRequest, request: Request):
        """Generate from `inputs`; with `stream`, server-sent events per token, then one with the whole text."""
        if name != model_name:
            raise ModelNotFound(f"model '{name}' is not served here; this server serves '{model_name}'")
        prompt_ids = await engine.text_worker.encode(body.inputs, "inputs")
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        params = body.parameters.sampling_params()
        await engine.prepare(params)
        handle = engine.submit(request_id, prompt_ids, params, stream=body.stream, names=NATIVE_NAMES,
                               cache_salt=body.cache_salt)
        if body.stream:
            return RequestStream(_sse_events(engine, handle, body), engine, [handle])
        return await _complete(engine, handle, body, request)


async def _complete(engine: Engine, handle: RequestHandle, body: GenerateRequest, request: Request) -> JSONResponse:
    """Wait for the whole output; abort the request if the client goes away first."""
    path = request.url.path
    finished = await wait_finished(engine, [handle], request)
    if finished is None:
        return error_response(path, 499, "client_disconnected", "the client closed the connection before the output was complete")
    finish = finished[0]
    if finish.error:
        return error_response(path, 503, "generation_failed", finish.error)
    await engine.decode_outputs(handle)
    return JSONResponse({"generated_text": _generated_text(handle, body), "details": _details(engine, handle, finish)})


async def _sse_events(engine: Engine, handle: RequestHandle, body: GenerateRequest) -> AsyncIterator[str]:
    """Server-sent events: one per token (with the output's index), then a final one with the whole text and details.

    RequestStream aborts the request when the client leaves first.
    """
    async for event in handle.stream():
        if isinstance(event, TokenEvent):  # one event per token, as TGI streams, however many a step added
            for i, (token_id, text) in enumerate(zip(event.token_ids, event.texts)):
                token = {"id": token_id, "text": text}
                if event.logprobs is not None:
                    token.update(_logprob_entry(engine, token_id, event.logprobs[i]))
                yield sse({"index": event.index, "token": token, "generated_text": None, "details": None})
        elif event.error:
            yield sse({"error": event.error, "error_type": "generation_failed"})
        else:
            await engine.decode_outputs(handle)
            text = _generated_text(handle, body)
            yield sse({"token": None, "generated_text": text, "details": _details(engine, handle, event)})


def _generated_text(handle: RequestHandle, body: GenerateRequest) -> str:
    text = handle.outputs[0].text
    return body.inputs + text if body.parameters.return_full_text else text


def _details(engine: Engine, handle: RequestHandle, finish: FinishEvent) -> dict:
    """Finish reason, token counts and times; logprobs when asked; every sequence when n > 1."""
    first = handle.first_token_time
    details = {
        "finish_reason": finish.reason.value,
        "prompt_tokens": handle.seq.num_prompt_tokens,
        "generated_tokens": len(handle.outputs[0].output_ids) if handle.outputs else handle.seq.num_output_tokens,
        "first_token_time": None if first is None else first - handle.start_time,
        "res_time": (handle.end_time or first or handle.start_time) - handle.start_time,
    }
    params = handle.seq.params
    if params.logprobs is not None and handle.outputs:
        details["logprobs"] = _logprobs(engine, handle.outputs[0])
    if params.n > 1 or params.is_beam_search:
        details["sequences"] = [_sequence(engine, output, params.logprobs is not None) for output in handle.outputs]
    if params.prompt_logprobs is not None:
        details["prefill"] = _prefill(engine, handle.seq)
    return details


def _prefill(engine: Engine, seq: Sequence) -> list[dict]:
    """The prompt's tokens, each after the first with its log-probability (and top ones when asked)."""
    first = seq.prompt_ids[0]
    entries = [{"id": first, "text": engine.token_text(first), "logprob": None}]
    for token_id, logprobs in zip(seq.prompt_ids[1:], seq.prompt_logprobs):
        entry = {"id": token_id, "text": engine.token_text(token_id), **_logprob_entry(engine, token_id, logprobs)}
        if not seq.params.prompt_logprobs:
            del entry["top_logprobs"]
        entries.append(entry)
    return entries


def _sequence(engine: Engine, output: GenerationOutput, with_logprobs: bool) -> dict:
    entry = {
        "index": output.index,
        "generated_text": output.text,
        "token_ids": output.output_ids,
        "finish_reason": output.finish_reason,
        "generated_tokens": len(output.output_ids),
    }
    if output.cumulative_logprob is not None:
        entry["cumulative_logprob"] = output.cumulative_logprob
    if output.score is not None:
        entry["score"] = output.score
    if with_logprobs:
        entry["logprobs"] = _logprobs(engine, output)
    return entry


def _logprobs(engine: Engine, output: GenerationOutput) -> list[dict]:
    return [
        {"id": token_id, "text": engine.token_text(token_id), **_logprob_entry(engine, token_id, logprobs)}
        for token_id, logprobs in zip(output.output_ids, output.logprobs)
    ]


def _logprob_entry(engine: Engine, token_id: int, logprobs: TokenLogprobs) -> dict:
    return {
        "logprob": logprobs.logprob,
        "top_logprobs": [{"id": i, "text": engine.token_text(i), "logprob": lp} for i, lp in logprobs.top],
    }
