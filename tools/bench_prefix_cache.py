"""What prefix caching saves on the live server: time to first token of a repeated prompt, and the throughput
of requests sharing a system prompt, with scheduler_config.enable_prefix_caching on and off, side by side.

    python tools/bench_prefix_cache.py --config configs/bench.yaml --prefix-len 900 --shared-len 512

Cold / warm TTFT: one request of --prefix-len tokens (max 1 new token, so its time is the prefill), then
another with the same first --prefix-len tokens and a few of its own. Shared-prefix workload: --requests
requests of one --shared-len-token system prompt plus --own-len tokens each, --output-len new tokens, all at
once. Prints a markdown table and writes the numbers as JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llmserve.common.config import packaged_config  # noqa: E402
from llmserve.tools.bench_decode import start_server  # noqa: E402


def generate_seconds(url: str, text: str, max_new_tokens: int) -> float:
    """Wall seconds of one greedy request for exactly `max_new_tokens` tokens."""
    body = {"inputs": text, "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos": True}}
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
    system = words(args.shared_len, 2)
    prompts = [system + " " + words(args.own_len, 10 + i) for i in range(args.requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.requests) as pool:
        list(pool.map(lambda p: generate_seconds(url, p, args.output_len), prompts))
    elapsed = time.perf_counter() - start
    health = httpx.get(f"{url}/health").json()
    return {"cold_ttft_ms": cold * 1e3, "warm_ttft_ms": warm * 1e3, "shared_tok_s": args.requests * args.output_len / elapsed,
            "hit_tokens": health["prefix_cache_hits"], "queried_tokens": health["prefix_cache_queries"]}


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
    results = {}
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
    print(f"| {args.requests} x ({args.shared_len} shared + {args.own_len}) -> {args.output_len}, output tok/s | "
          f"{on['shared_tok_s']:.1f} | {off['shared_tok_s']:.1f} | {on['shared_tok_s'] / off['shared_tok_s']:.2f}x |")
    print(f"prefix cache: {on['hit_tokens']} of {on['queried_tokens']} prompt tokens found (caching on)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), **results}, f, indent=2)


if __name__ == "__main__":
    main()
