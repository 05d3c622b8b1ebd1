"""The HTTP API over an in-process engine: outputs, streaming, and every client error."""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import time
from typing import AsyncIterator

import httpx
import pytest
import uvicorn

from llmserve.master.api import create_app
from llmserve.master.engine import Engine
from llmserve.master.sequence import FinishReason
from llmserve.master.tokenizer import decode, encode
from tests.unit.fake_agent import TOKENIZER, fake_config, fake_engine, fake_prompt_logprob

URL = "/models/llama/generate"


def call(requests, engine=None):
    """Start an engine, run `requests(client)` against its app, stop the engine."""

    async def main():
        nonlocal engine
        engine = engine or fake_engine()
        await engine.start()
        try:
            transport = httpx.ASGITransport(app=create_app(engine))
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await requests(client, engine)
        finally:
            await engine.stop()

    return asyncio.run(main())


@contextlib.asynccontextmanager
async def serving_on_loopback(engine: Engine) -> AsyncIterator[int]:
    """Serve the engine's app with uvicorn on a free 127.0.0.1 port in this loop; yield the port; always shut down."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(engine), log_level="critical", lifespan="off", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task
        sock.close()


async def send_raw(port: int, path: str, body: dict) -> asyncio.StreamWriter:
    """POST `body` over a plain socket, so the test can drop the connection mid-answer; the writer closes it."""
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode() + payload)
    await writer.drain()
    return writer


async def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def expected_text(prompt: str, n: int) -> str:
    last = encode(TOKENIZER, prompt)[-1]
    return decode(TOKENIZER, [last + i for i in range(1, n + 1)])


def test_generate_returns_the_text_and_details():
    async def go(client, engine):
        return await client.post(URL, json={"inputs": "I love Beijing, because", "parameters": {"max_new_tokens": 5}})

    response = call(go)
    assert response.status_code == 200
    body = response.json()
    assert body["generated_text"] == expected_text("I love Beijing, because", 5)
    assert body["details"]["generated_tokens"] == 5 and body["details"]["finish_reason"] == "length"
    assert body["details"]["first_token_time"] <= body["details"]["res_time"]


def test_return_full_text_prepends_the_prompt():
    async def go(client, engine):
        return await client.post(URL, json={"inputs": "Hi", "parameters": {"max_new_tokens": 3, "return_full_text": True}})

    assert call(go).json()["generated_text"] == "Hi" + expected_text("Hi", 3)


def test_stream_sends_one_event_per_token_then_the_whole_text():
    async def go(client, engine):
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 4}, "stream": True}
        return await client.post(URL, json=body)

    response = call(go)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[len("data: "):]) for line in response.text.split("\n\n") if line]
    assert len(events) == 5
    assert [e["token"]["id"] for e in events[:4]] == [encode(TOKENIZER, "Hello")[-1] + i for i in range(1, 5)]
    assert "".join(e["token"]["text"] for e in events[:4]) == events[4]["generated_text"]
    assert events[4]["details"]["finish_reason"] == "length"


def test_concurrent_requests_all_complete():
    async def go(client, engine):
        bodies = [{"inputs": "x" * (i + 1), "parameters": {"max_new_tokens": 3 + i}} for i in range(8)]
        return await asyncio.gather(*(client.post(URL, json=b) for b in bodies))

    responses = call(go)
    assert [r.json()["details"]["generated_tokens"] for r in responses] == [3 + i for i in range(8)]


@pytest.mark.parametrize(
    "body, fragment",
    [
        ('{"inputs": "hi", ', "not valid JSON"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 3, "top_q": 1}}, "parameters.top_q: unknown parameter"),
        ({"inputs": "hi", "temperature": 1}, "temperature: unknown parameter"),
        ({"inputs": 5}, "inputs"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": "10"}}, "parameters.max_new_tokens"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 0}}, "parameters.max_new_tokens"),
        ({"inputs": "hi", "parameters": {"top_p": 1.5}}, "parameters.top_p"),
        ({"inputs": "hi", "parameters": {"temperature": -1.0}}, "parameters.temperature"),
        ('{"inputs": "hi", "parameters": {"temperature": 1e309}}', "parameters.temperature: Input should be a finite number"),
        ({"inputs": "hi", "parameters": {"temperature": 1e39}}, "parameters.temperature: must be <= 3.40282e+38"),
        ({"inputs": "hi", "parameters": {"length_penalty": 1e308}}, "parameters.length_penalty: must be <= 3.40282e+38"),
        ({"inputs": "hi", "parameters": {"stop_token_ids": [1024]}}, "parameters.stop_token_ids: 1024 is not a token id"),
        ({"inputs": "hi", "parameters": {"early_stopping": None}}, "parameters.early_stopping"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 500}}, "exceed the model's maximum of 128"),
        ({"parameters": {}}, "inputs: Field required"),
        ({"inputs": "hi", "parameters": {"grammar": {"type": "regex", "value": "(a"}}}, "parameters.grammar.value: "),
        ({"inputs": "hi", "parameters": {"grammar": {"type": "choice", "value": "a"}}}, "takes a non-empty list"),
        ({"inputs": "hi", "parameters": {"grammar": {"type": "json", "value": "[1"}}}, "parameters.grammar.value: not JSON"),
        ({"inputs": "hi", "parameters": {"grammar": {"type": "regex", "value": "a"}, "num_beams": 2}}, "beam search"),
        ({"inputs": "hi", "parameters": {"grammar": {"type": "regex", "value": "a"}, "min_new_tokens": 1}}, "min_new_tokens"),
    ],
)
def test_bad_requests_get_400_naming_the_problem(body, fragment):
    async def go(client, engine):
        if isinstance(body, str):
            return await client.post(URL, content=body, headers={"content-type": "application/json"})
        return await client.post(URL, json=body)

    response = call(go)
    assert response.status_code == 400
    assert fragment in response.json()["error"]


def test_beam_search_reports_when_its_first_token_came():
    async def go(client, engine):
        bodies = [{"inputs": "hi", "parameters": {"num_beams": 2, "max_new_tokens": n}} for n in (1, 4)]  # 1: done at once
        return [await client.post(URL, json=body) for body in bodies]

    for response in call(go):
        details = response.json()["details"]
        assert 0 < details["first_token_time"] <= details["res_time"]


def test_beam_search_with_an_extreme_length_penalty_still_answers_finite_scores():
    async def go(client, engine):
        bodies = [{"inputs": "hi", "parameters": {"num_beams": 2, "n": 2, "max_new_tokens": 6, "length_penalty": penalty}}
                  for penalty in (-3e38, -100.0, 3e38)]  # the length term vanishes or overflows in float32
        return [await client.post(URL, json=body) for body in bodies]

    for response in call(go):
        assert response.status_code == 200
        assert all(math.isfinite(sequence["score"]) for sequence in response.json()["details"]["sequences"])


def test_a_route_asked_with_another_method_is_405_saying_which_are_allowed():
    async def go(client, engine):
        return await client.request("TRACE", "/health"), await client.get(URL)

    trace, get = call(go)
    assert trace.status_code == 405 and trace.headers["allow"] == "GET"
    assert get.status_code == 405 and get.headers["allow"] == "POST" and get.json()["error_type"] == "method_not_allowed"


def test_unknown_model_is_404():
    async def go(client, engine):
        return await client.post("/models/gpt-7/generate", json={"inputs": "hi"})

    response = call(go)
    assert response.status_code == 404 and "gpt-7" in response.json()["error"]


def test_health_is_200_while_the_agent_lives_and_503_after_it_dies():
    async def go(client, engine):
        healthy = await client.get("/health")
        engine.transport.dead_reason = "agent 0 exited"
        await asyncio.sleep(0.6)
        return healthy, await client.get("/health"), await client.post(URL, json={"inputs": "hi"})

    healthy, unhealthy, refused = call(go)
    assert healthy.status_code == 200
    assert unhealthy.status_code == 503 and "agent 0 exited" in unhealthy.json()["reason"]
    assert refused.status_code == 503


def test_client_disconnect_aborts_a_non_streaming_request_and_returns_its_blocks():
    slow = fake_engine(fake_config(decode_batch_waiting_time=0.05, decode_batch_size=8))  # ~20 tokens/s: 100 take 5 s
    body = {"inputs": "a long story", "parameters": {"max_new_tokens": 100, "ignore_eos": True}}

    async def go(client, engine):
        async with serving_on_loopback(engine) as port:
            writer = await send_raw(port, URL, body)
            assert await wait_until(lambda: any(h.seq.num_output_tokens >= 2 for h in engine.handles.values()), timeout=5)
            (handle,) = engine.handles.values()
            busy = engine.stats()
            writer.close()
            await writer.wait_closed()
            is_freed = await wait_until(lambda: engine.stats()["kv_blocks_free"] == busy["kv_blocks_total"], timeout=2)
            return handle, busy, is_freed, engine.stats()

    handle, busy, is_freed, after = call(go, slow)
    assert busy["num_running"] == 1 and busy["kv_blocks_free"] < busy["kv_blocks_total"]
    assert is_freed and after["num_running"] == 0 and after["num_waiting"] == 0
    assert handle.seq.finish_reason is FinishReason.ABORT and handle.seq.num_output_tokens < 100


def test_answers_match_the_models_the_openapi_schema_publishes():
    from llmserve.master.api_models import GenerateResponse, GenerateStreamEvent, HealthResponse, NativeError

    async def go(client, engine):
        params = {"max_new_tokens": 4, "do_sample": True, "n": 2, "logprobs": 2, "seed": 1}
        plain = await client.post(URL, json={"inputs": "Hello", "parameters": params})
        streamed = await client.post(URL, json={"inputs": "Hello", "parameters": {**params, "n": 1}, "stream": True})
        bad = await client.post(URL, json={"inputs": "Hello", "parameters": {"top_p": 7.0}})
        return plain, streamed, bad, await client.get("/health")

    plain, streamed, bad, health = call(go)
    details = GenerateResponse.model_validate(plain.json()).details
    assert len(details.sequences) == 2 and len(details.logprobs) == 4
    events = [json.loads(line[len("data: "):]) for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert [GenerateStreamEvent.model_validate(event).token is not None for event in events] == [True] * 4 + [False]
    assert NativeError.model_validate(bad.json()).error_type == "validation_error"
    assert HealthResponse.model_validate(health.json()).status == "ok"


def test_decoder_input_details_return_the_prompt_tokens_with_their_logprobs_even_after_a_cache_hit():
    from llmserve.master.api_models import GenerateResponse
    ids = encode(TOKENIZER, "Hello there, how are you today")

    async def go(client, engine):
        await client.post(URL, json={"inputs": "Hello there, how are you today"})  # its blocks are cached now
        plain = await client.post(URL, json={"inputs": "Hello there, how are you today",
                                             "parameters": {"decoder_input_details": True}})
        top = await client.post(URL, json={"inputs": "Hello there, how are you today",
                                           "parameters": {"prompt_logprobs": 1, "n": 2, "do_sample": True}})
        return plain, top

    plain, top = call(go)
    prefill = GenerateResponse.model_validate(plain.json()).details.prefill
    assert [token.id for token in prefill] == ids and prefill[0].logprob is None
    assert [token.logprob for token in prefill[1:]] == [fake_prompt_logprob(t) for t in ids[1:]]
    assert all(token.top_logprobs is None for token in prefill)
    prefill = GenerateResponse.model_validate(top.json()).details.prefill
    assert [[t.id for t in token.top_logprobs] for token in prefill[1:]] == [[t] for t in ids[1:]]


def test_reset_prefix_cache_forgets_the_cached_blocks_and_a_repeat_computes_its_prompt_again():
    async def requests(client, engine):
        body = {"inputs": "the same long prompt " * 8, "parameters": {"max_new_tokens": 2}}
        first = await client.post(URL, json=body)
        hits_before = engine.stats()["prefix_cache_hits"]
        await client.post(URL, json=body)
        hits_after_repeat = engine.stats()["prefix_cache_hits"]
        reset = await client.post("/reset_prefix_cache")
        await client.post(URL, json=body)
        return first, hits_before, hits_after_repeat, reset.json(), engine.stats()["prefix_cache_hits"]

    first, hits_before, hits_after_repeat, reset, hits_after_reset = call(requests)
    assert first.status_code == 200 and hits_before == 0 and hits_after_repeat > 0
    assert reset["forgotten_blocks"] > 0
    assert hits_after_reset == hits_after_repeat  # nothing left to find


def test_the_native_api_takes_a_cache_salt_and_refuses_an_empty_one():
    async def requests(client, engine):
        body = {"inputs": "the same long prompt " * 8, "parameters": {"max_new_tokens": 2}}
        await client.post(URL, json=body)
        salted = await client.post(URL, json={**body, "cache_salt": "tenant-b"})
        hits = engine.stats()["prefix_cache_hits"]
        empty = await client.post(URL, json={**body, "cache_salt": ""})
        return salted, hits, empty

    salted, hits, empty = call(requests)
    assert salted.status_code == 200 and hits == 0  # another tenant's identical prompt found nothing
    assert empty.status_code == 400 and "cache_salt" in empty.text
