"""The official `openai` client against a live server on 127.0.0.1 that requires an API key."""
from __future__ import annotations

import asyncio
import json
import re
from typing import Literal

import httpx
import openai
import pydantic
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.server import running_server, write_config
from llmserve.tools.bench_serving import OpenAIBackend, Prompt, run_load

KEY = "test-key-123"
PROMPT = "I love Beijing, because"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("openai"), serving_config={"api_key": KEY, "max_logprobs": 5})
    with running_server(config) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60) as client:
        yield client


def native_greedy(server, prompt: str, max_new_tokens: int) -> dict:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos": True}}
    response = httpx.post(f"{server.url}/models/llama/generate", json=body, headers=auth(), timeout=60)
    response.raise_for_status()
    return response.json()


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def test_completion_text_usage_and_finish_match_our_own_api(server, client):
    reference = native_greedy(server, PROMPT, 8)
    completion = client.completions.create(model="llama", prompt=PROMPT, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert completion.choices[0].text == reference["generated_text"]
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.prompt_tokens == reference["details"]["prompt_tokens"]
    assert completion.usage.completion_tokens == 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 8


def test_streamed_completion_adds_up_to_the_same_text_with_usage_last(server, client):
    reference = native_greedy(server, PROMPT, 8)
    stream = client.completions.create(model="llama", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference["generated_text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_stop_string_finishes_with_stop(server, client):
    text = native_greedy(server, PROMPT, 8)["generated_text"]
    stop = text[3:6]
    completion = client.completions.create(model="llama", prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop],
                                           extra_body={"ignore_eos": True})
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].text == text[: text.index(stop)]


def test_chat_completion_and_its_stream_agree(server, client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]
    answer = client.chat.completions.create(model="llama", messages=messages, max_completion_tokens=6, temperature=0,
                                            extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(model="llama", messages=messages, max_completion_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 6
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == answer.usage.prompt_tokens


def test_chat_prompt_is_the_rendered_template(server, client):
    messages = [{"role": "user", "content": "Say something."}]
    tokenized = httpx.post(f"{server.url}/tokenize", json={"messages": messages}, headers=auth(), timeout=10).json()
    answer = client.chat.completions.create(model="llama", messages=messages, max_tokens=2, temperature=0)
    assert answer.usage.prompt_tokens == tokenized["count"]


def test_seeded_samples_with_logprobs(server, client):
    kwargs = dict(model="llama", prompt=PROMPT, max_tokens=5, temperature=1.0, n=2, seed=7, logprobs=3,
                  extra_body={"ignore_eos": True})
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1]
    for choice in first.choices:
        assert len(choice.logprobs.tokens) == 5 and all(lp <= 0 for lp in choice.logprobs.token_logprobs)
        assert all(len(top) <= 3 for top in choice.logprobs.top_logprobs)


def test_errors_raise_the_matching_openai_exceptions(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="llama", prompt="x", max_tokens=1, top_p=3.0)
    assert missing.value.code == "model_not_found"
    assert bad.value.param == "top_p" and "top_p" in bad.value.message
    assert [m.id for m in client.models.list()] == ["llama"]


def test_health_is_open_and_metrics_count_what_was_served(server, client):
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 401
    client.completions.create(model="llama", prompt="count me", max_tokens=3, temperature=0,
                              extra_body={"ignore_eos": True})
    page = httpx.get(f"{server.url}/metrics", headers=auth(), timeout=10).text
    values = {s.name: s.value for f in text_string_to_metric_families(page) for s in f.samples if not s.labels}
    assert values["llmserve_generation_tokens_total"] >= 3
    assert values["llmserve_e2e_request_latency_seconds_count"] >= 1
    assert values["llmserve_kv_cache_usage_ratio"] == 0.0


def test_the_load_tester_drives_v1_completions(server):
    backend = OpenAIBackend(server.url, "llama", ignore_eos=True, api_key=KEY)
    prompts = [Prompt("one two three", 3, 4), Prompt("four five", 2, 6), Prompt("six", 1, 3)]
    records, duration = asyncio.run(run_load(backend, prompts, [0.0] * 3, concurrency=2, show_progress=False))
    assert [r.error for r in records] == [None, None, None]
    assert [r.output_tokens for r in records] == [4, 6, 3]
    assert all(r.first_token_time is not None and r.first_token_time <= r.res_time for r in records)


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0, le=30)
    kind: Literal["cat", "dog"]


def test_the_clients_parse_gets_the_pydantic_model_it_asked_for(client):
    for seed in range(3):
        completion = client.beta.chat.completions.parse(
            model="llama", messages=[{"role": "user", "content": "A pet, as JSON"}], response_format=Pet,
            temperature=1.0, seed=seed, max_completion_tokens=200)
        pet = completion.choices[0].message.parsed
        assert isinstance(pet, Pet) and completion.choices[0].finish_reason == "stop"


def test_structured_outputs_and_the_native_grammar_constrain_the_text(server, client):
    chat = client.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "yes or no?"}], max_completion_tokens=20,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert chat.choices[0].message.content in ("yes", "no")
    completion = client.completions.create(model="llama", prompt=PROMPT, max_tokens=30, temperature=1.0, seed=1,
                                           extra_body={"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}})
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", completion.choices[0].text)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 30, "grammar": {"type": "json", "value": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["n"],
        "additionalProperties": False}}}}
    answer = httpx.post(f"{server.url}/models/llama/generate", json=body, headers=auth(), timeout=60)
    assert answer.status_code == 200 and 1 <= json.loads(answer.json()["generated_text"])["n"] <= 9


@pytest.mark.parametrize("extra, field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "[a-"}}}}}}, "response_format"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"choice": ["b"]}}, "response_format"),
])
def test_a_constraint_that_cannot_be_used_is_a_400_naming_the_field(server, extra, field):
    body = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5, **extra}
    answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=auth(), timeout=60)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["message"].startswith(field)


def test_each_sample_and_a_stream_follow_the_schema_with_logprobs_of_allowed_tokens(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "s": {"type": "string", "maxLength": 5}},
              "required": ["n", "s"], "additionalProperties": False}
    response_format = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}
    messages = [{"role": "user", "content": "JSON please"}]
    answer = client.chat.completions.create(model="llama", messages=messages, n=3, temperature=1.0, seed=4,
                                            max_completion_tokens=60, logprobs=True, response_format=response_format)
    for choice in answer.choices:
        assert set(json.loads(choice.message.content)) == {"n", "s"}
        assert all(entry.logprob > float("-inf") for entry in choice.logprobs.content)
    stream = client.chat.completions.create(model="llama", messages=messages, temperature=1.0, seed=4, stream=True,
                                            max_completion_tokens=60, response_format=response_format)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert set(json.loads(text)) == {"n", "s"}
