"""One layer's paged attention per step, for each attention backend on this machine: decode steps at
several batch sizes and contexts, and a step mixing decodes with prefills.

Paths: `torch` (gather + SDPA, the reference), `cpu-vllm` (vLLM's CPU kernels for every step) and
`cpu` (the backend as it runs: llmserve's own decode kernel for decode-only steps when it is built).
Times one layer's call (the step's metadata is built once per step, outside); prints a table of medians (ms per layer) and writes them as JSON to --out.

    python tools/bench_attention.py --heads 12 --kv-heads 12 --head-dim 64 --out results/attention.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llmserve.agent.layers.attention import LayerShape, attention_backend  # noqa: E402

BLOCK_SIZE = 16


def step_case(batch: int, context: int, new_tokens: list[int]):
    """Rows of (context after the step, new tokens); block tables scattered over one pool."""
    return [(context, new) for new in new_tokens] if new_tokens else [(context, 1)] * batch


def time_path(path: str, rows, args, dtype: torch.dtype) -> float:
    backend = attention_backend("torch" if path == "torch" else "cpu", BLOCK_SIZE, args.kv_heads, args.head_dim,
                                dtype, torch.device("cpu"))
    if path == "cpu-vllm":
        backend.has_decode_kernel = False
    layer = LayerShape(args.heads, args.kv_heads, args.head_dim, None)
    blocks = [-(-context // BLOCK_SIZE) for context, _ in rows]
    order = torch.randperm(sum(blocks), generator=torch.Generator().manual_seed(0))
    tables = torch.zeros(len(rows), max(blocks), dtype=torch.int32)
    start = 0
    for row, count in enumerate(blocks):
        tables[row, :count] = order[start : start + count].to(torch.int32)
        start += count
    shape = backend.pool_shape(sum(blocks))
    kv_cache = (torch.randn(shape).to(dtype), torch.randn(shape).to(dtype))
    slots = [int(tables[row, p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE
             for row, (context, new) in enumerate(rows) for p in range(context - new, context)]
    query_lens = torch.tensor([new for _, new in rows], dtype=torch.int32)
    context_lens = torch.tensor([context for context, _ in rows], dtype=torch.int32)
    num_tokens = int(query_lens.sum())
    q = torch.randn(num_tokens, args.heads, args.head_dim).to(dtype)
    k = torch.randn(num_tokens, args.kv_heads, args.head_dim).to(dtype)
    v = torch.randn(num_tokens, args.kv_heads, args.head_dim).to(dtype)
    step = backend.build(torch.tensor(slots, dtype=torch.int64), query_lens, context_lens, tables)  # once per step
    times = []
    for _ in range(args.warmup + args.repeats):  # what each layer costs: writing k, v, then attending
        began = time.perf_counter()
        step.attend(layer, q, k, v, kv_cache)
        times.append(time.perf_counter() - began)
    return statistics.median(times[args.warmup :]) * 1e3


def main(argv=None, prog=None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--context", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--paths", nargs="+", default=["torch", "cpu-vllm", "cpu"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cases = [(f"decode B={batch} ctx={context}", step_case(batch, context, []))
             for batch in args.batch for context in args.context]
    cases.append(("mixed: 8 decodes ctx=500 + prefills of 17, 64, 128", [(500, 1)] * 8 + [(17, 17), (64, 64), (128, 128)]))
    results = []
    print(f"{'step':<52}" + "".join(f"{path:>11}" for path in args.paths) + "   (ms per layer, medians)")
    for name, rows in cases:
        row = {"step": name, **{path: round(time_path(path, rows, args, dtype), 3) for path in args.paths}}
        results.append(row)
        print(f"{name:<52}" + "".join(f"{row[path]:>11.3f}" for path in args.paths))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "threads": torch.get_num_threads(), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
