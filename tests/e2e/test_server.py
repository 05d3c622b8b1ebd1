"""The real server on loopback: streaming and plain generate, health, the per-request log line."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.e2e.server import running_server, stream_tokens, write_config


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(write_config(tmp_path_factory.mktemp("server"))) as server:
        yield server


def test_stream_delivers_tokens_then_the_whole_text(server):
    ids, final = stream_tokens(server.url, "I love Beijing, because", max_new_tokens=10, do_sample=True, top_k=5, ignore_eos=True)
    assert len(ids) == 10
    assert final["details"]["generated_tokens"] == 10
    assert final["details"]["finish_reason"] == "length"


def test_plain_generate_returns_generated_text_and_full_text_on_request(server):
    body = {"inputs": "Hello there", "parameters": {"max_new_tokens": 6, "ignore_eos": True}}
    plain = httpx.post(f"{server.url}/models/llama/generate", json=body, timeout=60).json()
    body["parameters"]["return_full_text"] = True
    full = httpx.post(f"{server.url}/models/llama/generate", json=body, timeout=60).json()
    assert full["generated_text"] == "Hello there" + plain["generated_text"]  # greedy: same output twice


def test_seeded_sampling_repeats(server):
    params = {"max_new_tokens": 8, "do_sample": True, "temperature": 0.9, "top_p": 0.9, "seed": 42, "ignore_eos": True}
    assert stream_tokens(server.url, "Once upon a time", **params)[0] == stream_tokens(server.url, "Once upon a time", **params)[0]


def test_health_reports_the_kv_cache(server):
    response = server.health()
    assert response.status_code == 200
    assert response.json()["kv_blocks_free"] == response.json()["kv_blocks_total"] == 256


def test_each_request_logs_one_line_with_its_timings(server):
    stream_tokens(server.url, "log me", max_new_tokens=3, ignore_eos=True)
    records = [json.loads(line[line.index("{"):]) for line in server.log().splitlines() if '"res_time"' in line]
    last = records[-1]
    assert last["output_tokens"] == 3 and last["prompt_tokens"] > 0
    assert 0 < last["first_token_time"] <= last["res_time"]


def test_client_errors_over_http(server):
    url = f"{server.url}/models/llama/generate"
    bad_json = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}, timeout=10)
    unknown = httpx.post(url, json={"inputs": "x", "parameters": {"bogus": 1}}, timeout=10)
    too_long = httpx.post(url, json={"inputs": "x", "parameters": {"max_new_tokens": 1000}}, timeout=10)
    wrong_model = httpx.post(f"{server.url}/models/other/generate", json={"inputs": "x"}, timeout=10)
    assert [r.status_code for r in (bad_json, unknown, too_long, wrong_model)] == [400, 400, 400, 404]
    assert "parameters.bogus" in unknown.json()["error"]
