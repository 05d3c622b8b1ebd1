"""What prefix caching saves on the live server: time to first token of a repeated prompt, and the throughput
of requests sharing a system prompt, with scheduler_config.enable_prefix_caching on and off, side by side.

    python tools/bench_prefix_cache.py --config configs/bench.yaml --prefix-len 900 --shared-len 512

Cold / warm TTFT: one request of --prefix-len tokens (max 1 new token, so its time is the prefill), then
another with the same first --prefix-len tokens and a few of its own. Shared-prefix workload: --requests
requests of one --shared-len-token system prompt plus --own-len tokens each, --output-len new tokens, all at
once. The repeated prompt once more with decoder_input_details: every position computed and scored.
Bookkeeping: the master's schedule + update per decode step at batch --requests (contexts of
--prefix-len tokens, in process, no model), caching on and off; its difference is what hashing and lookups
cost a step. Prints a markdown table and writes the numbers as JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llmserve.common.config import SchedulerConfig, packaged_config  # noqa: E402
from llmserve.common.sampling import SamplingParams  # noqa: E402
from llmserve.master.block_manager import BlockManager  # noqa: E402
from llmserve.master.scheduler import Scheduler, StepSamples  # noqa: E402
from llmserve.master.sequence import Sequence  # noqa: E402
from llmserve.tools.bench_decode import start_server  # noqa: E402


def generate_seconds(url: str, text: str, max_new_tokens: int, **parameters) -> float:
    """Wall seconds of one greedy request for exactly `max_new_tokens` tokens."""
    body = {"inputs": text, "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos": True, **parameters}}
    start = time.perf_counter()
    httpx.post(f"{url}/models/llama/generate", json=body, timeout=600).raise_for_status()
    return time.perf_counter() - start


def words(count: int, seed: int) -> str:
    """`count` one-token words (the builtin tokenizer's single letters), different for different seeds."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join(letters[(seed * 7 + i * (seed + 3)) % 26] for i in range(count))


def measure(url: str, args: argparse.Namespace) -> dict:
    """Cold and warm TTFT of a long prompt, then the shared-prefix workload's output tokens per second."""
    generate_seconds(url, words(16, 99), 2)  # warm-up
    prefix = words(args.prefix_len, 1)
    cold = generate_seconds(url, prefix + " x", 1)
    warm = generate_seconds(url, prefix + " y z", 1)
    scored = generate_seconds(url, prefix + " y z", 1, decoder_input_details=True)  # computes every position again
    system = words(args.shared_len, 2)
    prompts = [system + " " + words(args.own_len, 10 + i) for i in range(args.requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.requests) as pool:
        list(pool.map(lambda p: generate_seconds(url, p, args.output_len), prompts))
    elapsed = time.perf_counter() - start
    health = httpx.get(f"{url}/health").json()
    return {"cold_ttft_ms": cold * 1e3, "warm_ttft_ms": warm * 1e3, "scored_ttft_ms": scored * 1e3, "shared_tok_s": args.requests * args.output_len / elapsed,
            "hit_tokens": health["prefix_cache_hits"], "queried_tokens": health["prefix_cache_queries"]}


def bookkeeping_ms(caching: bool, batch: int, context: int, steps: int = 300) -> float:
    """Median ms of schedule + update per decode step of `batch` sequences of `context` tokens, in process."""
    scheduler = Scheduler(SchedulerConfig(decode_batch_size=batch), BlockManager(batch * (context // 16 + 40), 16, caching))
    for i in range(batch):
        scheduler.add(Sequence(i, [i] * context, SamplingParams(max_new_tokens=steps + 2), frozenset(), 1 << 20))
    times = []
    while len(times) < steps:
        start = time.perf_counter()
        plan = scheduler.schedule(0.0)
        rows = sum(item.num_rows for item in plan.scheduled)
        scheduler.update(plan, StepSamples(np.full(rows, 7, dtype=np.int64)), 0.0)
        if plan.is_decode_only:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=packaged_config("bench.yaml"))
    parser.add_argument("--prefix-len", type=int, default=900)
    parser.add_argument("--shared-len", type=int, default=512)
    parser.add_argument("--own-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "bench_prefix_cache.json"))
    args = parser.parse_args()
    results = {"bookkeeping_ms": {name: bookkeeping_ms(on, args.requests, args.prefix_len)
                                  for name, on in (("on", True), ("off", False))}}
    for caching in (True, False):
        with tempfile.TemporaryDirectory() as workdir:
            sections = {"scheduler_config": {"enable_prefix_caching": caching}}
            process, url = start_server(args.config, os.path.join(workdir, "trace.jsonl"), workdir, None, 1, {}, sections)
            try:
                results["on" if caching else "off"] = measure(url, args)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(60)
    on, off = results["on"], results["off"]
    print("| | caching on | caching off | on / off |\n|---|---|---|---|")
    print(f"| TTFT, {args.prefix_len} tokens cold, ms | {on['cold_ttft_ms']:.0f} | {off['cold_ttft_ms']:.0f} | |")
    print(f"| TTFT, the same {args.prefix_len} tokens again, ms | {on['warm_ttft_ms']:.0f} | {off['warm_ttft_ms']:.0f} | "
          f"{off['warm_ttft_ms'] / on['warm_ttft_ms']:.2f}x faster |")
    print(f"| TTFT, the same again with decoder_input_details, ms | {on['scored_ttft_ms']:.0f} | "
          f"{off['scored_ttft_ms']:.0f} | |")
    print(f"| {args.requests} x ({args.shared_len} shared + {args.own_len}) -> {args.output_len}, output tok/s | "
          f"{on['shared_tok_s']:.1f} | {off['shared_tok_s']:.1f} | {on['shared_tok_s'] / off['shared_tok_s']:.2f}x |")
    book = results["bookkeeping_ms"]
    print(f"| schedule + update per decode step, batch {args.requests} x {args.prefix_len} tokens, ms | "
          f"{book['on']:.3f} | {book['off']:.3f} | +{book['on'] - book['off']:.3f} ms |")
    print(f"prefix cache: {on['hit_tokens']} of {on['queried_tokens']} prompt tokens found (caching on)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), **results}, f, indent=2)


if __name__ == "__main__":
    main()
