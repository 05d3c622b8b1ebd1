"""Logits dumping on a real server, checked with tools/acc_allclose.py across runs."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.e2e.server import TINY_LLAMA, running_server, write_config
from llmserve.tools.acc_allclose import main as acc_allclose

REQUESTS = {"prec-a": ("I love Beijing, because", 5), "prec/b": ("Once upon a time", 3), "prec-c": ("Hello", 1)}
FILE_STEMS = {"prec-a": "prec-a", "prec/b": "prec_b", "prec-c": "prec-c"}


def stream_with_id(url: str, request_id: str, prompt: str, max_new_tokens: int) -> list[int]:
    """Token ids of one greedy streaming request sent with an X-Request-Id header."""
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos": True}, "stream": True}
    headers = {"X-Request-Id": request_id}
    ids = []
    with httpx.stream("POST", f"{url}/models/llama/generate", json=body, headers=headers, timeout=60) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: "):
                token = json.loads(line[len("data: "):]).get("token")
                if token is not None:
                    ids.append(token["id"])
    return ids


def serve_and_dump(tmp_path, name: str, model_config: dict | None = None) -> tuple[str, dict[str, list[int]]]:
    """Run the requests concurrently (so steps batch several of them) on a fresh server; return the dump dir."""
    dump_dir = str(tmp_path / name)
    config = write_config(
        tmp_path,
        model_config,
        serving_config={"logits_dump_dir": dump_dir},
        scheduler_config={"batch_waiting_time": 0.5},  # the first prefill waits for the others: multi-row steps
    )
    with running_server(config) as server, ThreadPoolExecutor(len(REQUESTS)) as pool:
        futures = {rid: pool.submit(stream_with_id, server.url, rid, *args) for rid, args in REQUESTS.items()}
        outputs = {rid: future.result() for rid, future in futures.items()}
    return dump_dir, outputs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("precision")
    perturbed = {"load_format": "dummy", "dummy_config": TINY_LLAMA, "tokenizer_path": "builtin", "seed": 1}
    return {name: serve_and_dump(tmp_path, name, config) for name, config in (("base", None), ("again", None), ("seed1", perturbed))}


def test_one_file_per_generated_token_with_the_documented_names(runs):
    dump_dir, _ = runs["base"]
    expected = {f"{FILE_STEMS[rid]}_{p:05d}.npy" for rid, (_, length) in REQUESTS.items() for p in range(length)}
    assert set(os.listdir(dump_dir)) == expected


def test_each_file_holds_the_logits_that_chose_its_token(runs):
    dump_dir, outputs = runs["base"]
    for rid, ids in outputs.items():
        rows = [np.load(os.path.join(dump_dir, f"{FILE_STEMS[rid]}_{p:05d}.npy")) for p in range(len(ids))]
        assert all(row.dtype == np.float32 and row.shape == (TINY_LLAMA["vocab_size"],) for row in rows)
        assert [int(row.argmax()) for row in rows] == ids  # greedy: the dumped row decided the token


def test_two_float32_runs_agree(runs):
    assert acc_allclose(["--base_path", runs["base"][0], "--new_path", runs["again"][0]]) == 0


def test_a_perturbed_model_fails_the_check(runs, capsys):
    assert acc_allclose(["--base_path", runs["base"][0], "--new_path", runs["seed1"][0]]) == 1
    assert capsys.readouterr().out.rstrip().endswith("FAIL")
