"""Preemption under KV-block pressure: the same concurrent greedy requests on a server with few KV blocks and
on one with ample blocks, side by side.

    python tools/bench_preemption.py --num-blocks 40 --requests 32 --output-len 200 --reserve-new-tokens 0 256

Servers: one with --num-blocks KV blocks per --reserve-new-tokens value (scheduler_config.reserve_new_tokens),
one with --ample-blocks, and one with ample blocks running --floor-batch sequences at a time (what the few
blocks hold without preemption). Each round sends --requests requests at once (--prompt-len one-token words
each, exactly --output-len new tokens, greedy) and reports the wall time, the preemptions (all, and the most
for one request, from the request log) and whether every output equals the ample-blocks run's. Rounds
alternate between the servers (--rounds each); the table has medians. Writes the numbers as JSON to --out.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llmserve.common.config import packaged_config  # noqa: E402
from llmserve.tools.bench_decode import start_server  # noqa: E402
from llmserve.tools.bench_prefix_cache import words  # noqa: E402


def generate(url: str, text: str, max_new_tokens: int) -> str:
    body = {"inputs": text, "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos": True}}
    answer = httpx.post(f"{url}/models/llama/generate", json=body, timeout=600)
    answer.raise_for_status()
    return answer.json()["generated_text"]


def request_preemptions(log_path: str) -> list[int]:
    """The `preemptions` of every request-log line the server wrote so far."""
    counts = []
    with open(log_path) as f:
        for line in f:
            if '"preemptions"' in line:
                counts.append(json.loads(line[line.index("{"):])["preemptions"])
    return counts


def run_round(url: str, log_path: str, prompts: list[str], output_len: int) -> dict:
    done_before = len(request_preemptions(log_path))
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(lambda p: generate(url, p, output_len), prompts))
    seconds = time.perf_counter() - start
    time.sleep(0.2)  # the request log line follows the answer
    counts = request_preemptions(log_path)[done_before:]
    return {"seconds": seconds, "texts": texts, "preemptions": sum(counts), "max_preemptions": max(counts, default=0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=packaged_config())
    parser.add_argument("--num-blocks", type=int, default=40)
    parser.add_argument("--ample-blocks", type=int, default=1024)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=200)
    parser.add_argument("--reserve-new-tokens", type=int, nargs="+", default=[256])
    parser.add_argument("--floor-batch", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "bench_preemption.json"))
    args = parser.parse_args()
    prompts = [words(args.prompt_len, 30 + i) for i in range(args.requests)]
    variants = {f"{args.num_blocks} blocks, reserve {r}": ({"pa_config": {"num_blocks": args.num_blocks},
                                                          "scheduler_config": {"reserve_new_tokens": r}})
                for r in args.reserve_new_tokens}
    variants[f"{args.ample_blocks} blocks"] = {"pa_config": {"num_blocks": args.ample_blocks}}
    variants[f"{args.ample_blocks} blocks, {args.floor_batch} at a time"] = {
        "pa_config": {"num_blocks": args.ample_blocks}, "scheduler_config": {"decode_batch_size": args.floor_batch}}
    servers, rounds = {}, {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as workdir:
        try:
            for index, (name, sections) in enumerate(variants.items()):
                log_path = os.path.join(workdir, f"{index}.log")
                process, url = start_server(args.config, os.path.join(workdir, f"{index}.jsonl"), workdir, None, 1, {},
                                            sections, log_path=log_path, log_level="INFO")
                servers[name] = (process, url, log_path)
                generate(url, words(8, 1), 4)  # warm-up
            for _ in range(args.rounds):
                for name, (_, url, log_path) in servers.items():
                    rounds[name].append(run_round(url, log_path, prompts, args.output_len))
        finally:
            for process, _, _ in servers.values():
                process.send_signal(signal.SIGTERM)
                process.wait(60)
    ample = f"{args.ample_blocks} blocks"
    reference = rounds[ample][0]["texts"]
    summary = {name: {"seconds": statistics.median(r["seconds"] for r in runs),
                      "preemptions": max(r["preemptions"] for r in runs),
                      "max_preemptions_per_request": max(r["max_preemptions"] for r in runs),
                      "outputs_equal": all(r["texts"] == reference for r in runs)}
               for name, runs in rounds.items()}
    print(f"| {args.requests} x ({args.prompt_len} -> {args.output_len}) | wall s | x ample | preemptions "
          "| most for one request | outputs equal ample's |\n|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['seconds']:.2f} | {s['seconds'] / summary[ample]['seconds']:.2f} | {s['preemptions']} "
              f"| {s['max_preemptions_per_request']} | {s['outputs_equal']} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "summary": summary,
                   "rounds": {k: [{**r, "texts": None} for r in v] for k, v in rounds.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
