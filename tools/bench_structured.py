"""The cost of structured output: decode steps with and without a JSON-schema constraint, side by side.

Launches the agents once (master/offline.py, no HTTP) and runs the same batch of sampled requests with and
without the constraint, alternating per round. Per mode: decode ms per step (medians of the step trace's decode
steps), where the token masks are computed (llguidance advances each sequence's grammar and fills its mask): the
master's `build` stage for a step planned after the one before landed, its `masks` stage for a step planned
ahead (overlapped scheduling; the masks follow the step), the agent's `wait_masks` (how long the sampler waited
for them) and `sample` (where they are applied) stages, and the share of decode steps planned ahead. Also the
compile time of the schemas the tests use (50 seeded random schemas; tests/e2e/test_structured.py).

    python tools/bench_structured.py --config configs/bench.yaml --batch 1 32 --rounds 3

With --speculation, n-gram speculation is on and both modes are constrained: requests without it, then with it
(same samples), per token.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmserve.common.config import load_config, packaged_config  # noqa: E402
from llmserve.common.sampling import SamplingParams, StructuredOutput  # noqa: E402
from llmserve.master.offline import OfflineEngine  # noqa: E402
from llmserve.master.structured import GrammarCompiler  # noqa: E402
from llmserve.tools.local_config import write_local_config  # noqa: E402

# a list of records: long outputs (up to 30 items) made of bounded pieces, as an extraction task would produce
SCHEMA = {"type": "array", "minItems": 30, "maxItems": 30, "items": {
    "type": "object", "additionalProperties": False, "required": ["id", "name", "score", "tags"],
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                   "name": {"type": "string", "maxLength": 12},
                   "score": {"type": "number", "minimum": 0, "maximum": 1},
                   "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["new", "old", "hot", "cold"]}}}}}


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A schema whose every instance is short: bounded strings, arrays, numbers; no extra properties."""
    kinds = ["string", "integer", "number", "boolean", "enum", "pattern"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 8)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(["^[a-z]{2,5}$", "^[0-9]{3}-[0-9]{2}$", "^(red|green|blue)$"])}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 1000])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["a", "b", "c", 1, 2, None, True], rng.randint(1, 4))}
    if kind == "array":
        low = rng.randint(0, 2)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": low, "maxItems": low + rng.randint(0, 2)}
    names = rng.sample(["id", "name", "tags", "size", "ok", "kind", "x"], rng.randint(1, 4))
    return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
            "required": rng.sample(names, rng.randint(0, len(names))), "additionalProperties": False}


async def run_round(llm: OfflineEngine, trace_path: str, batch: int, output_len: int, constrained: bool,
                    speculative: bool = True) -> dict:
    engine = llm.engine
    engine.trace_file.truncate(0)
    engine.trace_file.seek(0)
    params = SamplingParams(max_new_tokens=output_len, do_sample=True, temperature=1.0, seed=1, ignore_eos=not constrained,
                            structured=StructuredOutput("json", json.dumps(SCHEMA)) if constrained else None,
                            speculative=speculative)
    prompts = [[(7 * i + j) % 200 + 3 for j in range(16)] for i in range(batch)]
    speculator = engine.scheduler.speculator
    accepted = speculator.num_accepted_tokens if speculator else 0
    start = time.perf_counter()
    outputs = await llm.generate(prompts, params)
    wall_s = time.perf_counter() - start
    engine.trace_file.flush()
    with open(trace_path) as f:
        steps = [json.loads(line) for line in f if line.strip()]
    decode = [s for s in steps if s["num_prefill_seqs"] == 0 and s["num_seqs"] == batch]
    return {
        "step_ms": statistics.median(s["step_ms"] for s in decode),
        "build_ms": statistics.median(s["master_ms"].get("build", 0.0) for s in decode),
        "sample_ms": statistics.median(s["agent_ms"].get("sample", 0.0) for s in decode),
        # a step planned ahead gets its masks late: made after the step before landed, waited for before sampling
        "masks_ms": statistics.median(s["master_ms"].get("masks", 0.0) for s in decode),
        "wait_masks_ms": statistics.median(s["agent_ms"].get("wait_masks", 0.0) for s in decode),
        "ahead": sum(s["overlapped"] for s in decode) / len(decode),
        "forward_ms": statistics.median(s["agent_ms"].get("predict", 0.0) for s in decode),
        "steps": len(decode),
        "tokens": statistics.median(len(o.output_ids) for o in outputs),
        # with speculation a step makes several tokens: the request's time per token (prefill included)
        "ms_per_token": wall_s * 1e3 / max(len(o.output_ids) for o in outputs),
        "accepted": ((speculator.num_accepted_tokens - accepted) / sum(len(o.output_ids) for o in outputs)
                     if speculator else 0.0),
    }


def compile_times(llm: OfflineEngine) -> list[float]:
    """ms to compile each of the tests' 50 random schemas (a fresh compiler: nothing cached)."""
    engine = llm.engine
    compiler = GrammarCompiler(engine.tokenizer.to_str(), engine.model.vocab_size, engine.model.eos_token_ids)
    compiler.tokenizer  # built once, not counted
    rng, times = random.Random(17), []
    for _ in range(50):
        schema = {"type": "object", "properties": {"v": random_schema(rng)}, "required": ["v"], "additionalProperties": False}
        start = time.perf_counter()
        compiler.compile(StructuredOutput("json", json.dumps(schema)))
        times.append((time.perf_counter() - start) * 1e3)
    return times


async def measure(args) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        trace_path = os.path.join(workdir, "trace.jsonl")
        speculation = {"speculative_config": {"method": "ngram"}} if args.speculation else {}
        path = write_local_config(args.config, workdir, serving_config={"step_trace_path": trace_path}, **speculation)
        async with OfflineEngine(load_config(path)) as llm:
            await llm.generate([[5, 6, 7]] * 2, SamplingParams(max_new_tokens=8))  # warm-up
            results = {"compile_ms": compile_times(llm)}
            for batch in args.batch:
                rounds = []
                for index in range(args.rounds):
                    order = (False, True) if index % 2 == 0 else (True, False)
                    rounds.append({on: await run_round(llm, trace_path, batch, args.output_len,
                                                       constrained=on or args.speculation, speculative=on)
                                   for on in order})
                results[batch] = {mode: {key: statistics.median(r[on][key] for r in rounds) for key in rounds[0][on]}
                                  for mode, on in (("off", False), ("on", True))}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=packaged_config("bench.yaml"))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-len", type=int, default=96)
    parser.add_argument("--speculation", action="store_true",
                        help="n-gram speculation on, both modes constrained: compare without and with it")
    parser.add_argument("--out", default=os.path.join("results", "bench_structured.json"))
    args = parser.parse_args(argv)
    results = asyncio.run(measure(args))
    times = results["compile_ms"]
    print(f"compile, 50 random schemas: median {statistics.median(times):.2f} ms, max {max(times):.2f} ms")
    for batch in args.batch:
        off, on = results[batch]["off"], results[batch]["on"]
        if args.speculation:
            print(f"batch {batch:3d}, constrained: {off['ms_per_token']:.2f} -> {on['ms_per_token']:.2f} ms per token "
                  f"with speculation ({off['ms_per_token'] / on['ms_per_token']:.2f}x), {on['accepted']:.0%} of the "
                  f"tokens from accepted proposals, {off['steps']:.0f} -> {on['steps']:.0f} decode steps")
            continue
        print(f"batch {batch:3d}: step {off['step_ms']:.2f} -> {on['step_ms']:.2f} ms "
              f"({100 * (on['step_ms'] / off['step_ms'] - 1):+.1f}%), master build {off['build_ms']:.3f} -> "
              f"{on['build_ms']:.3f} ms ({100 * (on['build_ms'] - off['build_ms']) / off['step_ms']:.1f}% of the "
              f"step), master masks {on.get('masks_ms', 0):.3f} ms, agent wait_masks {on.get('wait_masks_ms', 0):.3f} ms, "
              f"agent sample {off['sample_ms']:.3f} -> {on['sample_ms']:.3f} ms, forward "
              f"{off['forward_ms']:.2f} -> {on['forward_ms']:.2f} ms, planned ahead {off.get('ahead', 0):.0%} -> "
              f"{on.get('ahead', 0):.0%}, {on['steps']:.0f} steps, {on['tokens']:.0f} tokens")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
