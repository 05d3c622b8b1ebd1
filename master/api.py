"""HTTP routes: `/models/{name}/generate` (streaming or not) and `/health`."""
from __future__ import annotations

import asyncio
import json
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from common.errors import LLMServeError, ModelNotFound
from master.api_models import GenerateRequest, validation_message
from master.engine import Engine, FinishEvent, RequestHandle, TokenEvent
from master.outputs import GenerationOutput
from master.sequence import TokenLogprobs
from master.tokenizer import encode

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI application serving `engine`."""
    app = FastAPI(title="llmserve", version="0.1.0")
    model_name = engine.config.model_config.model_name

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "validation_error", validation_message(exc))

    @app.exception_handler(LLMServeError)
    async def _known_error(request: Request, exc: LLMServeError) -> JSONResponse:
        return error_response(exc.status_code, _error_type(exc), str(exc))

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while every agent is alive, else 503 with the reason; both with the engine's counts."""
        stats = engine.stats()
        if engine.is_healthy:
            return JSONResponse({"status": "ok", **stats})
        reason = engine.failure or engine.transport.failure()
        return JSONResponse({"status": "unhealthy", "reason": reason, **stats}, 503)

    @app.post("/models/{name}/generate")
    async def generate(name: str, body: GenerateRequest, request: Request):
        if name != model_name:
            raise ModelNotFound(f"model '{name}' is not served here; this server serves '{model_name}'")
        prompt_ids = encode(engine.tokenizer, body.inputs)
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        params = body.parameters.sampling_params()
        handle = engine.submit(request_id, prompt_ids, params, stream=body.stream, param_prefix="parameters.")
        if body.stream:
            return StreamingResponse(_sse_events(engine, handle, body), media_type="text/event-stream", headers=SSE_HEADERS)
        return await _complete(engine, handle, body, request)

    return app


async def _complete(engine: Engine, handle: RequestHandle, body: GenerateRequest, request: Request) -> JSONResponse:
    """Wait for the whole output; abort the request if the client goes away first."""
    output = asyncio.create_task(_last_event(handle))
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait((output, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        output.cancel()
        watcher.cancel()
        engine.abort(handle)  # no-op when finished; frees the blocks when the client went away
    if output not in done:
        return error_response(499, "client_disconnected", "the client closed the connection before the output was complete")
    finish = output.result()
    if finish.error:
        return error_response(503, "generation_failed", finish.error)
    return JSONResponse({"generated_text": _generated_text(engine, handle, body), "details": _details(engine, handle, finish)})


async def _last_event(handle: RequestHandle) -> FinishEvent:
    async for event in handle.stream():
        if isinstance(event, FinishEvent):
            return event
    raise AssertionError("a request stream ended without a finish event")


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse_events(engine: Engine, handle: RequestHandle, body: GenerateRequest) -> AsyncIterator[str]:
    """Server-sent events: one per token (with the output's index), then a final one with the whole text and details."""
    try:
        async for event in handle.stream():
            if isinstance(event, TokenEvent):
                token = {"id": event.token_id, "text": event.text}
                if event.logprobs is not None:
                    token.update(_logprob_entry(engine, event.token_id, event.logprobs))
                yield _sse({"index": event.index, "token": token, "generated_text": None, "details": None})
            elif event.error:
                yield _sse({"error": event.error, "error_type": "generation_failed"})
            else:
                text = _generated_text(engine, handle, body)
                yield _sse({"token": None, "generated_text": text, "details": _details(engine, handle, event)})
    finally:
        engine.abort(handle)  # no-op when finished; frees the blocks when the client went away


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _generated_text(engine: Engine, handle: RequestHandle, body: GenerateRequest) -> str:
    text = engine.output_text(handle)
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
    return details


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


def error_response(status: int, error_type: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status)


def _error_type(exc: LLMServeError) -> str:
    name = type(exc).__name__
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")

