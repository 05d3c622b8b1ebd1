"""The official `openai` client against a live server on 127.0.0.1 that requires an API key."""
from __future__ import annotations

import asyncio
import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.server import TINY_LLAMA, running_server, write_config
from llmserve.tools.bench_serving import OpenAIBackend, Prompt, run_load

KEY = "test-key-123"
PROMPT = "I love Beijing, because"


# A Hermes/Qwen-style template: tools in the system turn, calls in <tool_call> tags (so the hermes parser is
# picked), tool results in <tool_response> tags.
TOOLS_TEMPLATE = """\
{%- if tools %}<|system|>You may call these functions:
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}Reply with <tool_call>{"name": ..., "arguments": ...}</tool_call> to call one.
{% endif %}
{%- for message in messages %}<|{{ message.role }}|>{{ message.content | default('') }}
{%- for call in message.tool_calls | default([]) %}<tool_call>{{ call.function | tojson }}</tool_call>{% endfor %}
{%- if message.role == 'tool' %}<tool_response id="{{ message.tool_call_id }}"/>{% endif %}
{% endfor %}
{%- if add_generation_prompt %}<|assistant|>{% endif %}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("openai")
    (directory / "tools.jinja").write_text(TOOLS_TEMPLATE)
    model_config = {"load_format": "dummy", "dummy_config": {**TINY_LLAMA, "max_position_embeddings": 1024},
                    "tokenizer_path": "builtin", "chat_template": str(directory / "tools.jinja")}
    config = write_config(directory, model_config, serving_config={"api_key": KEY, "max_logprobs": 5})
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


# ---------------------------------------------------------------- tool calling

TOOLS = [
    {"type": "function", "function": {"name": "weather", "description": "The weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                         "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "clock", "parameters": {
        "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
        "required": ["zone"], "additionalProperties": False}}},
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


def streamed(chunks) -> tuple[str, dict[int, dict], list]:
    """A streamed choice 0 put together as the client's users do: content, calls by index, finish reasons."""
    content, calls, finishes = "", {}, []
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for part in choice.delta.tool_calls or ():
            call = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = part.id or call["id"]
            call["name"] += part.function.name or ""
            call["arguments"] += part.function.arguments or ""
        finishes.append(choice.finish_reason)
    return content, calls, finishes


def test_required_tool_calls_always_parse_and_follow_the_tools_schemas(client):
    for seed in range(3):
        answer = client.chat.completions.create(model="llama", messages=ASK, tools=TOOLS, tool_choice="required",
                                                temperature=1.0, seed=seed, max_completion_tokens=300)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len({call.id for call in choice.message.tool_calls}) == len(choice.message.tool_calls) >= 1
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    content, calls, finishes = streamed(client.chat.completions.create(
        model="llama", messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=0,
        max_completion_tokens=300, stream=True))
    first = client.chat.completions.create(model="llama", messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=1.0, seed=0, max_completion_tokens=300)
    assert content == "" and finishes[-1] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (call.function.name, call.function.arguments) for call in first.choices[0].message.tool_calls]


def test_a_named_function_is_called_and_its_arguments_stream_as_they_come(client):
    choice = {"type": "function", "function": {"name": "clock"}}
    answer = client.chat.completions.create(model="llama", messages=ASK, tools=TOOLS, tool_choice=choice,
                                            temperature=1.0, seed=5, max_completion_tokens=100)
    [call] = answer.choices[0].message.tool_calls
    assert call.function.name == "clock" and answer.choices[0].finish_reason == "stop"  # OpenAI's, for a named call
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["clock"])
    chunks = list(client.chat.completions.create(model="llama", messages=ASK, tools=TOOLS, tool_choice=choice,
                                                 temperature=1.0, seed=5, max_completion_tokens=100, stream=True))
    content, calls, finishes = streamed(chunks)
    assert calls == {0: {"id": calls[0]["id"], "name": "clock", "arguments": call.function.arguments}}
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.tool_calls) > 1  # not sent whole at the end


def test_auto_parses_the_models_tagged_call_and_a_tool_result_is_the_next_turn(server, client):
    # The random model will not call a tool of its own accord: a regex makes it write the call as Hermes does.
    regex = r'<tool_call>\{"name": "weather", "arguments": \{"city": "(Oslo|Rome)", "unit": "c"\}\}</tool_call>'
    kwargs = dict(model="llama", messages=ASK, tools=TOOLS, max_completion_tokens=60, temperature=1.0, seed=2,
                  extra_body={"structured_outputs": {"regex": regex}})
    answer = client.chat.completions.create(**kwargs)
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls" and message.content is None
    [call] = message.tool_calls
    assert call.function.name == "weather" and json.loads(call.function.arguments)["city"] in ("Oslo", "Rome")
    content, calls, finishes = streamed(client.chat.completions.create(**kwargs, stream=True))
    assert content == "" and finishes[-1] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [("weather", call.function.arguments)]

    result = {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}
    follow = client.chat.completions.create(model="llama", messages=[*ASK, message, result], tools=TOOLS,
                                            max_completion_tokens=4, temperature=0)  # the message as it came back
    assert follow.choices[0].finish_reason in ("length", "stop")
    turn = [*ASK, message.model_dump(exclude_none=True), result]
    prompt = httpx.post(f"{server.url}/tokenize", json={"messages": turn, "tools": TOOLS}, headers=auth(), timeout=10)
    assert prompt.status_code == 200, prompt.text
    assert follow.usage.prompt_tokens == prompt.json()["count"]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": prompt.json()["tokens"]}, headers=auth(), timeout=10)
    assert f'<tool_response id="{call.id}"/>' in text.json()["prompt"]
    assert f'<tool_call>{{"name": "weather", "arguments": {call.function.arguments}}}</tool_call>' in text.json()["prompt"]


def test_auto_streams_a_plain_reply_as_content(client):
    kwargs = dict(model="llama", messages=ASK, tools=TOOLS, max_completion_tokens=30, temperature=0,
                  extra_body={"structured_outputs": {"regex": "It is sunny in Oslo today"}})
    answer = client.chat.completions.create(**kwargs)
    assert answer.choices[0].message.content == "It is sunny in Oslo today"
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    content, calls, finishes = streamed(chunks)
    assert content == "It is sunny in Oslo today" and calls == {} and finishes[-1] == "stop"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 2
