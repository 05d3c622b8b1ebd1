"""Chat completions on a checkpoint whose tokenizer transformers saved with a chat template: same tokens as HF."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
import torch

from llmserve.master.tokenizer import build_builtin_tokenizer, token_bytes
from tests.e2e.server import running_server, save_tiny_llama, write_config

transformers = pytest.importorskip("transformers")

# A Llama-3-like template: header tokens per role, the end-of-turn token after each message; tools as JSON
# before the conversation, tool results in the `ipython` role (so the llama3_json parser is picked).
TEMPLATE = (
    "{{ bos_token }}{% if tools %}{{ '<|start|>system<|sep|>\n\nCall a function with '"
    " + '{\"name\": ..., \"parameters\": ...}:\n' }}{% for tool in tools %}{{ tool | tojson + '\n' }}{% endfor %}"
    "{{ eos_token }}{% endif %}{% for message in messages %}"
    "{% set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{ '<|start|>' + role + '<|sep|>\n\n' + message['content'] | default('', true) | trim + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start|>assistant<|sep|>\n\n' }}{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What colour is the sky?"},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat-llama")
    model = save_tiny_llama(path, max_position_embeddings=512)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=build_builtin_tokenizer(), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    path, _, _ = checkpoint
    with running_server(write_config(tmp_path_factory.mktemp("server"), {"model_path": str(path)})) as running:
        yield running


def test_chat_uses_the_checkpoint_template_and_generates_what_transformers_does(checkpoint, server):
    _, model, tokenizer = checkpoint
    prompt_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        reference = model.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False, eos_token_id=2,
                                   pad_token_id=0)[0, len(prompt_ids):].tolist()
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        answer = client.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=8, temperature=0,
                                                logprobs=True)
    tokenized = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES}, timeout=10).json()
    assert tokenized["tokens"] == list(prompt_ids)
    assert answer.usage.prompt_tokens == len(prompt_ids)
    generated = [bytes(entry.bytes) for entry in answer.choices[0].logprobs.content]
    assert generated == [token_bytes(tokenizer.backend_tokenizer, t) for t in reference]
    assert answer.choices[0].message.content == tokenizer.decode(reference, skip_special_tokens=True)


WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer",
                                                                                        "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}


def test_tools_render_as_transformers_renders_them_and_calls_follow_their_schema(checkpoint, server):
    _, _, tokenizer = checkpoint
    prompt_ids = tokenizer.apply_chat_template(MESSAGES, tools=[WEATHER], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    tokenized = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES, "tools": [WEATHER]}, timeout=10)
    assert tokenized.json()["tokens"] == list(prompt_ids)
    schema = WEATHER["function"]["parameters"]
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        forced = client.chat.completions.create(model="llama", messages=MESSAGES, tools=[WEATHER], temperature=1.0,
                                                seed=3, tool_choice="required", max_tokens=120)
        as_json = client.chat.completions.create(
            model="llama", messages=MESSAGES, temperature=1.0, seed=3, max_tokens=120,
            response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}})
        # The model will not call of its own accord: a regex makes it write a Llama 3 call.
        regex = r'\{"name": "weather", "parameters": \{"city": "Oslo", "days": [1-7]\}\}'
        auto = client.chat.completions.create(model="llama", messages=MESSAGES, tools=[WEATHER], max_tokens=40,
                                              extra_body={"structured_outputs": {"regex": regex}})
    for call in forced.choices[0].message.tool_calls:
        assert call.function.name == "weather"
        jsonschema.validate(json.loads(call.function.arguments), schema)
    jsonschema.validate(json.loads(as_json.choices[0].message.content), schema)
    [call] = auto.choices[0].message.tool_calls
    assert auto.choices[0].finish_reason == "tool_calls" and json.loads(call.function.arguments)["city"] == "Oslo"
