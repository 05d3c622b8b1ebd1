"""One text per generation: with a sentencepiece (Metaspace) tokenizer saved by transformers, every API gives the
same text, streamed or not, with or without a stop string, and prompt + text reads as prompt + output decoded."""
from __future__ import annotations

import json

import httpx
import pytest
from tokenizers import Tokenizer

from tests.e2e.server import running_server, save_tiny_llama, write_config
from tests.sentencepiece_tokenizer import sentencepiece_tokenizer

transformers = pytest.importorskip("transformers")

PROMPTS = ["The cat sat on the", "Once upon a", "I love Beijing, because"]  # the first two go on with "▁..." tokens
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("sentencepiece-llama")
    tokenizer = sentencepiece_tokenizer()
    save_tiny_llama(path, vocab_size=tokenizer.get_vocab_size())
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(path)  # replaces the builtin tokenizer.json save_tiny_llama wrote
    return path


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    with running_server(write_config(tmp_path_factory.mktemp("server"), {"model_path": str(checkpoint)})) as running:
        yield running


def events(server, path: str, body: dict) -> list[dict]:
    """The JSON events of a streamed answer, without the final [DONE]."""
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=120) as response:
        response.raise_for_status()
        lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    return [json.loads(line) for line in lines if line != "[DONE]"]


def post(server, path: str, body: dict) -> dict:
    response = httpx.post(f"{server.url}{path}", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def completion_texts(server, prompt: str, stop: str | None) -> dict[str, str]:
    """The greedy output of `prompt`, as each way of asking for it reads."""
    parameters = {"max_new_tokens": MAX_TOKENS, "ignore_eos": True, "stop": [stop] if stop else []}
    native = {"inputs": prompt, "parameters": parameters}
    streamed = events(server, "/models/llama/generate", native)
    openai = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stop": stop}
    return {
        "generate": post(server, "/models/llama/generate", native)["generated_text"],
        "generate, streamed tokens": "".join(event["token"]["text"] for event in streamed[:-1]),
        "generate, streamed final event": streamed[-1]["generated_text"],
        "completions": post(server, "/v1/completions", openai)["choices"][0]["text"],
        "completions, streamed": "".join(chunk["choices"][0]["text"] for chunk in events(server, "/v1/completions", openai)),
    }


def chat_texts(server, prompt: str, stop: str | None) -> dict[str, str]:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stop": stop}
    chunks = events(server, "/v1/chat/completions", body)
    return {
        "chat": post(server, "/v1/chat/completions", body)["choices"][0]["message"]["content"],
        "chat, streamed": "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks),
    }


def a_stop_string_inside(text: str) -> str:
    """Two characters from the second half of `text`, so the text cut before them is not empty."""
    middle = len(text) // 2
    return next(text[i : i + 2] for i in range(middle, len(text) - 1) if text[i : i + 2].strip())


def test_every_api_gives_the_text_decoding_prompt_and_output_together_gives(checkpoint, server):
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    first_pieces = []
    for prompt in PROMPTS:
        answer = post(server, "/models/llama/generate",
                      {"inputs": prompt, "parameters": {"max_new_tokens": MAX_TOKENS, "ignore_eos": True, "logprobs": 0}})
        text, output_ids = answer["generated_text"], [token["id"] for token in answer["details"]["logprobs"]]
        prompt_ids = post(server, "/tokenize", {"prompt": prompt})["tokens"]
        assert tokenizer.decode(prompt_ids + output_ids) == tokenizer.decode(prompt_ids) + text, prompt
        first_pieces.append(tokenizer.id_to_token(output_ids[0]))

        assert set(completion_texts(server, prompt, None).values()) == {text}, prompt
        stop = a_stop_string_inside(text)
        assert set(completion_texts(server, prompt, stop).values()) == {text[: text.index(stop)]}, (prompt, stop)

        chat = chat_texts(server, prompt, None)
        assert len(set(chat.values())) == 1, chat
        chat_text = chat["chat"]
        stop = a_stop_string_inside(chat_text)
        assert set(chat_texts(server, prompt, stop).values()) == {chat_text[: chat_text.index(stop)]}, (prompt, stop)
    assert any(piece.startswith("\u2581") for piece in first_pieces), first_pieces  # a first token with a leading space
