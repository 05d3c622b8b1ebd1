"""The OpenAI-compatible routes over an in-process engine whose 'model' answers last token + 1.

Every answer and every stream chunk is checked against the response models the
OpenAPI schema publishes, so the schema cannot drift from what is sent.
"""
from __future__ import annotations

import json

import pytest

from llmserve.common.sampling import SamplingParams
from llmserve.master.openai_models import ChatCompletionChunk, ChatCompletionResponse, CompletionResponse, ErrorResponse
from llmserve.master.tokenizer import decode, encode
from tests.unit.fake_agent import TOKENIZER, fake_config, fake_engine, fake_prompt_logprob
from tests.unit.test_api import call, send_raw, serving_on_loopback, wait_until


WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def following_text(prompt_ids: list[int], n: int) -> str:
    """What the counting model writes after `prompt_ids`."""
    return decode(TOKENIZER, [prompt_ids[-1] + i for i in range(1, n + 1)])


def chat_prompt_ids(engine, messages: list[dict]) -> list[int]:
    from llmserve.master.chat_template import load_chat_template

    text = load_chat_template(engine.config.model_config).render(messages)
    return encode(TOKENIZER, text, add_special_tokens=False)


def events(text: str) -> list:
    """The `data:` payloads of a stream, [DONE] as the string."""
    payloads = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def post(path: str, body: dict | str, engine=None):
    async def go(client, engine):
        if isinstance(body, str):  # JSON that json.dumps would not write (1e999, NaN)
            return await client.post(path, content=body, headers={"content-type": "application/json"})
        return await client.post(path, json=body)

    return call(go, engine)


# ---------------------------------------------------------------- completions


def test_a_repeated_prompt_reports_the_tokens_the_prefix_cache_held():
    from tests.unit.test_api import call

    prompt = "one two three four five six seven eight nine ten eleven twelve"
    prompt_ids = encode(TOKENIZER, prompt)

    async def twice(client, engine):
        body = {"model": "llama", "prompt": prompt, "max_tokens": 2, "temperature": 0}
        return [(await client.post("/v1/completions", json=body)).json()["usage"] for _ in range(2)]

    first, second = call(twice)
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert cached == (len(prompt_ids) - 1) // 4 * 4 > 0  # every full block short of the last prompt token

    async def salted(client, engine):
        bodies = [{"model": "llama", "prompt": prompt, "max_tokens": 2, "cache_salt": salt} for salt in ("a", "b", "a")]
        return [(await client.post("/v1/completions", json=body)).json()["usage"] for body in bodies]

    usages = call(salted)
    assert [u["prompt_tokens_details"]["cached_tokens"] for u in usages] == [0, 0, cached]  # another salt: no share


def test_completion_returns_the_text_usage_and_length_finish():
    response = post("/v1/completions", {"model": "llama", "prompt": "Hello there", "max_tokens": 5, "temperature": 0})
    assert response.status_code == 200
    body = CompletionResponse.model_validate(response.json()).model_dump()
    prompt_ids = encode(TOKENIZER, "Hello there")
    assert body["choices"] == [
        {"index": 0, "text": following_text(prompt_ids, 5), "logprobs": None, "finish_reason": "length",
         "prompt_logprobs": None}
    ]
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 5, "total_tokens": len(prompt_ids) + 5,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert body["id"].startswith("cmpl-") and body["model"] == "llama"


def test_completion_stop_string_cuts_the_text_and_finishes_with_stop():
    prompt_ids = encode(TOKENIZER, "Hello there")
    third = decode(TOKENIZER, [prompt_ids[-1] + 3])
    response = post("/v1/completions", {"prompt": "Hello there", "max_tokens": 8, "temperature": 0, "stop": third.strip()})
    (choice,) = response.json()["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == following_text(prompt_ids, 3)[: following_text(prompt_ids, 3).index(third.strip())]


def test_a_batch_of_prompts_with_n_numbers_choices_prompt_major_and_counts_usage_once_per_prompt():
    prompts = ["Hello", "Goodbye friend"]
    response = post("/v1/completions", {"prompt": prompts, "n": 2, "max_tokens": 3, "temperature": 0})
    body = CompletionResponse.model_validate(response.json())
    ids = [encode(TOKENIZER, p) for p in prompts]
    assert [(c.index, c.text) for c in body.choices] == [
        (0, following_text(ids[0], 3)), (1, following_text(ids[0], 3)),
        (2, following_text(ids[1], 3)), (3, following_text(ids[1], 3)),
    ]
    assert body.usage.prompt_tokens == len(ids[0]) + len(ids[1]) and body.usage.completion_tokens == 12


def test_token_id_prompts_and_echo():
    ids = encode(TOKENIZER, "Hello there")
    response = post("/v1/completions", {"prompt": ids, "max_tokens": 2, "temperature": 0, "echo": True})
    (choice,) = response.json()["choices"]
    assert choice["text"] == decode(TOKENIZER, ids) + following_text(ids, 2)


def test_echo_with_logprobs_and_no_new_tokens_scores_the_prompt_as_lm_eval_asks():
    ids = encode(TOKENIZER, "Hello there")
    body = {"prompt": "Hello there", "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    (choice,) = CompletionResponse.model_validate(post("/v1/completions", body).json()).choices
    assert choice.text == "Hello there" and choice.finish_reason == "length"
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) and logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == [fake_prompt_logprob(t) for t in ids[1:]]
    assert [len(top) for top in logprobs.top_logprobs[1:]] == [1] * (len(ids) - 1)
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset[1] == len(logprobs.tokens[0])


def test_echo_with_logprobs_streams_the_prompt_scored_then_the_new_tokens():
    ids = encode(TOKENIZER, "Hello there")
    body = {"prompt": "Hello there", "max_tokens": 2, "echo": True, "logprobs": 0, "temperature": 0, "stream": True}
    chunks = [CompletionResponse.model_validate(e) for e in events(post("/v1/completions", body).text)[:-1]]
    first = chunks[0].choices[0]
    assert first.text == "Hello there" and first.logprobs.token_logprobs[1:] == [fake_prompt_logprob(t) for t in ids[1:]]
    assert "".join(c.choices[0].text for c in chunks) == "Hello there" + following_text(ids, 2)
    assert chunks[1].choices[0].logprobs.text_offset == [sum(map(len, first.logprobs.tokens))]


def test_prompt_logprobs_in_vllm_form_on_both_endpoints():
    ids = encode(TOKENIZER, "Hello there")
    body = {"prompt": "Hello there", "max_tokens": 1, "prompt_logprobs": 1, "temperature": 0}
    (choice,) = CompletionResponse.model_validate(post("/v1/completions", body).json()).choices
    assert choice.prompt_logprobs[0] is None and len(choice.prompt_logprobs) == len(ids)
    entry = choice.prompt_logprobs[1][str(ids[1])]
    assert (entry.logprob, entry.rank) == (fake_prompt_logprob(ids[1]), 1)
    engine = fake_engine()
    messages = [{"role": "user", "content": "Hi"}]
    answer = post("/v1/chat/completions", {"messages": messages, "max_tokens": 1, "prompt_logprobs": 0}, engine)
    prompt_logprobs = ChatCompletionResponse.model_validate(answer.json()).prompt_logprobs
    assert len(prompt_logprobs) == len(chat_prompt_ids(engine, messages)) and prompt_logprobs[0] is None


def test_completion_logprobs_list_each_token_with_offsets():
    response = post("/v1/completions", {"prompt": "Hello there", "max_tokens": 3, "temperature": 0, "logprobs": 1})
    logprobs = CompletionResponse.model_validate(response.json()).choices[0].logprobs
    ids = encode(TOKENIZER, "Hello there")
    tokens = [TOKENIZER.decode([ids[-1] + i], skip_special_tokens=False) for i in (1, 2, 3)]
    assert logprobs.tokens == tokens
    assert logprobs.text_offset == [0, len(tokens[0]), len(tokens[0]) + len(tokens[1])]
    assert len(logprobs.token_logprobs) == 3 and all(len(top) == 1 for top in logprobs.top_logprobs)


def test_completion_stream_sends_chunks_then_usage_then_done():
    body = {"prompt": ["Hello", "Goodbye friend"], "n": 2, "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    response = post("/v1/completions", body)
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = events(response.text)
    assert chunks[-1] == "[DONE]"
    usage = CompletionResponse.model_validate(chunks[-2])
    assert usage.choices == [] and usage.usage.completion_tokens == 16
    texts: dict[int, str] = {}
    finishes = {}
    for chunk in chunks[:-2]:
        parsed = CompletionResponse.model_validate(chunk)
        assert parsed.usage is None and chunk["usage"] is None and len(parsed.choices) == 1
        choice = parsed.choices[0]
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    ids = [encode(TOKENIZER, p) for p in body["prompt"]]
    assert texts == {0: following_text(ids[0], 4), 1: following_text(ids[0], 4),
                     2: following_text(ids[1], 4), 3: following_text(ids[1], 4)}
    assert finishes == {0: "length", 1: "length", 2: "length", 3: "length"}


# ---------------------------------------------------------------- chat


def test_chat_completion_answers_with_the_assistant_message():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    engine = fake_engine()
    prompt_ids = chat_prompt_ids(engine, messages)
    response = post("/v1/chat/completions", {"messages": messages, "max_completion_tokens": 4, "temperature": 0}, engine)
    body = ChatCompletionResponse.model_validate(response.json())
    assert body.choices[0].message.content == following_text(prompt_ids, 4)
    assert body.choices[0].finish_reason == "length" and body.id.startswith("chatcmpl-")
    assert body.usage.prompt_tokens == len(prompt_ids) and body.usage.completion_tokens == 4


def test_chat_without_max_tokens_may_fill_the_context():
    messages = [{"role": "user", "content": "Hi!"}]
    engine = fake_engine(max_seq_len=64)
    prompt_ids = chat_prompt_ids(engine, messages)
    body = post("/v1/chat/completions", {"messages": messages, "temperature": 0}, engine).json()
    assert body["usage"]["completion_tokens"] == 64 - len(prompt_ids) and body["choices"][0]["finish_reason"] == "length"


def test_chat_text_parts_equal_string_content():
    as_string = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\nb"}], "max_tokens": 3,
                                              "temperature": 0}).json()
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    as_parts = post("/v1/chat/completions", {"messages": [{"role": "user", "content": parts}], "max_tokens": 3,
                                             "temperature": 0}).json()
    assert as_parts["choices"] == as_string["choices"] and as_parts["usage"] == as_string["usage"]


def test_chat_logprobs_carry_token_bytes_and_top_alternatives():
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}
    content = ChatCompletionResponse.model_validate(post("/v1/chat/completions", body).json()).choices[0].logprobs.content
    assert len(content) == 2
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 2


def test_chat_stream_opens_with_the_role_and_ends_with_the_finish_reason():
    messages = [{"role": "user", "content": "Hi!"}]
    engine = fake_engine()
    prompt_ids = chat_prompt_ids(engine, messages)
    body = {"messages": messages, "max_tokens": 5, "temperature": 0, "stream": True}
    chunks = events(post("/v1/chat/completions", body, engine).text)
    assert chunks[-1] == "[DONE]"
    parsed = [ChatCompletionChunk.model_validate(chunk) for chunk in chunks[:-1]]
    assert parsed[0].choices[0].delta.role == "assistant" and parsed[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in parsed) == following_text(prompt_ids, 5)
    assert [c.choices[0].finish_reason for c in parsed][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in parsed[:-1])
    assert len({c.id for c in parsed}) == 1 and "usage" not in chunks[0]


def test_a_chat_stream_sends_the_tokens_a_step_accepted_together_in_one_chunk():
    from tests.unit.test_speculative import counting_oracle, fake_config_with

    messages = [{"role": "user", "content": "Hi!"}]
    engine = fake_engine(fake_config_with({"method": "ngram", "num_speculative_tokens": 4}))
    prompt_ids = chat_prompt_ids(engine, messages)
    body = {"messages": messages, "max_tokens": 12, "temperature": 0, "stream": True, "logprobs": True}

    async def go(client, engine):
        engine.scheduler.speculator.proposer = counting_oracle  # every proposal is accepted
        return await client.post("/v1/chat/completions", json=body)

    chunks = events(call(go, engine).text)
    parsed = [ChatCompletionChunk.model_validate(chunk) for chunk in chunks[:-1]]
    assert "".join(c.choices[0].delta.content or "" for c in parsed) == following_text(prompt_ids, 12)
    entries = [c.choices[0].logprobs.content for c in parsed if c.choices[0].logprobs is not None]
    assert sum(map(len, entries)) == 12 and max(map(len, entries)) > 1  # one chunk per step, not per token
    assert [entry.token for chunk in entries for entry in chunk] == [
        decode(TOKENIZER, [prompt_ids[-1] + i]) for i in range(1, 13)]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "path, body, status, param, fragment",
    [
        ("/v1/completions", {"prompt": "x", "bogus": 1}, 400, "bogus", "unknown parameter"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 1000}, 400, "prompt", "exceed the model's maximum"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "only with the prompt's log-probabilities"),
        ("/v1/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs", "stream"),
        ("/v1/completions", {"prompt": "x", "prompt_logprobs": 99}, 400, "prompt_logprobs", "between 0 and"),
        ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p", "must be <= 1"),
        ("/v1/completions", {"prompt": "x", "temperature": 1e39}, 400, "temperature", "must be <= 3.40282e+38"),
        ("/v1/completions", '{"prompt": "x", "length_penalty": 1e999}', 400, "length_penalty", "finite number"),
        ("/v1/completions", '{"prompt": "x", "top_p": NaN}', 400, "top_p", "finite number"),
        ("/v1/completions", {"prompt": "x", "stop_token_ids": [1024]}, 400, "stop_token_ids", "not a token id"),
        ("/v1/completions", {"prompt": "x", "stop_token_ids": [2**63]}, 400, "stop_token_ids.0", "must be <= 2147483647"),
        ("/v1/completions", {"prompt": "x", "seed": 2**53}, 400, "seed", "must be <= 9007199254740991"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", "valid number"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 1.0}}, 400, "logit_bias", "not supported"),
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix", "unknown parameter"),
        ("/v1/completions", {"prompt": [5000]}, 400, "prompt", "not a token id"),
        ("/v1/completions", {"prompt": [-1]}, 400, "prompt.0", "must be >= 0"),
        ("/v1/completions", {"prompt": [[3, 4], [2**40]], "echo": True}, 400, "prompt.1.0", "must be <= 2147483647"),
        ("/v1/completions", {"prompt": [[3, 4], []]}, 400, "prompt.1", "must not be empty"),
        ("/v1/completions", {"prompt": "x", "min_tokens": 5, "max_tokens": 2}, 400, "min_tokens", "and max_tokens"),
        ("/v1/completions", {"prompt": []}, 400, "prompt", "must not be empty"),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
        ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, None, "does not exist"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
         "top_logprobs", "logprobs: true"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400,
         "max_completion_tokens", "must be >= 1"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
         400, "tools.0.function", "Field required"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER]}, 400,
         "tool_choice", "chat template has none"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER],
                                  "tool_choice": {"type": "function", "function": {"name": "time"}}}, 400,
         "tool_choice", "no tool is named 'time'"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER],
                                  "tool_choice": "required", "response_format": {"type": "json_object"}}, 400,
         "tool_choice", "cannot be combined"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [
            {"type": "function", "function": {"name": "bad name!"}}]}, 400, "tools.0.function.name", "pattern"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, 400,
         "messages.0", "only an assistant message"),
        ("/v1/chat/completions", {"messages": [{"role": "tool", "tool_call_id": "call_1"}]}, 400,
         "messages.0", "content: required"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
         400, "response_format.type", "json_schema"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "response_format": {"type": "json_schema"}}, 400, "response_format.json_schema", "required"),
        ("/v1/completions", {"prompt": "x", "structured_outputs": {"json": "{not json"}}, 400, "structured_outputs.json",
         "not JSON"),
        ("/v1/completions", {"prompt": "x", "structured_outputs": {"choice": []}}, 400, "structured_outputs.choice",
         "must not be empty"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}, 400,
         "tool_choice", "auto needs tools"),
        ("/v1/chat/completions", {"messages": "hello"}, 400, "messages", "valid list"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages", "must not be empty"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages.0", "content: required"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "to": "y"}]}, 400, "messages.0.to",
         "unknown parameter"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", "'assistant'"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
         "messages.0.content", "valid string"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n", "must be >= 1"),
        ("/tokenize", {"messages": []}, 400, "messages", "must not be empty"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens.0", "must be >= 0"),
    ],
)
def test_bad_requests_answer_in_openai_error_shape_naming_the_parameter(path, body, status, param, fragment):
    response = post(path, body)
    assert response.status_code == status
    error = ErrorResponse.model_validate(response.json()).error
    assert error.param == param and fragment in error.message
    assert error.type == "invalid_request_error"


def test_invalid_json_and_unknown_routes_answer_in_openai_shape():
    async def go(client, engine):
        bad = await client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        missing = await client.get("/v1/engines")
        return bad, missing

    bad, missing = call(go)
    assert bad.status_code == 400 and "not valid JSON" in ErrorResponse.model_validate(bad.json()).error.message
    assert missing.status_code == 404 and ErrorResponse.model_validate(missing.json()).error.code == "not_found"


def test_a_batch_refused_at_its_second_prompt_leaves_nothing_queued_and_counts_nothing():
    engine = fake_engine()
    response = post("/v1/completions", {"prompt": ["fine", "x y " * 120], "max_tokens": 2}, engine)  # ~240 tokens
    assert response.status_code == 400 and "exceed the model's maximum" in response.json()["error"]["message"]
    assert engine.stats()["num_waiting"] == 0 and engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"]
    assert not engine.handles
    assert "llmserve_requests_total{finish_reason=\"abort\"} 0.0" in engine.metrics.render().decode()


def test_null_means_the_default_as_in_openai():
    body = {"prompt": "Hello there", "max_tokens": 3, "temperature": 0, "n": None, "stream": None, "echo": None,
            "logprobs": None, "top_k": None, "stop": None, "seed": None, "early_stopping": None, "stop_token_ids": None}
    response = post("/v1/completions", body)
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == following_text(encode(TOKENIZER, "Hello there"), 3)


def test_chat_without_max_tokens_leaves_every_sample_room_in_the_kv_cache():
    engine = fake_engine(max_seq_len=128)  # 64 blocks of 4 tokens: 256 tokens of cache, less than 3 x 128
    body = {"messages": [{"role": "user", "content": "Hi!"}], "n": 3, "temperature": 1.0, "ignore_eos": True}
    answer = post("/v1/chat/completions", body, engine).json()
    lengths = {choice["finish_reason"] for choice in answer["choices"]}
    assert lengths == {"length"} and answer["usage"]["completion_tokens"] % 3 == 0
    assert engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"]


def test_tokens_holding_part_of_a_character_show_their_bytes_not_a_replacement_character():
    from llmserve.master.openai_api import token_string

    engine = fake_engine()
    first, second = encode(TOKENIZER, "é", add_special_tokens=False)  # byte tokens 0xc3 and 0xa9
    assert token_string(engine, first) == ("bytes:\\xc3", b"\xc3")
    assert token_string(engine, second) == ("bytes:\\xa9", b"\xa9")
    (word,) = encode(TOKENIZER, " the", add_special_tokens=False)
    assert token_string(engine, word) == (" the", b" the")


def test_client_disconnect_aborts_a_streaming_completion_and_returns_its_blocks():
    slow = fake_engine(fake_config(decode_batch_waiting_time=0.05, decode_batch_size=8))
    body = {"prompt": "a long story", "max_tokens": 100, "ignore_eos": True, "stream": True}

    async def go(client, engine):
        async with serving_on_loopback(engine) as port:
            writer = await send_raw(port, "/v1/completions", body)
            assert await wait_until(lambda: any(h.seq.num_output_tokens >= 2 for h in engine.handles.values()), timeout=5)
            (handle,) = engine.handles.values()
            writer.close()
            await writer.wait_closed()
            is_freed = await wait_until(lambda: engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"], 2)
            return handle, is_freed

    handle, is_freed = call(go, slow)
    assert is_freed and handle.seq.num_output_tokens < 100


# ---------------------------------------------------------------- models, tokenize, version


def test_models_lists_the_served_model():
    async def go(client, engine):
        return (await client.get("/v1/models")).json(), await client.get("/v1/models/llama"), await client.get("/v1/models/x")

    listing, one, missing = call(go)
    assert [m["id"] for m in listing["data"]] == ["llama"] and listing["data"][0]["max_model_len"] == 128
    assert one.json()["id"] == "llama" and missing.status_code == 404


def test_tokenize_and_detokenize_round_trip():
    async def go(client, engine):
        tokens = (await client.post("/tokenize", json={"prompt": "Hello there", "return_token_strs": True})).json()
        text = (await client.post("/detokenize", json={"tokens": tokens["tokens"]})).json()
        bad = await client.post("/detokenize", json={"tokens": [99999]})
        chat = (await client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi!"}]})).json()
        return tokens, text, bad, chat, engine

    tokens, text, bad, chat, engine = call(go)
    assert tokens["tokens"] == encode(TOKENIZER, "Hello there") and tokens["count"] == len(tokens["tokens"])
    assert tokens["token_strs"][0] == "<s>" and tokens["max_model_len"] == 128
    assert text["prompt"] == "<s>Hello there"
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert chat["tokens"] == chat_prompt_ids(engine, [{"role": "user", "content": "Hi!"}])


def test_version_answers():
    async def go(client, engine):
        return (await client.get("/version")).json()

    assert call(go)["version"]


# ---------------------------------------------------------------- API key


def keyed_engine():
    return fake_engine(fake_config_with_key("s3cret"))


def fake_config_with_key(key: str):
    from llmserve.common.config import config_from_dict

    return config_from_dict({
        "model_config": {"load_format": "dummy", "dummy_config": {"vocab_size": 1024}, "tokenizer_path": "builtin"},
        "serving_config": {"api_key": key},
        "pa_config": {"num_blocks": 64, "block_size": 4},
    })


def test_api_key_is_required_everywhere_but_health():
    body = {"prompt": "x", "max_tokens": 1}

    async def go(client, engine):
        good = {"Authorization": "Bearer s3cret"}
        return {
            "no key": await client.post("/v1/completions", json=body),
            "wrong key": await client.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"}),
            "metrics": await client.get("/metrics"),
            "schema": await client.get("/openapi.json"),
            "native": await client.post("/models/llama/generate", json={"inputs": "x"}),
            "health": await client.get("/health"),
            "with key": await client.post("/v1/completions", json=body, headers=good),
            "metrics with key": await client.get("/metrics", headers=good),
        }

    answers = call(go, keyed_engine())
    assert {name: r.status_code for name, r in answers.items()} == {
        "no key": 401, "wrong key": 401, "metrics": 401, "schema": 401, "native": 401,
        "health": 200, "with key": 200, "metrics with key": 200,
    }
    assert ErrorResponse.model_validate(answers["no key"].json()).error.code == "invalid_api_key"
    assert answers["native"].json()["error_type"] == "invalid_api_key"
    assert answers["no key"].headers["www-authenticate"] == "Bearer"


def test_with_a_key_the_schema_declares_the_bearer_scheme_and_401_on_every_guarded_route():
    async def go(client, engine):
        return (await client.get("/openapi.json", headers={"Authorization": "Bearer s3cret"})).json()

    schema = call(go, keyed_engine())
    assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            guarded = path != "/health"
            assert ("401" in operation["responses"]) == guarded, path
            assert ("security" in operation) == guarded, path
    native_401 = schema["paths"]["/models/{name}/generate"]["post"]["responses"]["401"]
    assert native_401["content"]["application/json"]["schema"]["$ref"].endswith("/NativeError")


def test_models_with_a_slash_in_their_name_are_found():
    from llmserve.common.config import config_from_dict

    config = config_from_dict({
        "model_config": {"model_name": "meta-llama/Llama-3-8B", "load_format": "dummy",
                         "dummy_config": {"vocab_size": 1024}, "tokenizer_path": "builtin"},
        "pa_config": {"num_blocks": 64, "block_size": 4},
    })

    async def go(client, engine):
        return await client.get("/v1/models/meta-llama/Llama-3-8B")

    response = call(go, fake_engine(config))
    assert response.status_code == 200 and response.json()["id"] == "meta-llama/Llama-3-8B"


def test_a_stream_aborts_its_requests_when_the_client_leaves_at_once():
    from llmserve.master.streams import RequestStream

    async def go(client, engine):
        handle = engine.submit("early", encode(TOKENIZER, "story"), SamplingParams(max_new_tokens=100, ignore_eos=True))

        async def never_started():
            yield "data: {}\n\n"

        async def receive():
            return {"type": "http.disconnect"}

        async def send(message):
            pass

        scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
        await RequestStream(never_started(), engine, [handle])(scope, receive, send)
        return handle, engine.stats()

    handle, stats = call(go)
    assert handle.is_finished and stats["kv_blocks_free"] == stats["kv_blocks_total"]


# ---------------------------------------------------------------- schema


def test_openapi_schema_describes_every_route_with_its_bodies_and_errors():
    async def go(client, engine):
        return (await client.get("/openapi.json")).json()

    schema = call(go)
    paths = schema["paths"]
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        operation = paths[path]["post"]
        assert "$ref" in operation["requestBody"]["content"]["application/json"]["schema"], path
        assert {"200", "400", "404"} <= set(operation["responses"]), path
        assert "422" not in operation["responses"] and "401" not in operation["responses"], path
    chat = paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    chat_event = chat["text/event-stream"]["schema"]["properties"]["data"]["anyOf"]
    assert chat_event[0]["contentSchema"]["anyOf"][0]["$ref"].endswith("/ChatCompletionChunk")
    assert chat_event[1] == {"const": "[DONE]"}
    assert chat["application/json"]["schema"]["$ref"].endswith("/ChatCompletionResponse")
    components = schema["components"]["schemas"]
    assert {"ChatCompletionChunk", "CompletionRequest", "ErrorResponse", "Usage"} <= set(components)
    completion = components["CompletionRequest"]["properties"]
    assert "top_k" in completion and "suffix" not in completion
    assert completion["n"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 16}  # serving_config.max_n
    assert completion["stop_token_ids"]["anyOf"][0]["items"]["maximum"] == 1023  # the model's vocabulary
    assert completion["temperature"]["anyOf"][0] == {"type": "number", "minimum": 0.0, "maximum": 3.4028234663852886e38}
    chat_request = components["ChatCompletionRequest"]["properties"]
    assert chat_request["messages"]["minItems"] == 1 and "early_stopping" in chat_request
    assert {"type": "null"} in chat_request["early_stopping"]["anyOf"]  # null means the default
    message = components["ChatMessage"]
    assert message["additionalProperties"] is False and message["required"] == ["role"]
    assert message["allOf"][0]["anyOf"][0] == {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}
    assert message["properties"]["role"]["enum"] == ["system", "developer", "user", "assistant", "tool"]
    for path in ("/v1/models", "/health", "/version", "/metrics"):
        assert path in paths
    native = paths["/models/{name}/generate"]["post"]["responses"]
    native_event = native["200"]["content"]["text/event-stream"]["schema"]["properties"]["data"]["contentSchema"]
    assert [member["$ref"].rsplit("/", 1)[1] for member in native_event["anyOf"]] == ["GenerateStreamEvent", "NativeError"]
    assert native["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/NativeError")
    assert "GenerateStreamEvent" in components
