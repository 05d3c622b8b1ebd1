"""Bounded requests: bodies over the limit are 413s, impossible or invalid prompts 400s naming their field,
and tokenization runs off the event loop."""
from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import llmserve.master.text_worker as text_worker
from llmserve.common.config import config_from_dict
from llmserve.master.text_worker import max_prompt_chars
from tests.unit.fake_agent import TOKENIZER, fake_engine
from tests.unit.test_api import call, serving_on_loopback

MAX_BODY = 64 * 1024
ROUTES = {
    "/v1/completions": {"prompt": "hello", "max_tokens": 2},
    "/models/llama/generate": {"inputs": "hello", "parameters": {"max_new_tokens": 2}},
}


def limited_engine(max_seq_len: int = 128):
    config = config_from_dict({
        "model_config": {"load_format": "dummy", "dummy_config": {"vocab_size": 1024}, "tokenizer_path": "builtin"},
        "serving_config": {"max_request_body_bytes": MAX_BODY},
        "pa_config": {"num_blocks": 64, "block_size": 4},
    })
    return fake_engine(config, max_seq_len=max_seq_len)


def error_of(response: httpx.Response) -> tuple[str, str]:
    """(code, message) of either error shape."""
    body = response.json()
    if isinstance(body["error"], dict):
        return body["error"]["code"], body["error"]["message"]
    return body["error_type"], body["error"]


@pytest.mark.parametrize("path", ROUTES)
def test_a_declared_body_over_the_limit_is_a_413_in_the_routes_shape_before_it_is_read(path):
    async def requests(client, engine):
        body = json.dumps(ROUTES[path]).encode() + b" " * MAX_BODY
        return await client.post(path, content=body, headers={"content-type": "application/json"})

    response = call(requests, limited_engine())
    assert response.status_code == 413 and response.headers["connection"] == "close"
    code, message = error_of(response)
    assert code == "request_too_large" and "max_request_body_bytes" in message


@pytest.mark.parametrize("path", ROUTES)
def test_a_chunked_body_over_the_limit_is_a_413_in_the_routes_shape(path):
    async def chunks():
        yield json.dumps(ROUTES[path]).encode()[:-1]
        for _ in range(MAX_BODY // 1024 + 1):
            yield b" " * 1024

    async def requests(client, engine):
        return await client.post(path, content=chunks(), headers={"content-type": "application/json"})

    response = call(requests, limited_engine())
    assert response.status_code == 413
    assert error_of(response)[0] == "request_too_large"


def test_bodies_within_the_limit_are_served():
    async def requests(client, engine):
        return [await client.post(path, json=body) for path, body in ROUTES.items()]

    assert [r.status_code for r in call(requests, limited_engine())] == [200, 200]


LONE_SURROGATE = "a\ud800b"
SURROGATE_CASES = [
    ("/models/llama/generate", {"inputs": LONE_SURROGATE}, "inputs"),
    ("/v1/completions", {"prompt": LONE_SURROGATE}, "prompt"),
    ("/v1/completions", {"prompt": ["fine", LONE_SURROGATE]}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONE_SURROGATE}]}, "messages"),
    ("/tokenize", {"prompt": LONE_SURROGATE}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": LONE_SURROGATE}]}, "messages"),
]


@pytest.mark.parametrize("path, body, field", SURROGATE_CASES)
def test_a_lone_surrogate_is_a_400_naming_the_field(path, body, field):
    async def requests(client, engine):
        # json.dumps escapes the surrogate as \ud800, as a client's JSON would
        return await client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})

    response = call(requests)
    assert response.status_code == 400
    code, message = error_of(response)
    assert message.startswith(f"{field}: not valid Unicode")
    if path != "/models/llama/generate":
        assert response.json()["error"]["param"] == field


def test_an_error_quoting_a_lone_surrogate_is_still_json():
    async def requests(client, engine):
        body = json.dumps({"model": LONE_SURROGATE, "prompt": "x"})
        return await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})

    response = call(requests)
    assert response.status_code == 404 and "\\ud800" in response.text
    assert response.json()["error"]["code"] == "model_not_found"


def test_a_prompt_too_long_for_any_tokenization_is_refused_by_its_length_before_tokenizing(monkeypatch):
    def never(*args):
        raise AssertionError("tokenized a prompt its length alone rules out")

    monkeypatch.setattr(text_worker, "encode_checked", never)

    async def requests(client, engine):
        prompt = "x" * (engine.text_worker.max_chars + 1)
        return await client.post("/v1/completions", json={"prompt": prompt})

    response = call(requests)
    assert response.status_code == 400 and "characters cannot fit the model's 128 tokens" in error_of(response)[1]


def test_a_long_prompt_is_counted_on_a_prefix_first():
    async def requests(client, engine):
        prompt = "ab " * (engine.text_worker.max_chars // 3 - 10)  # under the length bound, far over 128 tokens
        return await client.post("/v1/completions", json={"prompt": prompt})

    response = call(requests)
    assert response.status_code == 400 and "first 512 characters alone are" in error_of(response)[1]


def test_health_is_answered_while_a_prompt_is_being_tokenized(monkeypatch):
    """The tokenizer runs on the text worker's thread: a slow tokenization does not hold up the event loop."""
    started, release = threading.Event(), threading.Event()
    real_encode = text_worker.encode_checked

    def slow_encode(*args):
        started.set()
        release.wait(10)
        return real_encode(*args)

    monkeypatch.setattr(text_worker, "encode_checked", slow_encode)

    async def main():
        engine = fake_engine()
        await engine.start()
        try:
            async with serving_on_loopback(engine) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                generate = asyncio.create_task(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=20))
                await asyncio.to_thread(started.wait, 10)
                health = await client.get("/health", timeout=5)
                was_pending = not generate.done()
                release.set()
                return health.status_code, was_pending, (await generate).status_code
        finally:
            release.set()
            await engine.stop()

    assert asyncio.run(main()) == (200, True, 200)


def test_the_length_bound_holds_only_for_tokenizers_that_keep_every_character():
    assert max_prompt_chars(TOKENIZER, 100) == 100 * max(len(p) for p in TOKENIZER.get_vocab()) * 4
    dropping = Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    dropping.pre_tokenizer = pre_tokenizers.Whitespace()  # spaces make no tokens: any length may fit
    assert max_prompt_chars(dropping, 100) is None
