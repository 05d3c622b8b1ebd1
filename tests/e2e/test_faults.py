"""Faults a user can cause: disconnects, dying agents, signals, bad start-up. Nothing leaks, nothing hangs."""
from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from tests.conftest import ROOT
from tests.e2e.server import free_port, running_server, stop, write_config

SLOW_DECODE = {"decode_batch_waiting_time": 0.05, "decode_batch_size": 8}  # ~20 tokens/s, so tests can act mid-stream


def open_stream(url: str, max_new_tokens: int = 200):
    client = httpx.Client(timeout=60)
    body = {"inputs": "a long story", "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos": True}, "stream": True}
    response = client.send(client.build_request("POST", f"{url}/models/llama/generate", json=body), stream=True)
    return client, response, response.iter_lines()


def next_event(lines) -> dict:
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line[len("data: "):])
    raise AssertionError("the stream ended")


def error_event(lines) -> dict:
    """The first event of the stream that is not a token: the error that ended it."""
    event = next_event(lines)
    while "token" in event:
        event = next_event(lines)
    return event


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_client_disconnect_aborts_the_request_and_returns_its_blocks(tmp_path):
    with running_server(write_config(tmp_path, scheduler_config=SLOW_DECODE)) as server:
        client, response, lines = open_stream(server.url)
        next_event(lines)
        next_event(lines)
        busy = server.health().json()
        assert busy["kv_blocks_free"] < busy["kv_blocks_total"]
        response.close()
        client.close()
        assert wait_for(lambda: server.health().json()["kv_blocks_free"] == busy["kv_blocks_total"])
        assert server.health().json()["num_running"] == 0
        assert wait_for(lambda: '"finish_reason": "abort"' in server.log())


def test_killed_agent_fails_in_flight_requests_promptly_and_health_turns_503(tmp_path):
    with running_server(write_config(tmp_path, scheduler_config=SLOW_DECODE)) as server:
        client, response, lines = open_stream(server.url)
        next_event(lines)
        (agent_pid,) = server.agent_pids()
        started = time.monotonic()
        os.kill(agent_pid, signal.SIGKILL)
        assert "agent" in error_event(lines)["error"] and time.monotonic() - started < 10
        client.close()
        assert server.health().status_code == 503
        refused = httpx.post(f"{server.url}/models/llama/generate", json={"inputs": "x"}, timeout=10)
        assert refused.status_code == 503
        assert "exited" in server.log()


def test_sigterm_stops_agents_and_unlinks_shared_memory(tmp_path):
    with running_server(write_config(tmp_path)) as server:
        httpx.post(f"{server.url}/models/llama/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}, timeout=30)
        agent_pids = server.agent_pids()
        assert agent_pids and glob.glob(f"/dev/shm/llmserve_{server.process.pid}_*")
        assert stop(server) == 0
    assert glob.glob(f"/dev/shm/llmserve_{server.process.pid}_*") == []
    assert not any(os.path.exists(f"/proc/{pid}") and _not_zombie(pid) for pid in agent_pids)


def test_sigint_is_handled_like_sigterm(tmp_path):
    with running_server(write_config(tmp_path)) as server:
        agent_pids = server.agent_pids()
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(30) == 0
    assert glob.glob(f"/dev/shm/llmserve_{server.process.pid}_*") == []
    assert not any(os.path.exists(f"/proc/{pid}") and _not_zombie(pid) for pid in agent_pids)


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run_serve(config_path: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmserve", "serve", "--config", config_path],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )


def test_model_without_weights_fails_start_with_a_clear_error(tmp_path):
    model_dir = tmp_path / "empty-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 1024, "hidden_size": 64,
                                                       "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4}))
    config = write_config(tmp_path, {"model_path": str(model_dir), "tokenizer_path": "builtin"})
    result = run_serve(config)
    assert result.returncode != 0
    assert "failed to start" in result.stderr and "safetensors" in result.stderr


def test_agent_port_in_use_fails_start_with_a_clear_error(tmp_path):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = run_serve(write_config(tmp_path, serving_config={"agent_ports": [port]}))
    assert result.returncode != 0
    assert "could not listen on its port" in result.stderr


def test_server_port_in_use_fails_start_with_a_clear_error(tmp_path):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = run_serve(write_config(tmp_path, serving_config={"server_port": port}))
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def start_agent_by_hand(config: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmserve", "agent", "--config", config, "--rank", "0"], cwd=ROOT)


def test_agent_started_by_hand_serves_and_the_master_waits_for_it_to_come_back(tmp_path):
    keys_dir = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "llmserve", "keys", str(keys_dir)], cwd=ROOT, check=True, capture_output=True)
    config = write_config(
        tmp_path, serving_config={"launch_agents": False, "agent_keys_dir": str(keys_dir), "agent_restart_backoff": 0.1}
    )
    agent = start_agent_by_hand(config)
    body = {"inputs": "by hand", "parameters": {"max_new_tokens": 4, "ignore_eos": True}}
    try:
        with running_server(config) as server:
            response = httpx.post(f"{server.url}/models/llama/generate", json=body, timeout=60)
            assert response.json()["details"]["generated_tokens"] == 4
            agent.kill()
            agent.wait()
            assert wait_for(lambda: server.health().status_code == 503)
            assert "closed its connection" in server.health().json()["reason"]
            agent = start_agent_by_hand(config)
            assert wait_for(lambda: server.health().status_code == 200, timeout=60)
            response = httpx.post(f"{server.url}/models/llama/generate", json=body, timeout=60)
            assert response.json()["details"]["generated_tokens"] == 4
            assert server.health().json()["agent_restarts"] == 1
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


def test_agent_started_by_hand_needs_the_channel_keys(tmp_path):
    config = write_config(tmp_path)  # launch_agents: true, so the file itself is valid
    result = subprocess.run(
        [sys.executable, "-m", "llmserve", "agent", "--config", config, "--rank", "0"], cwd=ROOT, capture_output=True, text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "llmserve keys DIR" in result.stderr


def test_killed_agent_is_restarted_until_the_restart_budget_is_spent(tmp_path):
    """Under load: each death fails the requests in flight at once, then a fresh agent serves; the third death is final."""
    serving = {"agent_restart_backoff": 0.1, "agent_restart_limit": 2}
    with running_server(write_config(tmp_path, serving_config=serving, scheduler_config=SLOW_DECODE)) as server:
        long_prompt = {"inputs": "one two three four five six " * 8, "parameters": {"max_new_tokens": 2}}
        for restarts in (1, 2):
            assert httpx.post(f"{server.url}/models/llama/generate", json=long_prompt, timeout=60).status_code == 200
            hits = server.health().json()["prefix_cache_hits"]
            streams = [open_stream(server.url) for _ in range(3)]
            for _, _, lines in streams:
                next_event(lines)
            (agent_pid,) = server.agent_pids()
            os.kill(agent_pid, signal.SIGKILL)
            for client, _, lines in streams:
                assert "agent" in error_event(lines)["error"]
                client.close()
            assert wait_for(lambda: server.health().status_code == 200, timeout=60)
            health = server.health().json()
            assert health["agent_restarts"] == restarts and health["kv_blocks_free"] == health["kv_blocks_total"]
            # the new agent's pools are empty: the prompt cached before the death is computed again, not found
            assert httpx.post(f"{server.url}/models/llama/generate", json=long_prompt, timeout=60).status_code == 200
            assert server.health().json()["prefix_cache_hits"] == hits
            short = {"inputs": "again", "parameters": {"max_new_tokens": 3, "ignore_eos": True}}
            assert httpx.post(f"{server.url}/models/llama/generate", json=short, timeout=60).status_code == 200
            assert f"llmserve_agent_restarts_total {restarts}.0" in httpx.get(f"{server.url}/metrics").text
        segments = glob.glob(f"/dev/shm/llmserve_{server.process.pid}_*")
        assert len(segments) == 4  # the live transport's two input and two output buffers, nothing of the dead ones
        (agent_pid,) = server.agent_pids()
        os.kill(agent_pid, signal.SIGKILL)
        assert wait_for(lambda: "no restart left" in (server.health().json().get("reason") or ""))
        assert server.health().status_code == 503
        agent_pids = server.agent_pids()
        assert stop(server) == 0
    assert glob.glob(f"/dev/shm/llmserve_{server.process.pid}_*") == []
    assert not any(os.path.exists(f"/proc/{pid}") and _not_zombie(pid) for pid in agent_pids)


def test_master_with_agents_started_by_hand_needs_the_channel_keys(tmp_path):
    result = run_serve(write_config(tmp_path, serving_config={"launch_agents": False}))
    assert result.returncode == 2 and "agent_keys_dir" in result.stderr and "llmserve keys DIR" in result.stderr
