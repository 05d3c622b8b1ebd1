"""Greedy outputs of the live server equal `transformers` generate, token for token."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from llmserve.master.tokenizer import build_builtin_tokenizer, encode
from tests.e2e.server import running_server, stream_tokens, write_config

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "I love Beijing, because",
    "Hi",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "def add(a, b):\n    return a + b",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 16 20 32 64 100 128 256 512 1000",
    "Once upon a time there was a small village by a river. In the village lived a miller, his wife and their children.",
    "Good morning!",
    "Water boils at one hundred degrees Celsius at sea level and at a lower temperature on a high mountain.",
]
MAX_NEW_TOKENS = 16
COMMON = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
CHECKPOINTS = {
    "llama": lambda: transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **COMMON),
    "llama-gqa": lambda: transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **COMMON),
    "qwen2": lambda: transformers.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **COMMON),
}


def save_checkpoint(path, kind: str):
    torch.manual_seed(0)
    config = CHECKPOINTS[kind]()
    model_cls = transformers.Qwen2ForCausalLM if kind == "qwen2" else transformers.LlamaForCausalLM
    model = model_cls(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    build_builtin_tokenizer().save(str(path / "tokenizer.json"))
    return model


def reference_outputs(model) -> list[list[int]]:
    tokenizer = build_builtin_tokenizer()
    outputs = []
    for prompt in PROMPTS:
        ids = torch.tensor([encode(tokenizer, prompt)])
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=2, pad_token_id=0)
        outputs.append(generated[0, ids.shape[1]:].tolist())
    return outputs


def concurrent_outputs(url: str) -> list[list[int]]:
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(stream_tokens, url, p, max_new_tokens=MAX_NEW_TOKENS) for p in PROMPTS]
        return [f.result()[0] for f in futures]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}
    for kind in CHECKPOINTS:
        path = tmp_path_factory.mktemp(kind)
        made[kind] = (path, reference_outputs(save_checkpoint(path, kind)))
    return made


@pytest.mark.parametrize("kind", list(CHECKPOINTS))
def test_concurrent_greedy_outputs_equal_transformers(tmp_path, checkpoints, kind):
    path, expected = checkpoints[kind]
    with running_server(write_config(tmp_path, {"model_path": str(path)})) as server:
        assert concurrent_outputs(server.url) == expected
        assert concurrent_outputs(server.url) == expected  # again: the longer prompts start from cached blocks
        health = server.health().json()
        assert 0 < health["prefix_cache_hits"] < health["prefix_cache_queries"]


def test_outputs_survive_preemption(tmp_path, checkpoints):
    path, expected = checkpoints["llama-gqa"]
    config = write_config(tmp_path, {"model_path": str(path)}, pa_config={"num_blocks": 20, "block_size": 4},
                          scheduler_config={"reserve_new_tokens": 0})  # admitted as soon as they fit: preempted later
    with running_server(config) as server:
        assert concurrent_outputs(server.url) == expected
        health = server.health().json()
        assert health["num_preemptions"] > 0 and health["prefix_cache_hits"] > 0  # recomputes start from the cache


def finish_order(url: str) -> list[str]:
    """Send a long request, then (once it streams) a short one; return the order they finish in."""
    order, lock = [], threading.Lock()
    started = threading.Event()

    def run(name: str, max_new_tokens: int, on_first=None):
        parameters = {"max_new_tokens": max_new_tokens, "ignore_eos": True}
        body = {"inputs": "tell me a story", "parameters": parameters, "stream": True}
        with httpx.stream("POST", f"{url}/models/llama/generate", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and on_first is not None:
                    on_first.set()
                    on_first = None
        with lock:
            order.append(name)

    long = threading.Thread(target=run, args=("long", 60, started))
    long.start()
    assert started.wait(60)
    time.sleep(0.1)
    run("short", 2)
    long.join()
    return order


@pytest.mark.parametrize("strategy, first", [("continuous", "short"), ("static", "long")])
def test_short_request_overtakes_a_long_one_only_with_continuous_batching(tmp_path, strategy, first):
    scheduler = {"batching_strategy": strategy, "decode_batch_waiting_time": 0.02, "decode_batch_size": 8}
    with running_server(write_config(tmp_path, scheduler_config=scheduler)) as server:
        assert finish_order(server.url)[0] == first


def generate(url: str, prompt: str, **parameters) -> dict:
    answer = httpx.post(f"{url}/models/llama/generate", json={"inputs": prompt, "parameters": parameters}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def reference_prompt_logprobs(model, prompt: str, num_top: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The prompt's ids, log_softmax of transformers' logits for each next prompt token, and the top ids."""
    ids = encode(build_builtin_tokenizer(), prompt)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    chosen = logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return ids, chosen, logprobs[:-1].topk(num_top, dim=-1).indices


def test_prompt_logprobs_equal_transformers_log_softmax_chunked_and_after_cache_hits(tmp_path):
    path = tmp_path / "llama"
    model = save_checkpoint(path, "llama-gqa")
    scheduler = {"max_num_batched_tokens": 16, "decode_batch_size": 8}  # the longer prompts run in chunks
    with running_server(write_config(tmp_path, {"model_path": str(path)}, scheduler_config=scheduler)) as server:
        for prompt in (PROMPTS[1], PROMPTS[5], PROMPTS[7]):
            ids, expected, top_ids = reference_prompt_logprobs(model, prompt, 3)
            generate(server.url, prompt, max_new_tokens=2)  # its blocks are cached: the next requests compute them anyway
            parameters = {"max_new_tokens": 2, "decoder_input_details": True, "prompt_logprobs": 3}
            prefill = generate(server.url, prompt, **parameters)["details"]["prefill"]
            assert [token["id"] for token in prefill] == ids and prefill[0]["logprob"] is None
            assert torch.allclose(torch.tensor([t["logprob"] for t in prefill[1:]], dtype=torch.float64), expected, atol=1e-4)
            assert [[top["id"] for top in t["top_logprobs"]] for t in prefill[1:]] == top_ids.tolist()
            body = {"prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 0}
            choice = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
            assert choice["text"] == prompt and choice["finish_reason"] == "length"
            token_logprobs = choice["logprobs"]["token_logprobs"]
            assert len(token_logprobs) == len(ids) and token_logprobs[0] is None
            assert torch.allclose(torch.tensor(token_logprobs[1:], dtype=torch.float64), expected, atol=1e-4)


def test_speculative_decoding_keeps_greedy_outputs_equal_to_transformers(tmp_path, checkpoints):
    """n-gram speculation on (the random model repeats itself, so proposals are accepted): the same greedy tokens
    as transformers, streamed; per request, the same tokens, log-probabilities, seeded samples and stop-string
    cut as with speculation switched off."""
    path, expected = checkpoints["llama-gqa"]
    speculative = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}
    config = write_config(tmp_path, {"model_path": str(path)}, speculative_config=speculative,
                          pa_config={"num_blocks": 64, "block_size": 4})
    with running_server(config) as server:
        assert concurrent_outputs(server.url) == expected
        parameters = {"max_new_tokens": 40, "logprobs": 2, "ignore_eos": True}
        plain, fast = (generate(server.url, PROMPTS[0], speculative=s, **parameters)["details"]["logprobs"] for s in (False, True))
        assert [t["id"] for t in fast] == [t["id"] for t in plain]
        assert [t["logprob"] for t in fast] == pytest.approx([t["logprob"] for t in plain], abs=1e-4)
        parameters = {"max_new_tokens": 40, "do_sample": True, "temperature": 0.3, "seed": 7, "ignore_eos": True}
        plain, fast = (generate(server.url, PROMPTS[0], speculative=s, **parameters) for s in (False, True))
        assert fast["generated_text"] == plain["generated_text"]
        text = generate(server.url, PROMPTS[0], max_new_tokens=40, ignore_eos=True, speculative=False)["generated_text"]
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        cut = [generate(server.url, PROMPTS[0], max_new_tokens=40, ignore_eos=True, stop=[stop], speculative=s)
               for s in (False, True)]
        assert cut[0]["generated_text"] == cut[1]["generated_text"] == text[: text.index(stop)]
        assert cut[0]["details"]["generated_tokens"] == cut[1]["details"]["generated_tokens"]
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        accepted = [line for line in metrics.splitlines() if line.startswith("llmserve_spec_decode_num_accepted_tokens_total")]
        assert accepted and float(accepted[0].split()[-1]) > 0


def test_a_draft_model_keeps_greedy_outputs_equal_to_transformers(tmp_path, checkpoints):
    """The agent's draft model proposes: the checkpoint itself, loaded from draft_model_path through the layer
    slicing (all its layers), so every greedy proposal must be accepted, which only holds if the draft's KV
    follows every sequence through chunks, prefix-cache hits and copy-on-write. Outputs equal transformers';
    seeded n = 2 samples equal those without speculation."""
    path, expected = checkpoints["llama-gqa"]
    speculative = {"method": "draft", "num_speculative_tokens": 3, "adaptive": False, "draft_model_path": str(path),
                   "draft_num_layers": 2}
    config = write_config(tmp_path, {"model_path": str(path)}, speculative_config=speculative,
                          scheduler_config={"max_num_batched_tokens": 24, "decode_batch_size": 8})  # prompts in chunks
    with running_server(config) as server:
        assert concurrent_outputs(server.url) == expected
        assert concurrent_outputs(server.url) == expected  # again: prompts start from cached blocks
        health = server.health().json()
        assert 0 < health["spec_accepted_tokens"] == health["spec_draft_tokens"] and "draft" in health["kernels"]
        parameters = {"max_new_tokens": 40, "do_sample": True, "temperature": 0.8, "seed": 3, "n": 2, "ignore_eos": True}
        plain, fast = (httpx.post(f"{server.url}/models/llama/generate", timeout=60, json={
            "inputs": PROMPTS[2], "parameters": {**parameters, "speculative": s}}).json() for s in (False, True))
        assert fast["details"]["sequences"] == plain["details"]["sequences"]
