"""Where each step's time goes, from the server's per-step trace (`serving_config.step_trace_path`).

Prints, separately for prefill steps (any sequence prefilling) and decode steps,
the mean milliseconds per step and per generated token of every stage, and the
serving overhead: (step wall time - forward time) / step wall time.

    llmserve profile trace.jsonl [--skip 5]        # or: python tools/profile_steps.py trace.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmserve.common.timers import is_own_stage  # noqa: E402

ORDER = [("master", "schedule"), ("master", "build"), ("master", "ipc_out"), ("agent", "deserialize"),
         ("agent", "preprocess"), ("agent", "predict"), ("agent", "all_reduce"), ("agent", "sample"),
         ("agent", "score_prompt"), ("agent", "write_back"), ("master", "agent_loop"), ("master", "ipc_back"), ("master", "update"), ("master", "detokenize")]


@dataclass
class Breakdown:
    """Totals over a set of steps."""

    num_steps: int
    num_tokens_generated: int
    step_ms: float
    stage_ms: dict[str, float]
    num_overlapped: int = 0  # steps planned and sent while the step before ran (overlapped scheduling)

    @property
    def forward_ms(self) -> float:
        return self.stage_ms.get("agent predict", 0.0)

    @property
    def overhead(self) -> float:
        """Share of the steps' wall time spent outside the model's forward."""
        return (self.step_ms - self.forward_ms) / self.step_ms if self.step_ms else 0.0

    @property
    def unaccounted_ms(self) -> float:
        own = (ms for name, ms in self.stage_ms.items() if is_own_stage(name.split(" ", 1)[1]))
        return self.step_ms - sum(own)


def read_trace(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tokens_generated(record: dict) -> int:
    """Tokens a step produced: its sampled rows (older traces: every decode sequence)."""
    if "num_sampled" in record:
        return record["num_sampled"]
    return record["num_seqs"] - record["num_prefill_seqs"]


def breakdown(records: list[dict]) -> Breakdown:
    stage_ms: dict[str, float] = {}
    for record in records:
        for side, key in (("master", "master_ms"), ("agent", "agent_ms")):
            for stage, ms in record.get(key, {}).items():
                name = f"{side} {stage}"
                stage_ms[name] = stage_ms.get(name, 0.0) + ms
    return Breakdown(
        num_steps=len(records),
        num_tokens_generated=sum(tokens_generated(r) for r in records),
        step_ms=sum(r["step_ms"] for r in records),
        stage_ms=stage_ms,
        num_overlapped=sum(bool(r.get("overlapped")) for r in records),
    )


def split(records: list[dict]) -> dict[str, list[dict]]:
    return {
        "prefill": [r for r in records if r["num_prefill_seqs"] > 0],
        "decode": [r for r in records if r["num_prefill_seqs"] == 0],
    }


def format_breakdown(title: str, b: Breakdown) -> str:
    if b.num_steps == 0:
        return f"{title}: no steps"
    per_token = max(b.num_tokens_generated, 1)
    lines = [
        f"{title}: {b.num_steps} steps, {b.num_tokens_generated} tokens generated",
        f"  {'stage':<22}{'ms/step':>10}{'ms/token':>10}{'share':>8}",
    ]
    names = [f"{side} {stage}" for side, stage in ORDER]
    names += sorted(set(b.stage_ms) - set(names))
    for name in names:
        ms = b.stage_ms.get(name, 0.0)
        lines.append(f"  {name:<22}{ms / b.num_steps:>10.3f}{ms / per_token:>10.3f}{ms / b.step_ms:>8.1%}")
    if any("all_reduce" in name for name in b.stage_ms):
        lines.append("  (all_reduce is part of predict; rankN.* are the other ranks' own stages, in parallel)")
    lines.append(f"  {'(unaccounted)':<22}{b.unaccounted_ms / b.num_steps:>10.3f}{b.unaccounted_ms / per_token:>10.3f}"
                 f"{b.unaccounted_ms / b.step_ms:>8.1%}")
    lines.append(f"  {'step wall':<22}{b.step_ms / b.num_steps:>10.3f}{b.step_ms / per_token:>10.3f}{1:>8.1%}")
    lines.append(f"  serving overhead (step - forward) / step: {b.overhead:.1%}")
    if b.num_overlapped:
        lines.append(f"  overlapped: {b.num_overlapped} of {b.num_steps} steps were sent while the step before ran; their "
                     "master stages ran in its shadow, and ipc_out is the agent's turnaround between steps")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`llmserve profile`: print the breakdown of a trace; 1 when it holds no steps."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("trace", help="JSONL trace written by the server")
    parser.add_argument("--skip", type=int, default=0, help="ignore the first N steps (warm-up)")
    args = parser.parse_args(argv)
    records = read_trace(args.trace)[args.skip :]
    if not records:
        print(f"{args.trace}: no steps", file=sys.stderr)
        return 1
    for kind, steps in split(records).items():
        print(format_breakdown(kind, breakdown(steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
