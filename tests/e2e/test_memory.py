"""The KV cache sized from a memory budget, reported by the agent and served by the master; process facts."""
from __future__ import annotations

import httpx

from tests.e2e.server import running_server, write_config
from tests.e2e.test_faults import run_serve

TINY_BLOCK_BYTES = 2 * 2 * 8 * 2 * 16 * 4  # K and V x 2 layers x 8 tokens x 2 KV heads x head dim 16 x float32
TINY_INT8_BLOCK_BYTES = 2 * 2 * 8 * 2 * (16 + 4)  # a byte per value and a float32 scale per token and head


def test_a_memory_budget_becomes_the_blocks_the_master_schedules_and_health_reports(tmp_path):
    config = write_config(tmp_path, pa_config={"num_blocks": "auto", "kv_cache_memory": "1MiB", "block_size": 8})
    with running_server(config) as server:
        health = server.health().json()
        assert health["kv_blocks_total"] == 2**20 // TINY_BLOCK_BYTES == 256
        assert health["kv_cache_tokens"] == 256 * 8 and health["kv_cache_dtype"] == "auto"
        assert "KV cache (auto): 256 blocks of 8 tokens = 2048 tokens" in server.log()
        processes = {p["process"]: p for p in health["processes"]}
        assert processes["master"]["pid"] == server.process.pid
        assert [processes["agent0"]["pid"]] == server.agent_pids()
        assert all(p["rss_bytes"] > 10 * 2**20 and p["cpu_seconds"] > 0 for p in processes.values())
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'llmserve_process_resident_memory_bytes{process="agent0"}' in metrics
        assert 'llmserve_process_cpu_seconds_total{process="master"}' in metrics
        assert "llmserve_kv_cache_tokens 2048.0" in metrics


def test_an_int8_kv_cache_holds_more_tokens_in_the_same_budget_and_serves(tmp_path):
    config = write_config(tmp_path, pa_config={"num_blocks": "auto", "kv_cache_memory": "1MiB", "block_size": 8,
                                               "kv_cache_dtype": "int8"})
    with running_server(config) as server:
        health = server.health().json()
        assert health["kv_blocks_total"] == 2**20 // TINY_INT8_BLOCK_BYTES == 819  # 3.2x float32's 256
        assert health["kv_cache_dtype"] == "int8" and "int8 KV cache" in health["kernels"]["attention"]
        assert "KV cache (int8): 819 blocks" in server.log()
        body = {"inputs": "hello world", "parameters": {"max_new_tokens": 12, "ignore_eos": True}}
        response = httpx.post(f"{server.url}/models/llama/generate", json=body, timeout=60)
        assert response.status_code == 200 and response.json()["details"]["generated_tokens"] == 12
        assert server.health().json()["kv_blocks_free"] == 819


def test_a_cache_larger_than_the_memory_left_stops_the_start_with_a_clear_error(tmp_path):
    result = run_serve(write_config(tmp_path, pa_config={"num_blocks": 10**9}))
    assert result.returncode != 0
    assert "pa_config.num_blocks" in result.stderr and "are available after the weights" in result.stderr


def test_a_budget_too_small_for_one_longest_sequence_stops_the_start(tmp_path):
    result = run_serve(write_config(tmp_path, pa_config={"num_blocks": "auto", "kv_cache_memory": "64KiB", "block_size": 8}))
    assert result.returncode != 0 and "fewer than the 32 blocks one sequence of model_config.max_seq_len needs" in result.stderr
