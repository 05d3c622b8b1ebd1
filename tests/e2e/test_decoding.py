"""Decoding features through the live server, against `transformers` on a checkpoint the test saves."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from llmserve.master.tokenizer import build_builtin_tokenizer, encode
from tests.e2e.server import running_server, save_tiny_llama, stream_tokens, write_config

transformers = pytest.importorskip("transformers")

PROMPTS = ["I love Beijing, because", "def add(a, b):\n    return a + b", "Good morning!"]
TOKENIZER = build_builtin_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return path, save_tiny_llama(path)


@pytest.fixture(scope="module")
def frequent_token(model_dir):
    """A token greedy decoding emits early for the first prompt: used as the end token so beams do end."""
    _, model = model_dir
    ids = torch.tensor([encode(TOKENIZER, PROMPTS[0])])
    out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=0)
    return int(out[0, ids.shape[1] + 3])


@pytest.fixture(scope="module")
def server(model_dir, frequent_token, tmp_path_factory):
    path, _ = model_dir
    tmp = tmp_path_factory.mktemp("server")
    model_config = {"model_path": str(path), "end_token_id": [frequent_token]}
    with running_server(write_config(tmp, model_config, pa_config={"num_blocks": 256, "block_size": 4})) as running:
        yield running


def generate(server, prompt: str, **parameters) -> httpx.Response:
    body = {"inputs": prompt, "parameters": parameters}
    return httpx.post(f"{server.url}/models/llama/generate", json=body, timeout=120)


def hf_generate(model, prompt: str, eos: int, **kwargs) -> torch.Tensor:
    ids = torch.tensor([encode(TOKENIZER, prompt)])
    with torch.no_grad():
        out = model.generate(ids, eos_token_id=eos, pad_token_id=0, **kwargs)
    return out[:, ids.shape[1]:]


def strip_after_end(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@pytest.mark.parametrize(
    "beam_args",
    [
        dict(num_beams=4, n=2),
        dict(num_beams=3, n=3, length_penalty=0.5, early_stopping=True),
        dict(num_beams=2, n=1, early_stopping="never", length_penalty=2.0),
        dict(num_beams=4, n=2, no_repeat_ngram_size=2, repetition_penalty=1.5),
    ],
)
def test_beam_search_equals_transformers(server, model_dir, frequent_token, beam_args):
    _, model = model_dir
    for prompt in PROMPTS:
        params = dict(max_new_tokens=10, **beam_args)
        response = generate(server, prompt, **params)
        assert response.status_code == 200, response.text
        ours = [seq["token_ids"] for seq in response.json()["details"]["sequences"]]
        hf_args = {("num_return_sequences" if k == "n" else k): v for k, v in params.items()}
        expected = hf_generate(model, prompt, frequent_token, do_sample=False, **hf_args)
        assert ours == [strip_after_end(row.tolist(), frequent_token) for row in expected], prompt


def test_penalised_greedy_output_equals_transformers(server, model_dir, frequent_token):
    _, model = model_dir
    params = dict(max_new_tokens=12, min_new_tokens=12, repetition_penalty=1.3, no_repeat_ngram_size=3)
    for prompt in PROMPTS:
        ids, _ = stream_tokens(server.url, prompt, **params)
        expected = hf_generate(model, prompt, frequent_token, do_sample=False, **params)
        assert ids == expected[0].tolist(), prompt


def test_logprobs_agree_with_the_reference_log_softmax(server, model_dir):
    _, model = model_dir
    response = generate(server, PROMPTS[0], max_new_tokens=6, logprobs=3, ignore_eos=True)
    details = response.json()["details"]
    prompt_ids = encode(TOKENIZER, PROMPTS[0])
    output_ids = [entry["id"] for entry in details["logprobs"]]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + output_ids])).logits[0].float()
    reference = torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1 : -1]
    for position, entry in enumerate(details["logprobs"]):
        assert entry["logprob"] == pytest.approx(reference[position, entry["id"]].item(), abs=1e-4)
        top = reference[position].topk(3)
        assert [t["id"] for t in entry["top_logprobs"]] == top.indices.tolist()
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_a_stop_string_split_across_tokens_cuts_the_output_before_it(server):
    params = dict(max_new_tokens=12, ignore_eos=True)
    ids, final = stream_tokens(server.url, PROMPTS[1], **params)
    pieces = [TOKENIZER.decode(ids[: i + 1]) for i in range(len(ids))]
    full = final["generated_text"]
    # a stop string that starts inside one token's text and ends inside a later one
    boundary = next(i for i in range(2, len(pieces)) if len(pieces[i - 1]) - len(pieces[i - 2]) >= 2)
    start = len(pieces[boundary - 1]) - 1
    stop = full[start : start + 3]
    assert len(stop) == 3 and full.find(stop) == start
    streamed_ids, streamed = stream_tokens(server.url, PROMPTS[1], stop=[stop], **params)
    assert streamed["generated_text"] == full[:start]
    assert streamed["details"]["finish_reason"] == "stop_sequence"
    body = generate(server, PROMPTS[1], stop=[stop], **params).json()
    assert body["generated_text"] == full[:start]


def test_streamed_text_with_a_stop_string_never_shows_the_stop_string(server):
    params = dict(max_new_tokens=12, ignore_eos=True)
    _, final = stream_tokens(server.url, PROMPTS[2], **params)
    stop = final["generated_text"][4:6]
    body = {"inputs": PROMPTS[2], "parameters": {"stop": [stop], **params}, "stream": True}
    texts = []
    with httpx.stream("POST", f"{server.url}/models/llama/generate", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"token": {' in line:
                texts.append(httpx.Response(200, content=line[6:]).json()["token"]["text"])
    assert "".join(texts) == final["generated_text"][: final["generated_text"].find(stop)]


def test_a_seeded_request_gives_the_same_output_alone_and_in_a_busy_batch(server):
    params = dict(max_new_tokens=10, do_sample=True, temperature=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = generate(server, PROMPTS[0], **params).json()["generated_text"]
    noise = dict(max_new_tokens=10, do_sample=True, temperature=1.3, top_p=0.9, ignore_eos=True)
    with ThreadPoolExecutor(7) as pool:
        others = [pool.submit(generate, server, prompt, **noise) for prompt in PROMPTS * 2]
        busy = pool.submit(generate, server, PROMPTS[0], **params)
        assert busy.result().json()["generated_text"] == alone
        assert all(f.result().status_code == 200 for f in others)


def test_n_samples_are_returned_and_best_of_ranks_by_log_probability(server):
    body = generate(server, PROMPTS[0], max_new_tokens=8, do_sample=True, n=3, seed=7, ignore_eos=True).json()
    sequences = body["details"]["sequences"]
    assert [s["index"] for s in sequences] == [0, 1, 2]
    assert len({tuple(s["token_ids"]) for s in sequences}) > 1
    assert body["generated_text"] == sequences[0]["generated_text"]
    ranked = generate(
        server, PROMPTS[0], max_new_tokens=8, do_sample=True, n=2, best_of=5, seed=7, ignore_eos=True
    ).json()["details"]["sequences"]
    scores = [s["cumulative_logprob"] for s in ranked]
    assert len(ranked) == 2 and scores == sorted(scores, reverse=True)
    assert server.health().json()["kv_blocks_free"] == 256


@pytest.mark.parametrize(
    "parameters, name",
    [
        ({"temperature": -0.5}, "parameters.temperature"),
        ({"top_p": 0.0}, "parameters.top_p"),
        ({"top_k": -1}, "parameters.top_k"),
        ({"n": 0}, "parameters.n"),
        ({"num_beams": 2, "do_sample": True}, "parameters.num_beams"),
        ({"logprobs": 1000}, "parameters.logprobs"),
        ({"seed": 2**64}, "parameters.seed"),
        ({"best_of": 1, "n": 2}, "parameters.best_of"),
        ({"num_beams": 2, "stop": ["x"]}, "parameters.stop"),
        ({"num_beams": 8, "stop_token_ids": list(range(3, 19))}, "parameters.stop_token_ids"),
        ({"min_new_tokens": 20, "max_new_tokens": 10}, "parameters.min_new_tokens"),
    ],
)
def test_invalid_values_are_400_naming_the_parameter(server, parameters, name):
    response = generate(server, "hi", **parameters)
    assert response.status_code == 400
    assert name in response.json()["error"]
