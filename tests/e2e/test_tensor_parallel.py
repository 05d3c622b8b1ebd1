"""Two tensor-parallel ranks (gloo on CPU) through the live server: the outputs of one rank, both transports, faults."""
from __future__ import annotations

import glob
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.e2e.server import _cmdline, free_ports, running_server, save_tiny_llama, stream_tokens, write_config
from tests.e2e.test_faults import SLOW_DECODE, error_event, next_event, open_stream, run_serve, wait_for
from tests.e2e.test_precision import stream_with_id

transformers = pytest.importorskip("transformers")

PROMPTS = ["I love Beijing, because", "def add(a, b):\n    return a + b", "Good morning!"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """GQA with KV heads split across the ranks (2 KV heads), and one KV head replicated on both ranks; random
    biases, since a row-parallel bias (o_proj) must be added once, not once per rank."""
    paths = {kv: tmp_path_factory.mktemp(f"kv{kv}") for kv in (2, 1)}
    for kv, path in paths.items():
        save_tiny_llama(path, bias_std=0.5, num_key_value_heads=kv, attention_bias=True)
    return paths


def tp_config(tmp_path, model_path, world: int, scheduler: dict | None = None, **serving) -> str:
    *agent_ports, dist_port = free_ports(world + 1)
    agents = {"agent_ports": agent_ports, "dist_port": dist_port, **serving}
    return write_config(tmp_path, {"model_path": str(model_path)}, serving_config=agents, scheduler_config=scheduler or {})


def greedy_run(config_path: str) -> tuple[list[list[int]], int]:
    """Greedy tokens of the prompts sent together (batched steps), and the master's pid."""
    with running_server(config_path) as server, ThreadPoolExecutor(len(PROMPTS)) as pool:
        runs = pool.map(lambda i: stream_with_id(server.url, f"prompt{i}", PROMPTS[i], 10), range(len(PROMPTS)))
        return list(runs), server.process.pid


def dumped_logits(dump_dir: str) -> np.ndarray:
    files = sorted(os.listdir(dump_dir))
    return np.stack([np.load(os.path.join(dump_dir, name)) for name in files])


@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_two_ranks_give_the_tokens_and_logits_of_one(checkpoints, tmp_path, num_kv_heads):
    model_path = checkpoints[num_kv_heads]
    dumps = {world: str(tmp_path / f"dump{world}") for world in (1, 2)}
    one, _ = greedy_run(tp_config(tmp_path, model_path, 1, logits_dump_dir=dumps[1]))
    trace = tmp_path / "trace.jsonl"
    two, _ = greedy_run(tp_config(tmp_path, model_path, 2, logits_dump_dir=dumps[2], step_trace_path=str(trace)))
    assert two == one
    # rank 1 took the pending tokens of overlapped steps from rank 0's samples in shared memory
    assert sum(json.loads(line)["overlapped"] for line in trace.read_text().splitlines()) > 5
    logits_one, logits_two = dumped_logits(dumps[1]), dumped_logits(dumps[2])
    assert logits_one.shape == logits_two.shape == (len(PROMPTS) * 10, 1024)
    np.testing.assert_allclose(logits_two, logits_one, atol=1e-4, rtol=0)


def test_inline_transport_gives_the_outputs_of_shared_memory_without_any_segment(checkpoints, tmp_path):
    shared, _ = greedy_run(tp_config(tmp_path, checkpoints[2], 2))
    config = tp_config(tmp_path, checkpoints[2], 2, transport="inline")
    with running_server(config) as server:
        inline = [stream_tokens(server.url, p, max_new_tokens=10, ignore_eos=True)[0] for p in PROMPTS]
        segments = glob.glob(f"/dev/shm/llmserve_{server.process.pid}_*")
    assert inline == shared and segments == []


def rank_pids(server) -> dict[int, int]:
    pids = {}
    for pid in server.agent_pids():
        words = _cmdline(pid).split()
        pids[int(words[words.index("--rank") + 1])] = pid
    return pids


def test_killing_one_rank_fails_in_flight_requests_then_the_whole_group_restarts_leaving_no_shared_memory(
    checkpoints, tmp_path
):
    config = tp_config(tmp_path, checkpoints[2], 2, scheduler=SLOW_DECODE, agent_restart_backoff=0.1)
    with running_server(config) as server:
        client, _, lines = open_stream(server.url)
        next_event(lines)
        ranks = rank_pids(server)
        started = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        assert "agent" in error_event(lines)["error"] and time.monotonic() - started < 10
        client.close()
        assert server.health().status_code == 503
        assert wait_for(lambda: server.health().status_code == 200, timeout=90)
        restarted = rank_pids(server)
        assert set(restarted.values()).isdisjoint(ranks.values())  # rank 0 survived the kill, but was replaced too
        assert len(stream_tokens(server.url, PROMPTS[0], max_new_tokens=4, ignore_eos=True)[0]) == 4
        creators = (server.process.pid, ranks[0], restarted[0])  # the master's step arrays, rank 0's all-reduce segment
    assert [path for pid in creators for path in glob.glob(f"/dev/shm/llmserve_{pid}_*")] == []


def test_ranks_that_do_not_divide_the_heads_stop_the_start_with_a_clear_error(checkpoints, tmp_path):
    result = run_serve(tp_config(tmp_path, checkpoints[2], 3))
    assert result.returncode == 2
    assert "3 ranks do not divide the 4 attention heads" in result.stderr + result.stdout
