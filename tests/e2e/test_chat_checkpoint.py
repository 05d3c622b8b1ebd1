"""Chat completions on a checkpoint whose tokenizer transformers saved with a chat template: same tokens as HF."""
from __future__ import annotations

import httpx
import openai
import pytest
import torch

from llmserve.master.tokenizer import build_builtin_tokenizer, token_bytes
from tests.e2e.server import running_server, save_tiny_llama, write_config

transformers = pytest.importorskip("transformers")

# A Llama-3-like template: header tokens per role, the end-of-turn token after each message.
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start|>' + message['role'] + '<|sep|>\n\n' + message['content'] | trim + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start|>assistant<|sep|>\n\n' }}{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What colour is the sky?"},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat-llama")
    model = save_tiny_llama(path)
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
