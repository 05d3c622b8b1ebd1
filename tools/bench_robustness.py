"""What the hardening costs a live server: /health latency and master memory under the largest bodies, and
how long a killed agent takes to come back.

Starts `llmserve serve` with the given config; polls /health every 10 ms from a thread while it sends, in
turn, a body over serving_config.max_request_body_bytes (413), a prompt filling the largest body, and a
prompt just under the length bound (tokenized, then refused as too long). Reports /health latency
percentiles and the master's resident memory before and after; then kills the agent --restarts times and
reports the time from the kill until /health is 200 again (no backoff: agent_restart_backoff 0). Writes the numbers as JSON to --out.

    python tools/bench_robustness.py --config configs/default.yaml --rounds 5 --restarts 3 --out results/robustness.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time

import httpx
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llmserve.common.config import packaged_config  # noqa: E402
from llmserve.tools.bench_decode import start_server  # noqa: E402


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


class HealthPoller(threading.Thread):
    """GET /health every `interval` s; keeps each answer's latency."""

    def __init__(self, url: str, interval: float = 0.01):
        super().__init__(daemon=True)
        self.url, self.interval = url, interval
        self.latencies_ms: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                client.get(f"{self.url}/health")
                self.latencies_ms.append((time.perf_counter() - started) * 1e3)
                time.sleep(self.interval)


def big_bodies(max_body: int, max_prompt_chars: int) -> dict[str, bytes]:
    envelope = len(json.dumps({"prompt": ""}).encode())
    return {
        "over_limit": json.dumps({"prompt": "x" * max_body}).encode(),
        "largest_body": json.dumps({"prompt": "hello world " * ((max_body - envelope) // 12)}).encode(),
        "under_length_bound": json.dumps({"prompt": "hello world " * (min(max_prompt_chars, max_body) // 12 - 2)}).encode(),
    }


def measure_bodies(url: str, pid: int, bodies: dict[str, bytes], rounds: int) -> dict:
    poller = HealthPoller(url)
    rss_before = rss_mb(pid)
    poller.start()
    answers: dict[str, list] = {name: [] for name in bodies}
    with httpx.Client(timeout=600) as client:
        for _ in range(rounds):
            for name, body in bodies.items():
                started = time.perf_counter()
                response = client.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"})
                answers[name].append((response.status_code, (time.perf_counter() - started) * 1e3))
    poller.stop.set()
    poller.join()
    time.sleep(1.0)
    latencies = sorted(poller.latencies_ms)
    return {
        "health_ms": {"median": statistics.median(latencies), "p99": latencies[int(0.99 * (len(latencies) - 1))],
                      "max": latencies[-1], "polls": len(latencies)},
        "requests": {name: {"status": sorted({s for s, _ in runs}), "median_ms": statistics.median(ms for _, ms in runs),
                            "bytes": len(bodies[name])} for name, runs in answers.items()},
        "master_rss_mb": {"before": rss_before, "after": rss_mb(pid)},
    }


def measure_restarts(url: str, master_pid: int, restarts: int) -> list[float]:
    times = []
    for _ in range(restarts):
        (agent_pid,) = [int(p) for p in os.listdir("/proc") if p.isdigit() and _child_agent(int(p), master_pid)]
        killed = time.perf_counter()
        os.kill(agent_pid, signal.SIGKILL)
        while httpx.get(f"{url}/health", timeout=30).status_code == 200:
            time.sleep(0.01)
        while httpx.get(f"{url}/health", timeout=30).status_code != 200:
            time.sleep(0.02)
        times.append(time.perf_counter() - killed)
    return times


def _child_agent(pid: int, parent: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return int(fields[1]) == parent and fields[0] != "Z" and b"agent" in f.read()
    except OSError:
        return False


def with_context(config_path: str, max_seq_len: int, workdir: str) -> str:
    """A copy of a dummy-model config whose context is `max_seq_len` tokens."""
    with open(config_path) as f:
        config = yaml.safe_load(f)
    config["model_config"]["max_seq_len"] = max_seq_len
    config["model_config"]["dummy_config"]["max_position_embeddings"] = max_seq_len
    path = os.path.join(workdir, "context.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def bodies_for(config_path: str) -> dict[str, bytes]:
    from llmserve.common.config import load_config
    from llmserve.common.model_info import model_info, read_hf_config
    from llmserve.master.text_worker import max_prompt_chars
    from llmserve.master.tokenizer import load_tokenizer

    config = load_config(config_path)
    info = model_info(config.model_config, read_hf_config(config.model_config))
    bound = max_prompt_chars(load_tokenizer(config.model_config), info.max_seq_len) or 4 * info.max_seq_len
    return big_bodies(config.serving_config.max_request_body_bytes, bound - 12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=packaged_config())
    parser.add_argument("--rounds", type=int, default=5, help="times each big body is sent")
    parser.add_argument("--restarts", type=int, default=3, help="times the agent is killed")
    parser.add_argument("--max-seq-len", type=int, help="serve a dummy model with this context instead (a long one "
                        "lets the largest prompt past the length bound, to the tokenizer)")
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "robustness.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        config_path = with_context(args.config, args.max_seq_len, workdir) if args.max_seq_len else args.config
        bodies = bodies_for(config_path)
        trace = os.path.join(workdir, "trace.jsonl")
        process, url = start_server(config_path, trace, workdir, None, agent_restart_backoff=0.0)
        try:
            results = {"config": args.config, "bodies": measure_bodies(url, process.pid, bodies, args.rounds)}
            results["restart_s"] = measure_restarts(url, process.pid, args.restarts)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    bodies_result = results["bodies"]
    health = bodies_result["health_ms"]
    print(f"/health while big bodies arrive: median {health['median']:.1f} ms, p99 {health['p99']:.1f} ms, "
          f"max {health['max']:.1f} ms ({health['polls']} polls)")
    for name, r in bodies_result["requests"].items():
        print(f"  {name:20s} {r['bytes']:>9d} bytes -> {r['status']} in {r['median_ms']:.1f} ms (median)")
    rss = bodies_result["master_rss_mb"]
    print(f"master RSS: {rss['before']:.0f} MB before, {rss['after']:.0f} MB after")
    if results["restart_s"]:
        print("agent restart, kill to healthy: " + ", ".join(f"{s:.2f} s" for s in results["restart_s"]))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
