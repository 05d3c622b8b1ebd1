"""Speculative decoding at batch 1: decode tokens per second with speculation on and off, side by side.

    python tools/bench_speculative.py --config configs/bench.yaml --rounds 5

One server with speculative_config (--method ngram with --lookup-min/--lookup-max, or draft with
--draft-num-layers / --draft-model; --k); each round sends every
workload's request twice in a row, once with `speculative: false` (one token per step) and once with it
on, so both see the same box at the same minute. Workloads, one request at a time:
  loop     greedy: the random model soon repeats itself, a loop the n-gram proposer can continue;
  random   sampled at temperature 1 (seeded): near-uniform tokens, almost nothing for the proposer;
  top-2    sampled among the 2 likeliest tokens (seeded): proposals are found, about half are accepted.
Decode speed is (tokens - 1) / (end - first token) from the response's details; the speed-up is the median
over rounds of each round's on/off ratio (the two ran a second apart); the outputs of the two runs must be
equal (greedy and seeded). The step trace splits the steps that verified proposals from
plain decode steps, stage by stage (where verification time goes). Medians over --rounds; the numbers go
to --out as JSON.
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

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llmserve.common.config import packaged_config  # noqa: E402
from llmserve.tools.bench_decode import start_server  # noqa: E402
from llmserve.tools.bench_prefix_cache import words  # noqa: E402

WORKLOADS = {
    "loop": {},
    "random": {"do_sample": True, "temperature": 1.0},
    "top-2": {"do_sample": True, "top_k": 2},
}


def generate(url: str, prompt: str, parameters: dict) -> dict:
    body = {"inputs": prompt, "parameters": {"ignore_eos": True, **parameters}}
    answer = httpx.post(f"{url}/models/llama/generate", json=body, timeout=600)
    answer.raise_for_status()
    return answer.json()


def decode_rate(answer: dict) -> float:
    details = answer["details"]
    return (details["generated_tokens"] - 1) / (details["res_time"] - details["first_token_time"])


def spec_counts(url: str) -> dict:
    health = httpx.get(f"{url}/health", timeout=10).json()
    return {key: health.get(key) or 0 for key in ("spec_drafts", "spec_draft_tokens", "spec_accepted_tokens")}


def read_trace(path: str, start: float, end: float) -> list[dict]:
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if start <= r["time"] <= end]


def stage_means(records: list[dict]) -> dict:
    """Mean ms per step of each master and agent stage, and of the whole step."""
    if not records:
        return {}
    totals: dict[str, float] = {}
    for record in records:
        for component in ("master_ms", "agent_ms"):
            for stage, ms in record[component].items():
                key = f"{component[:-3]}.{stage}"
                totals[key] = totals.get(key, 0.0) + ms
        totals["step"] = totals.get("step", 0.0) + record["step_ms"]
    means = {key: value / len(records) for key, value in totals.items()}
    means["tokens"] = sum(r["num_tokens"] for r in records) / len(records)
    means["new_tokens"] = sum(1 + r.get("num_accepted", 0) for r in records) / len(records)
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=packaged_config("bench.yaml"))
    parser.add_argument("--method", default="ngram")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--lookup-min", type=int, default=1)
    parser.add_argument("--lookup-max", type=int, default=4)
    parser.add_argument("--draft-num-layers", type=int, default=2, help="--method draft: a slice of the model's first layers")
    parser.add_argument("--draft-model", help="--method draft: a draft checkpoint instead of a slice")
    parser.add_argument("--no-adaptive", action="store_true", help="speculative_config.adaptive: false")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="serving_config.device")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "bench_speculative.json"))
    args = parser.parse_args()
    speculative = {"method": args.method, "num_speculative_tokens": args.k, "adaptive": not args.no_adaptive,
                   "prompt_lookup_min": args.lookup_min, "prompt_lookup_max": args.lookup_max}
    if args.method == "draft":
        speculative.update({"draft_model_path": args.draft_model} if args.draft_model else
                           {"draft_num_layers": args.draft_num_layers})
    rates = {(w, s): [] for w in args.workloads for s in (False, True)}
    counts = {w: {"spec_drafts": 0, "spec_draft_tokens": 0, "spec_accepted_tokens": 0} for w in args.workloads}
    windows = {(w, s): [] for w in args.workloads for s in (False, True)}
    equal = {w: True for w in args.workloads}
    with tempfile.TemporaryDirectory() as workdir:
        trace = os.path.join(workdir, "trace.jsonl")
        process, url = start_server(args.config, trace, workdir, None, 1, {}, {"speculative_config": speculative},
                                     device=args.device)
        try:
            generate(url, words(8, 1), {"max_new_tokens": 4})  # warm-up
            for round_index in range(args.rounds):
                for workload in args.workloads:
                    prompt = words(args.prompt_len, 40 + round_index)
                    parameters = {"max_new_tokens": args.output_len, "seed": round_index, **WORKLOADS[workload]}
                    outputs = []
                    for on in (False, True):
                        before, start = spec_counts(url), time.time()
                        answer = generate(url, prompt, {**parameters, "speculative": on})
                        windows[(workload, on)].append((start, time.time()))
                        rates[(workload, on)].append(decode_rate(answer))
                        outputs.append(answer["generated_text"])
                        after = spec_counts(url)
                        for key in counts[workload]:
                            counts[workload][key] += after[key] - before[key]
                    equal[workload] &= outputs[0] == outputs[1]
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
        steps = {key: [r for start, end in spans for r in read_trace(trace, start, end) if r["num_sampled"]]
                 for key, spans in windows.items()}
    summary = {}
    for workload in args.workloads:
        off, on = statistics.median(rates[(workload, False)]), statistics.median(rates[(workload, True)])
        paired = statistics.median(b / a for a, b in zip(rates[(workload, False)], rates[(workload, True)]))
        c = counts[workload]
        verify_steps = [r for r in steps[(workload, True)] if r.get("num_draft_tokens")]
        summary[workload] = {
            "off_tok_s": off, "on_tok_s": on, "speedup": paired, "outputs_equal": equal[workload],
            "acceptance_rate": c["spec_accepted_tokens"] / c["spec_draft_tokens"] if c["spec_draft_tokens"] else None,
            "mean_acceptance_length": 1 + c["spec_accepted_tokens"] / c["spec_drafts"] if c["spec_drafts"] else None,
            "share_of_steps_verifying": len(verify_steps) / max(len(steps[(workload, True)]), 1),
            "plain_step": stage_means(steps[(workload, False)]),
            "verify_step": stage_means(verify_steps),
        }
    print(f"| batch 1, {args.prompt_len} -> {args.output_len}, {args.method} k={args.k} | off tok/s | on tok/s | "
          "speed-up (median of rounds' on/off) | acceptance | mean acceptance length | steps verifying | outputs equal |")
    print("|---|---|---|---|---|---|---|---|")
    for workload, s in summary.items():
        rate = "n/a" if s["acceptance_rate"] is None else f"{s['acceptance_rate']:.1%}"
        length = "n/a" if s["mean_acceptance_length"] is None else f"{s['mean_acceptance_length']:.2f}"
        print(f"| {workload} | {s['off_tok_s']:.1f} | {s['on_tok_s']:.1f} | {s['speedup']:.2f}x | {rate} | {length} "
              f"| {s['share_of_steps_verifying']:.0%} | {s['outputs_equal']} |")
    print("\nwhere a step's time goes (mean ms per step; verify = steps that verified proposals):")
    for workload, s in summary.items():
        for kind in ("plain_step", "verify_step"):
            means = s[kind]
            if means:
                stages = ", ".join(f"{k} {v:.2f}" for k, v in sorted(means.items(), key=lambda kv: -kv[1])
                                   if k not in ("tokens", "new_tokens") and v >= 0.05)
                print(f"  {workload} {kind}: {means['tokens']:.1f} tokens in, {means['new_tokens']:.2f} out; {stages}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "summary": summary,
                   "rates": {f"{w}/{'on' if s else 'off'}": v for (w, s), v in rates.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
