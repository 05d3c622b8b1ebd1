"""Decode-step cost of the live server at given batch sizes, from its per-step trace.

Starts `llmserve serve` with the given config plus a step trace, sends `batch`
concurrent greedy requests (exact output lengths), and reports for the
decode-only steps at that batch: the median step wall time (ms per token per
sequence), the agent's forward time, and the share of the step spent outside
the forward. Writes the numbers as JSON to --out.

    python tools/bench_decode.py --config configs/default.yaml --batch 1 16 --out results/decode.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llmserve.common.config import packaged_config  # noqa: E402
from llmserve.tools.local_config import free_ports, write_local_config  # noqa: E402


def start_server(config_path: str, trace_path: str, workdir: str, num_threads: int | None,
                 world: int = 1, model_keys: dict | None = None, sections: dict | None = None,
                 log_path: str | None = None, **serving_keys) -> tuple[subprocess.Popen, str]:
    """`llmserve serve` on free ports with the config's keys overridden: model_config's by `model_keys`,
    serving_config's by `serving_keys`, other sections' by `sections` ({section: {key: value}}); its output
    goes to `log_path` when given."""
    serving = {"step_trace_path": trace_path, **({"num_threads": num_threads} if num_threads else {}), **serving_keys}
    if world > 1:
        *agent_ports, dist_port = free_ports(world + 1)
        serving.update(agent_ports=agent_ports, dist_port=dist_port)
    path = write_local_config(config_path, workdir, serving_config=serving, model_config=model_keys or {},
                              **(sections or {}))
    with open(path) as f:
        port = yaml.safe_load(f)["serving_config"]["server_port"]
    log = open(log_path, "w") if log_path else None
    process = subprocess.Popen([sys.executable, "-m", "llmserve", "serve", "--config", path], cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT if log else None)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("server did not become healthy")


def generate(url: str, prompt_len: int, max_new_tokens: int) -> None:
    body = {"inputs": "x " * prompt_len, "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos": True}}
    httpx.post(f"{url}/models/llama/generate", json=body, timeout=600).raise_for_status()


def run_batch(url: str, batch: int, prompt_len: int, max_new_tokens: int) -> None:
    with ThreadPoolExecutor(batch) as pool:
        list(pool.map(lambda _: generate(url, prompt_len, max_new_tokens), range(batch)))


def summarize(records: list[dict], batch: int) -> dict:
    steps = [r for r in records if r["num_prefill_seqs"] == 0 and r["num_seqs"] == batch]
    if not steps:
        raise SystemExit(f"no decode steps at batch {batch} in the trace")
    step_ms = statistics.median(r["step_ms"] for r in steps)
    predict_ms = statistics.median(r["agent_ms"].get("predict", 0.0) for r in steps)
    all_reduce_ms = statistics.median(r["agent_ms"].get("all_reduce", 0.0) for r in steps)
    stages = sorted({k for r in steps for k in r["master_ms"]} | {k for r in steps for k in r["agent_ms"]})
    medians = {k: statistics.median(r["master_ms"].get(k, r["agent_ms"].get(k, 0.0)) for r in steps) for k in stages}
    return {
        "batch": batch,
        "decode_steps": len(steps),
        "step_ms": round(step_ms, 3),
        "ms_per_token_per_seq": round(step_ms, 3),
        "tokens_per_s": round(batch * 1e3 / step_ms, 1),
        "predict_ms": round(predict_ms, 3),
        "outside_forward_share": round((step_ms - predict_ms) / step_ms, 4),
        "all_reduce_ms": round(all_reduce_ms, 3),
        "all_reduce_share": round(all_reduce_ms / step_ms, 4),
        "stage_medians_ms": {k: round(v, 4) for k, v in medians.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=packaged_config())
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads of each agent")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="agents (tensor-parallel ranks) to serve with")
    parser.add_argument("--quantization", choices=["none", "int8", "int4"], default=None, help="model_config.quantization")
    parser.add_argument("--quantize-lm-head", action="store_true", help="model_config.quantize_lm_head")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default=None, help="pa_config.kv_cache_dtype")
    parser.add_argument("--overlap", choices=["on", "off"], default=None, help="scheduler_config.overlap_scheduling")
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "bench_decode.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        trace_path = os.path.join(workdir, "trace.jsonl")
        model_keys = {"quantization": args.quantization} if args.quantization else {}
        if args.quantize_lm_head:
            model_keys["quantize_lm_head"] = True
        sections = {"pa_config": {"kv_cache_dtype": args.kv_cache_dtype}} if args.kv_cache_dtype else {}
        if args.overlap:
            sections["scheduler_config"] = {"overlap_scheduling": args.overlap == "on"}
        process, url = start_server(args.config, trace_path, workdir, args.num_threads, args.tensor_parallel, model_keys,
                                    sections)
        try:
            run_batch(url, 2, args.prompt_len, 8)  # warm-up
            results = []
            for batch in args.batch:
                open(trace_path, "w").close()
                run_batch(url, batch, args.prompt_len, args.max_new_tokens)
                with open(trace_path) as f:
                    results.append(summarize([json.loads(line) for line in f if line.strip()], batch))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    for r in results:
        print(
            f"batch {r['batch']:3d}: step {r['step_ms']:.3f} ms  forward {r['predict_ms']:.3f} ms  "
            f"outside forward {100 * r['outside_forward_share']:.1f}%  {r['tokens_per_s']:.0f} tok/s  "
            f"all-reduce {r['all_reduce_ms']:.3f} ms ({100 * r['all_reduce_share']:.1f}% of the step)"
        )
        print("           stages (median ms): " + ", ".join(f"{k} {v:.3f}" for k, v in r["stage_medians_ms"].items()))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
