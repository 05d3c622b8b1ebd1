"""What the Prometheus metrics cost the step loop: microseconds per step and per request, and per scrape.

    python tools/bench_metrics.py --steps 20000
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmserve.master.metrics import Metrics  # noqa: E402

# the stages one step reports today (master with a local agent, then the agent's)
MASTER_MS = {"schedule": 0.02, "build": 0.05, "ipc_out": 0.03, "agent_loop": 0.01, "ipc_back": 0.03, "update": 0.02,
             "detokenize": 0.05}
AGENT_MS = {"deserialize": 0.01, "preprocess": 0.1, "predict": 1.0, "sample": 0.05, "write_back": 0.01}
STATS = {"num_running": 16, "num_waiting": 3, "num_preemptions": 0, "kv_blocks_total": 512, "kv_blocks_free": 100}


def per_call_us(call, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20000, help="calls timed per run")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    metrics = Metrics(lambda: STATS)
    cases = {
        "per step (on_step: 12 stages, step time, token count)": lambda: metrics.on_step(0.0015, 16, MASTER_MS, AGENT_MS),
        "per request (on_first_token + on_finish)": lambda: (
            metrics.on_first_token(128, 0.05, 0.001), metrics.on_finish("length", 1.0, 0.01)
        ),
        "per scrape (render)": metrics.render,
    }
    for name, call in cases.items():
        repeats = args.steps if "scrape" not in name else max(args.steps // 100, 10)
        runs = [per_call_us(call, repeats) for _ in range(args.runs)]
        print(f"{name}: median {statistics.median(runs):.2f} us (runs {', '.join(f'{r:.2f}' for r in runs)})")


if __name__ == "__main__":
    main()
