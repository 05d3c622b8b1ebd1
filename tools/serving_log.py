"""Per-request records of a load test: the record, its JSONL file, and the summary statistics."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import numpy as np

PERCENTILES = {"mean": None, "median": 50, "p90": 90, "p99": 99}
LATENCIES = [("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E latency")]


@dataclass
class RequestRecord:
    """One request as the client saw it; times are seconds since `send_time` (unix seconds)."""

    request_id: str
    send_time: float
    prompt_tokens: int = 0
    output_tokens: int = 0
    first_token_time: Optional[float] = None
    res_time: Optional[float] = None
    itl: list[float] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def is_ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> Optional[float]:
        """Mean time per output token after the first; None with fewer than two tokens."""
        if self.output_tokens < 2 or self.first_token_time is None or self.res_time is None:
            return None
        return (self.res_time - self.first_token_time) / (self.output_tokens - 1)

    def token_times(self) -> list[float]:
        """Unix time of each token's arrival: the first token, then each inter-token gap after it."""
        if self.first_token_time is None:
            return []
        first = self.send_time + self.first_token_time
        return [first] + list(first + np.cumsum(self.itl))


def write_records(path: str, records: Iterable[RequestRecord]) -> None:
    """Write one JSON line per record."""
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(asdict(record)) + "\n")


def read_records(path: str) -> list[RequestRecord]:
    """Read a file written by `write_records`."""
    with open(path) as f:
        return [RequestRecord(**json.loads(line)) for line in f if line.strip()]


def distribution(values: list[float]) -> dict[str, Optional[float]]:
    """Mean, median, p90 and p99 (linear interpolation); None for no values."""
    if not values:
        return {name: None for name in PERCENTILES}
    array = np.asarray(values, dtype=float)
    return {name: float(array.mean() if q is None else np.percentile(array, q)) for name, q in PERCENTILES.items()}


def meets_slo(record: RequestRecord, slo_ttft_s: Optional[float], slo_tpot_s: Optional[float]) -> bool:
    """Whether a completed request met every SLO given (a request of one token has no TPOT to miss)."""
    if slo_ttft_s is not None and (record.first_token_time is None or record.first_token_time > slo_ttft_s):
        return False
    tpot = record.tpot
    return slo_tpot_s is None or tpot is None or tpot <= slo_tpot_s


def summarize(records: list[RequestRecord], duration_s: float,
              slo_ttft_s: Optional[float] = None, slo_tpot_s: Optional[float] = None) -> dict:
    """Counts, throughputs, latency distributions and goodput of a run that lasted `duration_s`."""
    done = [r for r in records if r.is_ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    per_second = 1.0 / duration_s if duration_s > 0 else 0.0
    num_good = sum(meets_slo(r, slo_ttft_s, slo_tpot_s) for r in done)
    return {
        "num_completed": len(done),
        "num_failed": len(records) - len(done),
        "errors": dict(Counter(r.error for r in records if not r.is_ok).most_common()),
        "duration_s": duration_s,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(done) * per_second,
        "output_throughput": output_tokens * per_second,
        "total_throughput": (prompt_tokens + output_tokens) * per_second,
        "slo_ttft_s": slo_ttft_s,
        "slo_tpot_s": slo_tpot_s,
        "goodput": num_good * per_second,
        "ttft_s": distribution([r.first_token_time for r in done if r.first_token_time is not None]),
        "tpot_s": distribution([r.tpot for r in done if r.tpot is not None]),
        "itl_s": distribution([gap for r in done for gap in r.itl]),
        "e2e_s": distribution([r.res_time for r in done if r.res_time is not None]),
    }


def format_ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


def slo_text(summary: dict) -> str:
    slos = [f"{name} <= {summary[key] * 1000:g} ms" for key, name in (("slo_ttft_s", "TTFT"), ("slo_tpot_s", "TPOT"))
            if summary[key] is not None]
    return ", ".join(slos) if slos else "no SLO given"


def format_summary(summary: dict, max_errors: int = 5) -> str:
    """The summary as a printable table."""
    lines = [
        f"{'completed requests':<28}{summary['num_completed']:>12}",
        f"{'failed requests':<28}{summary['num_failed']:>12}",
        f"{'duration (s)':<28}{summary['duration_s']:>12.2f}",
        f"{'prompt tokens':<28}{summary['prompt_tokens']:>12}",
        f"{'output tokens':<28}{summary['output_tokens']:>12}",
        f"{'requests/s':<28}{summary['request_throughput']:>12.2f}",
        f"{'output tokens/s':<28}{summary['output_throughput']:>12.1f}",
        f"{'total tokens/s':<28}{summary['total_throughput']:>12.1f}",
        f"{'goodput (requests/s)':<28}{summary['goodput']:>12.2f}  ({slo_text(summary)})",
        f"{'latency (ms)':<16}" + "".join(f"{name:>10}" for name in PERCENTILES),
    ]
    for key, name in LATENCIES:
        lines.append(f"{name:<16}" + "".join(f"{format_ms(value):>10}" for value in summary[key].values()))
    for error, count in list(summary["errors"].items())[:max_errors]:
        lines.append(f"failed x{count}: {error}")
    return "\n".join(lines)
