"""Cost of the agent's sampler per step: greedy only versus a batch where every row has different parameters.

    python tools/bench_sampler.py --batch 32 --vocab 32000 1024 --out results/bench_sampler.json

Runs the sampler exactly as the agent does (rows written by the master's writer,
one call per step) on random logits, and prints the median time per call.
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

from llmserve.agent.sampler import Sampler  # noqa: E402
from llmserve.common.sampling import SamplingParams  # noqa: E402
from tests.sampling_rows import make_rows  # noqa: E402

MIXED = [
    SamplingParams(),
    SamplingParams(do_sample=True, temperature=0.7),
    SamplingParams(do_sample=True, temperature=0.9, top_k=40),
    SamplingParams(do_sample=True, top_p=0.9, seed=11),
    SamplingParams(do_sample=True, min_p=0.05, temperature=1.2),
    SamplingParams(do_sample=True, typical_p=0.9),
    SamplingParams(repetition_penalty=1.2),
    SamplingParams(do_sample=True, presence_penalty=0.5, frequency_penalty=0.3, logprobs=5),
    SamplingParams(no_repeat_ngram_size=3),
    SamplingParams(logprobs=2, min_new_tokens=4),
]


def time_calls(sampler: Sampler, logits: torch.Tensor, rows, is_all_greedy: bool, repeats: int) -> float:
    """Median milliseconds of one sampler call."""
    times = []
    for _ in range(repeats):
        batch = logits.clone()
        start = time.perf_counter()
        sampler(batch, rows, is_all_greedy)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench(batch: int, vocab: int, history_len: int, repeats: int, logit_scale: float) -> dict:
    torch.manual_seed(0)
    logits = torch.randn(batch, vocab) * logit_scale
    histories = [torch.randint(0, vocab, (history_len,)).tolist() for _ in range(batch)]
    prompt_lens = [history_len // 2] * batch
    sampler = Sampler(torch.device("cpu"))
    greedy_rows, greedy_flag = make_rows([SamplingParams()] * batch, histories, prompt_lens)
    mixed_params = [MIXED[i % len(MIXED)] for i in range(batch)]
    suppress = [[2] if p.min_new_tokens else [] for p in mixed_params]
    mixed_rows, mixed_flag = make_rows(mixed_params, histories, prompt_lens, suppress=suppress)
    sampled_rows, sampled_flag = make_rows([SamplingParams(do_sample=True, top_k=50, top_p=0.9)] * batch)
    result = {
        "batch": batch,
        "vocab": vocab,
        "history_len": history_len,
        "logit_scale": logit_scale,
        "greedy_ms": time_calls(sampler, logits, greedy_rows, greedy_flag, repeats),
        "top_k_top_p_ms": time_calls(sampler, logits, sampled_rows, sampled_flag, repeats),
        "mixed_ms": time_calls(sampler, logits, mixed_rows, mixed_flag, repeats),
    }
    result["mixed_over_greedy"] = result["mixed_ms"] / result["greedy_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[32])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 1024])
    parser.add_argument("--history-len", type=int, default=512, help="prompt + output tokens of each row")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--logit-scale", type=float, nargs="+", default=[1.0, 4.0],
        help="std of the random logits: 1 is nearly flat (top-p must sort the whole vocabulary), 4 is peaked like a trained model",
    )
    parser.add_argument("--num-threads", type=int, default=1, help="torch threads (an agent on 2 cores uses 1-2)")
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "bench_sampler.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    results = [
        bench(b, v, args.history_len, args.repeats, scale) for b in args.batch for v in args.vocab for scale in args.logit_scale
    ]
    print(f"{'batch':>5} {'vocab':>6} {'scale':>5} {'greedy ms':>10} {'top-k/p ms':>11} {'mixed ms':>9} {'mixed/greedy':>13}")
    for r in results:
        print(
            f"{r['batch']:>5} {r['vocab']:>6} {r['logit_scale']:>5} {r['greedy_ms']:>10.3f} {r['top_k_top_p_ms']:>11.3f} "
            f"{r['mixed_ms']:>9.3f} {r['mixed_over_greedy']:>12.1f}x"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
