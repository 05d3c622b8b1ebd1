"""Overlapped scheduling on and off, side by side in one process: decode speed and where the step goes.

Launches the agents once (the real master/agent path, no HTTP: master/offline.py) and runs the same batch
of greedy requests with scheduler_config.overlap_scheduling switched on and off in alternate rounds (the
order swapping each round), so the machine's noise falls on both alike. Per round and mode: decode ms per
step (a request's time after its first token over its further tokens, the batch's median), the median step
and forward times of the decode steps from the step trace, and whether the outputs are equal. Prints the
medians and the paired ratios (off / on: above 1 means overlap is faster) and writes them as JSON.

    python tools/bench_overlap.py --config configs/default.yaml --batch 1 16 --rounds 5
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmserve.common.config import load_config, packaged_config  # noqa: E402
from llmserve.common.sampling import SamplingParams  # noqa: E402
from llmserve.master.offline import OfflineEngine  # noqa: E402
from llmserve.tools.local_config import write_local_config  # noqa: E402

MODES = ("on", "off")
# what stands between two forwards when the steps overlap: the agent's own stages besides predict, its time
# outside them, and its turnaround from answering one step to holding the next (ipc_out)
AGENT_STAGES = ("deserialize", "preprocess", "sample", "write_back")
MASTER_STAGES = ("agent_loop", "ipc_out", "ipc_back", "schedule", "build", "update", "detokenize")


async def run_round(llm: OfflineEngine, trace_path: str, batch: int, prompt_len: int, output_len: int,
                    repetition_penalty: float = 1.0) -> dict:
    """One batch of greedy requests; the decode figures and the outputs."""
    engine = llm.engine
    engine.trace_file.truncate(0)
    engine.trace_file.seek(0)
    prompts = [[(7 * i + j) % 200 + 3 for j in range(prompt_len)] for i in range(batch)]
    outputs = await llm.generate(prompts, SamplingParams(max_new_tokens=output_len, ignore_eos=True,
                                                                repetition_penalty=repetition_penalty))
    engine.trace_file.flush()
    with open(trace_path) as f:
        steps = [json.loads(line) for line in f if line.strip()]
    decode = [s for s in steps if s["num_prefill_seqs"] == 0 and s["num_seqs"] == batch]
    per_step = [(o.res_time - o.first_token_time) / (output_len - 1) * 1e3 for o in outputs]
    stages = {f"agent {k}": [s["agent_ms"].get(k, 0.0) for s in decode] for k in AGENT_STAGES}
    stages.update({f"master {k}": [s["master_ms"].get(k, 0.0) for s in decode] for k in MASTER_STAGES})
    return {
        "stages_ms": {name: statistics.median(values) for name, values in stages.items()},
        "decode_ms": statistics.median(per_step),
        "step_ms": statistics.median(s["step_ms"] for s in decode),
        "forward_ms": statistics.median(s["agent_ms"].get("predict", 0.0) for s in decode),
        "overlapped": sum(s.get("overlapped", False) for s in decode) / max(len(decode), 1),
        "outputs": [o.output_ids for o in outputs],
    }


async def measure(args) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        trace_path = os.path.join(workdir, "trace.jsonl")
        path = write_local_config(args.config, workdir, serving_config={"step_trace_path": trace_path, "device": args.device})
        async with OfflineEngine(load_config(path)) as llm:
            await llm.generate([[5, 6, 7]] * 2, SamplingParams(max_new_tokens=8))  # warm-up
            results = {}
            for batch in args.batch:
                rounds = []
                for index in range(args.rounds):
                    order = MODES if index % 2 == 0 else MODES[::-1]
                    round_ = {}
                    for mode in order:
                        llm.engine.overlap = mode == "on"
                        round_[mode] = await run_round(llm, trace_path, batch, args.prompt_len, args.output_len,
                                                         args.repetition_penalty)
                    rounds.append(round_)
                results[batch] = summarize(rounds)
    return results


def summarize(rounds: list[dict]) -> dict:
    def median(mode: str, key: str) -> float:
        return round(statistics.median(r[mode][key] for r in rounds), 3)

    summary = {mode: {key: median(mode, key) for key in ("decode_ms", "step_ms", "forward_ms", "overlapped")} for mode in MODES}
    for mode in MODES:
        names = rounds[0][mode]["stages_ms"]
        summary[mode]["stages_ms"] = {name: round(statistics.median(r[mode]["stages_ms"][name] for r in rounds), 3)
                                      for name in names}
    for mode in MODES:
        figures = summary[mode]
        figures["outside_forward_share"] = round((figures["step_ms"] - figures["forward_ms"]) / figures["step_ms"], 3)
    ratios = [r["off"]["decode_ms"] / r["on"]["decode_ms"] for r in rounds]
    summary["speedup"] = round(statistics.median(ratios), 3)
    summary["speedups"] = [round(ratio, 3) for ratio in ratios]
    summary["outputs_equal"] = all(r["on"]["outputs"] == r["off"]["outputs"] for r in rounds)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=packaged_config())
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="serving_config.device")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="on every request (the agent keeps "
                        "each sequence's token history)")
    parser.add_argument("--out", default=os.path.join("results", "bench_overlap.json"))
    args = parser.parse_args(argv)
    results = asyncio.run(measure(args))
    for batch, r in results.items():
        for mode in MODES:
            f = r[mode]
            print(f"batch {batch:3d} overlap {mode:3s}: decode {f['decode_ms']:.3f} ms/step  step {f['step_ms']:.3f} ms  "
                  f"forward {f['forward_ms']:.3f} ms  outside forward {100 * f['outside_forward_share']:.1f}%  "
                  f"overlapped {100 * f['overlapped']:.0f}% of steps")
            print("              stages (median ms): " + ", ".join(f"{k} {v:.3f}" for k, v in f["stages_ms"].items()))
        print(f"batch {batch:3d}: overlap speed-up (off/on, median of paired rounds) {r['speedup']:.3f} {r['speedups']}  "
              f"outputs equal: {r['outputs_equal']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
