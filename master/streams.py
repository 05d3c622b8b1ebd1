"""Waiting on requests from HTTP routes: whole outputs (aborted if the client leaves) or their events in order."""
from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llmserve.master.engine import Engine, FinishEvent, RequestHandle, TokenEvent

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def wait_finished(engine: Engine, handles: list[RequestHandle], request: Request) -> Optional[list[FinishEvent]]:
    """Each handle's finish event, or None when the client disconnected first (the requests are then aborted)."""
    outputs = asyncio.ensure_future(asyncio.gather(*(_last_event(handle) for handle in handles)))
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait((outputs, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        outputs.cancel()
        watcher.cancel()
        await asyncio.gather(outputs, watcher, return_exceptions=True)  # collect the cancellations: no stray warnings
        abort_all(engine, handles)  # no-op for finished requests; frees the blocks when the client went away
    return outputs.result() if outputs in done else None


async def _last_event(handle: RequestHandle) -> FinishEvent:
    async for event in handle.stream():
        if isinstance(event, FinishEvent):
            return event
    raise AssertionError("a request stream ended without a finish event")


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def events_of(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, TokenEvent | FinishEvent]]:
    """(handle index, event) for every event of every handle, as they come, until all have finished."""
    if len(handles) == 1:
        async for event in handles[0].stream():
            yield 0, event
        return
    merged: asyncio.Queue = asyncio.Queue()

    async def forward(index: int, handle: RequestHandle) -> None:
        async for event in handle.stream():
            merged.put_nowait((index, event))

    tasks = [asyncio.ensure_future(forward(i, handle)) for i, handle in enumerate(handles)]
    try:
        for _ in handles:
            while True:
                index, event = await merged.get()
                yield index, event
                if isinstance(event, FinishEvent):
                    break
    finally:
        for task in tasks:
            task.cancel()


class RequestStream(StreamingResponse):
    """Server-sent events that abort their requests however the response ends, even before the first event."""

    def __init__(self, content: AsyncIterator[str], engine: Engine, handles: list[RequestHandle]):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.engine = engine
        self.handles = handles

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            abort_all(self.engine, self.handles)  # no-op for finished requests


def abort_all(engine: Engine, handles: list[RequestHandle]) -> None:
    for handle in handles:
        engine.abort(handle)


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
